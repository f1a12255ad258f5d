"""Multi-process training on the tiny preset (gloo, forked ranks) against the single-process run.

For each layout (DDP, FSDP2, expert parallel x DDP on 2 and 4 ranks, expert parallel x FSDP2) and a
router with global state (DDP: the loss-free bias and the realized-count budget's per-layer thresholds):
    - the per-step train loss, aux loss, grad norm and logged layer statistics (load-balance loss, expert
      load, mean active experts, logit spread, load diagnostics) equal the single-process run's to REL_TOL;
    - the final weights and buffers (Budget theta, loss-free bias, ReMoE lambda), read back through the
      sharded checkpoint's conversion to a single-file checkpoint, equal the single-process ones to ATOL;
    - replicated state (Budget theta, controller buffers) is identical on every rank;
    - stopping at step 3 and resuming gives bitwise the uninterrupted multi-process run;
    - a single-process run stopped at step 3 and resumed on the processes ends at the same weights.
Tolerances: float32 sums in another order (sharded batch, all-reduce): 1e-5 relative on logged values,
1e-5 absolute on weights after 6 AdamW steps (measured on 2026-12-01: at most 1.4e-7 relative on the
logged values and 3.6e-6 absolute on the weights (EP x DP, 4 ranks), over the layouts).

Run: .venv/bin/python -m pytest -q tests/e2e/test_distributed.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from softmoe.parallel.checkpoint import to_single_file
from softmoe.parallel.trainer import DistributedTrainer
from softmoe.parallel.world import init_world
from softmoe.routing.balance import ExpertBias
from softmoe.routing.remoe import ReMoERouter
from softmoe.train.checkpoint import load_checkpoint
from softmoe.train.config import load_run_config
from softmoe.train.loop import Trainer
from softmoe.train.metrics import read_metrics
from tests.unit.parallel.spawn import run_ranks

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REL_TOL = 1e-5
ATOL = 1e-5
STEPS = ("train.steps=6", "train.grad_accum=2", "train.log_every=1", "train.ckpt_every=3", "train.keep_last=5",
         "train.eval_every=0", "train.eval_batches=1", "train.progress=false", "train.tensorboard=false")

LAYOUTS = {
    "ddp": (2, ["parallel.data=ddp", "model.router_options.loss_free_bias=true", "model.budget_options.realized=true"]),
    "fsdp": (2, ["parallel.data=fsdp"]),
    "ep2_ddp": (2, ["parallel.data=ddp", "parallel.expert=2", "model.router=remoe"]),
    "ep2_fsdp": (2, ["parallel.data=fsdp", "parallel.expert=2", "model.router_options.loss_free_bias=true"]),
    "ep2_dp2": (4, ["parallel.data=ddp", "parallel.expert=2", "model.router=topk",
                    "model.router_options.loss_free_bias=true"]),
}


def _config(root: Path, name: str, overrides: list[str]):
    return load_run_config(CONFIGS / "tiny" / "softmoe.yaml", [
        f"train.out_dir={root / 'runs'}", f"data.data_dir={root / 'data'}", f"train.name={name}", *STEPS, *overrides])


def _quiet(_message: str) -> None:
    pass


def _replicated(trainer: Trainer) -> dict[str, torch.Tensor]:
    """State every rank must hold identically: the budget's theta and the controllers' buffers."""
    out = {}
    for name, module in trainer.model.named_modules():
        if isinstance(module, ExpertBias):
            out[f"{name}.bias_E"] = module.bias_E.clone()
        if isinstance(module, ReMoERouter):
            out[f"{name}.l1_coef"] = module.l1_coef.clone()
        if hasattr(module, "threshold") and isinstance(module.threshold, torch.Tensor):  # the realized budget's
            out[f"{name}.threshold"] = module.threshold.clone()
    if trainer.model.budget is not None and trainer.config.parallel.data == "ddp":
        out["budget.theta"] = trainer.model.budget.theta.detach().clone()
    return out


def train_ranks(rank: int, size: int, root: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    """One rank: an uninterrupted run, then a run stopped after step 3 and resumed to the end."""
    root = Path(root)
    config = _config(root, "straight", overrides)
    world = init_world(config.parallel)
    straight = DistributedTrainer(config, world, report=_quiet)
    straight.fit()
    if rank == 0:  # the whole model's count, though each rank holds a part of the experts (EP) or weights (FSDP)
        assert straight.num_params() == Trainer(config, report=_quiet).num_params()
    resumed_config = dataclasses.replace(config, train=dataclasses.replace(config.train, name="resumed"))
    DistributedTrainer(resumed_config, world, report=_quiet).fit(stop_after=3)
    DistributedTrainer(resumed_config, world, report=_quiet).fit(resume=True)
    # a single-process run (stopped at step 3 by the test) continued on these processes
    from_single = dataclasses.replace(config, train=dataclasses.replace(config.train, name="from_single"))
    DistributedTrainer(from_single, world, report=_quiet).fit(resume=True)
    return _replicated(straight)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """Single-process runs of every router used below (this also builds the tiny dataset once)."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    for layout, (_, overrides) in LAYOUTS.items():
        model_overrides = [o for o in overrides if o.startswith("model.")]
        config = _config(root, layout, model_overrides)
        result = Trainer(config, report=_quiet).fit()
        runs[layout] = {"metrics": read_metrics(Path(result.run_dir), "train"),
                        "val_loss": result.val_loss, "state": load_checkpoint(Path(result.checkpoint))[0]}
    return {"root": root, "runs": runs}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(b))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_multi_process_training_matches_single_process(layout, single, tmp_path):
    size, overrides = LAYOUTS[layout]
    (tmp_path / "data").symlink_to(single["root"] / "data")  # the dataset the single run built
    model_overrides = [o for o in overrides if o.startswith("model.")]
    Trainer(_config(tmp_path, "from_single", model_overrides), report=_quiet).fit(stop_after=3)
    ranks = run_ranks(train_ranks, size, str(tmp_path), overrides)
    ref = single["runs"][layout]

    runs = tmp_path / "runs"
    records = read_metrics(runs / "straight", "train")
    assert [r["step"] for r in records] == [r["step"] for r in ref["metrics"]] == list(range(1, 7))
    for got, want in zip(records, ref["metrics"]):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert _close(got[key], want[key]), f"step {got['step']} {key}: {got[key]} vs {want[key]}"
        for layer_got, layer_want in zip(got["layers"], want["layers"]):
            for key in ("load_balance_loss", "active_experts_mean", "k", "logit_spread", "weight_sum_mean",
                        "load_max_over_mean", "load_cv", "dead_fraction"):
                assert _close(layer_got[key], layer_want[key]), f"step {got['step']} {key}"
            for g, w in zip(layer_got["expert_load"], layer_want["expert_load"]):
                assert _close(g, w), f"step {got['step']} expert_load {layer_got['expert_load']}"
    val = [r for r in read_metrics(runs / "straight", "val")][-1]["loss"]
    assert _close(val, ref["val_loss"])

    for rank_state in ranks[1:]:  # replicated parameters and controller state: identical on every rank
        for name, value in rank_state.items():
            assert torch.equal(value, ranks[0][name]), f"{name} differs between ranks"

    continued = load_checkpoint(to_single_file(runs / "from_single", tmp_path / "converted_from_single"))[0]
    for name, value in continued.items():  # 3 steps in one process, 3 on many
        assert torch.allclose(value.float(), ref["state"][name].float(), rtol=0, atol=ATOL), f"{name} differs"

    straight = load_checkpoint(to_single_file(runs / "straight", tmp_path / "converted_straight"))[0]
    resumed = load_checkpoint(to_single_file(runs / "resumed", tmp_path / "converted_resumed"))[0]
    assert straight.keys() == ref["state"].keys()
    for name, value in straight.items():
        assert torch.allclose(value.float(), ref["state"][name].float(), rtol=0, atol=ATOL), f"{name} differs"
        assert torch.equal(resumed[name], value), f"{name}: the resumed run is not bitwise the uninterrupted one"


def refuse_twice(rank: int, size: int, root: str) -> str:
    """Train a 2-step run, then ask for it again as a new run: every rank must get rank 0's refusal."""
    from softmoe.train.rundir import RunDirError

    config = _config(Path(root), "twice", ["parallel.data=ddp", "train.steps=2", "train.ckpt_every=0"])
    world = init_world(config.parallel)
    DistributedTrainer(config, world, report=_quiet).fit()
    try:
        DistributedTrainer(config, world, report=_quiet).fit()
    except RunDirError as err:
        return str(err)
    return "not refused"


def test_a_refused_run_directory_stops_every_rank(single, tmp_path):
    (tmp_path / "data").symlink_to(single["root"] / "data")
    messages = run_ranks(refuse_twice, 2, str(tmp_path), timeout=120)
    assert all("already holds this run" in m for m in messages), messages
