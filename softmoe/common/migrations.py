"""Every compatibility shim for files written by older versions, in one place: one function per migrated format.

    run_config            a saved run config (a run's config.yaml, a checkpoint's config.json, a study's
                          record) -> today's layout; `train/config.py`'s loader applies it to every dict it parses
    router_state          a single-file checkpoint (safetensors / torch state dict) from before SoftKRouter's
                          `threshold` buffer: the router's load_state_dict pre-hook fills in the configured value
    sharded_model_state   a sharded (DCP) checkpoint from before that buffer: the entries it lacks are left out
                          of the strict load, so the model keeps the value it was built with
    exported_threshold    an exported transformers folder from before that buffer: from_pretrained leaves the
                          missing buffer uninitialised, so it gets the configured value

Each function works on plain dicts and tensors (no model or config classes), so any stage may call it; each has
a test built from a small hand-written old-format example (tests/unit/common/test_migrations.py).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["run_config", "router_state", "sharded_model_state", "exported_threshold", "ADDED_STATE_SUFFIXES",
           "THRESHOLD_BUFFER"]

# The name of SoftKRouter's relative-threshold buffer (added 2026-12-01; moved by the active-experts controller).
THRESHOLD_BUFFER = "threshold"
# Model state added after checkpoints were first written (module-name suffixes): older files lack it.
ADDED_STATE_SUFFIXES = (f".router.{THRESHOLD_BUFFER}",)


def run_config(raw: dict) -> dict:
    """A saved run config of any age as today's layout (a new dict; `raw` is not changed).

    - `train.ae_lever` without `train.ae_target`: configs of 2026-12-01/02 carry the then-default "threshold"
      although no lever moves without a target; it reads as "" (today's default), so they compare equal to
      today's. (With a target and no lever the config is refused by TrainConfig: those runs moved K and must
      say `train.ae_lever=budget`.)
    """
    raw = copy.deepcopy(raw) if isinstance(raw, dict) else raw
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict) and not train.get("ae_target") and train.get("ae_lever"):
        train["ae_lever"] = ""
    return raw


def router_state(state_dict: dict, prefix: str, threshold: float) -> None:
    """A router's state dict from before the `threshold` buffer gets `threshold` (its config's value), in place.

    Args:
        state_dict: the state dict being loaded (as `load_state_dict` pre-hooks receive it).
        prefix: the router's prefix in it ("blocks.0.ffn.router.").
        threshold: the router config's threshold.
    """
    state_dict.setdefault(prefix + THRESHOLD_BUFFER, torch.tensor(threshold, dtype=torch.float32))


def sharded_model_state(model_dcp: dict, saved: set[str]) -> dict:
    """`model_dcp` (the model's state dict, loaded under "model." in DCP) without the entries `saved` (the
    checkpoint's keys) lacks and that only newer code writes (ADDED_STATE_SUFFIXES): DCP's strict load would
    refuse them, and the model keeps the value it was built with. Any other missing entry stays, so DCP names it."""
    return {name: value for name, value in model_dcp.items()
            if f"model.{name}" in saved or not name.endswith(ADDED_STATE_SUFFIXES)}


def exported_threshold(buffer: torch.Tensor, loaded: bool, threshold: float) -> None:
    """A router's `threshold` buffer after transformers' from_pretrained: when the folder lacked it (`loaded`
    False: exported before the buffer existed, so the buffer holds uninitialised memory) it gets `threshold`,
    the config's value; a loaded one is kept."""
    if not loaded:
        with torch.no_grad():
            buffer.fill_(threshold)
