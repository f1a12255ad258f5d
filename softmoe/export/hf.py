"""transformers integration: SoftMoEConfig and SoftMoEForCausalLM, a thin PreTrainedModel around GPT.

The HF classes add no architecture: SoftMoEForCausalLM holds one `softmoe.model.GPT` as `model`, so
`save_pretrained` writes GPT's own state dict (under `model.`) to safetensors. SoftMoEConfig stores
exactly the fields of ModelConfig and converts both ways, so ModelConfig stays the one source of truth.

Generation uses transformers' DynamicCache. GPT's attention only needs an object with `length` and
`update(layer, k, v)`; `_CacheView` adapts the HF cache to that, so beam search and cache reordering
are transformers' business and the attention code is unchanged.

Padding: `attention_mask` (B, cached + new) is handed to GPT as its own `attention_mask`, which does all the
work in the one forward path: per-row RoPE positions counted from each row's first real token, padding
keys masked out of attention, padding tokens not routed by the MoE layers. Left padding (what `generate`
and lm-eval's HFLM use for batched generation, and what transformers extends by one 1 per generated token)
and right padding (e.g. batched scoring) both give each row's real tokens the logits and routing of
the unpadded row. A 0 between 1s (a hole) raises ValueError naming attention_mask; so does right padding
under generate, whose appended tokens make one. An all-ones mask is dropped, so unpadded calls run
GPT's unmasked path. Positions always come from the mask: `position_ids` is refused.

Training follows transformers' MoE convention (Mixtral): with `output_router_logits` (the forward argument,
else config.output_router_logits) the output carries `aux_loss` (the MoE layers' configured aux losses plus the
budget penalty, what native training adds to the loss) and `router_logits`, and with labels
`loss = cross-entropy + config.router_aux_loss_coef * aux_loss`; so `transformers.Trainer` trains the routers'
load balancing as native training does.

Loading a folder with the Auto classes: its config.json names these classes in `auto_map`, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it without importing softmoe
first (the folder's modeling_softmoe.py imports this module and calls `register()`); or call `register()` once
and drop trust_remote_code. AutoTokenizer reads config.json through AutoConfig too, so it needs either as well
(transformers otherwise asks on stdin whether to run the folder's code). Importing this module registers nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from softmoe.common import migrations
from softmoe.common.checks import check_bool, check_float
from softmoe.export.manifest import is_model_file, verify_export, write_manifest
from softmoe.model.attention import rope_tables
from softmoe.model.config import ModelConfig
from softmoe.model.decoder import GPT, check_pad_mask
from softmoe.routing.softk import SoftKRouter

__all__ = ["SoftMoEConfig", "SoftMoEForCausalLM", "SoftMoECausalLMOutput", "register", "AUTO_MAP", "REMOTE_CODE_FILE"]

_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


@dataclasses.dataclass
class SoftMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """MoeCausalLMOutputWithPast plus the routing results of the forward (detached; no host sync).

    Attributes:
        routing_stats: block index -> that MoE layer's stats (name -> detached tensor: k, active experts, logit
            spread, expert counts, ...; docs/training.md), in block order; empty for a dense model. Its "k" is the
            layer's k (SoftMoE: the budget's k_l, the soft top-k mass). What `RoutingDiagnosticsCallback`
            (softmoe/export/diagnostics.py) reads.
    """

    routing_stats: dict | None = None
# The output's cache field: `cache` in recent transformers (5.24 here), `past_key_values` in older releases.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# What an exported folder's config.json names under auto_map, and the file (written next to it) it points to.
REMOTE_CODE_FILE = "modeling_softmoe.py"
AUTO_MAP = {"AutoConfig": "modeling_softmoe.SoftMoEConfig",
            "AutoModelForCausalLM": "modeling_softmoe.SoftMoEForCausalLM"}
_REMOTE_CODE = '''"""SoftMoE's transformers classes, for AutoModelForCausalLM.from_pretrained(this_folder, trust_remote_code=True).

They live in the softmoe package (pip install softmoe); this file only points transformers to them, and
registers them with the Auto classes, so that AutoTokenizer.from_pretrained(this_folder) afterwards (which reads
config.json through AutoConfig) does not ask again whether to run this code.
"""

from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM, register  # noqa: F401

register()
'''


class SoftMoEConfig(PretrainedConfig):
    """ModelConfig's fields as a PretrainedConfig (config.json). Validation is ModelConfig's.

    Beyond ModelConfig: `output_router_logits` (default False, as Mixtral) and `router_aux_loss_coef`
    (default 1.0: the routers' aux losses are already weighted by their own lb_coef / z_coef, so 1.0 adds
    them as native training does). See SoftMoEForCausalLM.forward.
    """

    model_type = "softmoe"
    # transformers reads these standard names (cache layout, lm-eval's max length); they alias our fields.
    attribute_map = {"num_hidden_layers": "n_layers", "hidden_size": "d_model",
                     "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"}

    def __init__(self, **kwargs):
        defaults = dataclasses.asdict(ModelConfig())  # plain values: config.json holds the typed options as dicts
        for name in _FIELDS:
            value = kwargs.pop(name, defaults[name])
            setattr(self, name, dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        self.output_router_logits = kwargs.pop("output_router_logits", False)
        self.router_aux_loss_coef = kwargs.pop("router_aux_loss_coef", 1.0)
        check_bool("output_router_logits", self.output_router_logits)
        check_float("router_aux_loss_coef", self.router_aux_loss_coef, 0)
        # The head is the embedding matrix itself (one tensor), so there is nothing for HF to tie.
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))  # save_pretrained writes the file it names
        super().__init__(**kwargs)
        self.to_model_config()  # raise ValueError / TypeError naming the bad field now, not at model build

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> SoftMoEConfig:
        """The transformers config of a softmoe `ModelConfig` (every field kept; `kwargs`: PretrainedConfig's)."""
        return cls(**dataclasses.asdict(config), **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The softmoe `ModelConfig` this transformers config holds (the inverse of `from_model_config`)."""
        return ModelConfig(**{name: getattr(self, name) for name in _FIELDS})


class _CacheView:
    """Presents a transformers Cache as the `cache` GPT.forward expects (`length`, `update(layer, k, v)`)."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.length = cache.get_seq_length()  # GPT advances this after the forward; nothing reads it later

    def update(self, layer: int, k_BHSd: torch.Tensor,
               v_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k_BHSd, v_BHSd, layer)


@dataclasses.dataclass(frozen=True)
class _LayerK:
    """The budget's (L,) k_l, handed by `generate` to every step's forward. Not a torch.Tensor, so transformers'
    generate passes it on as it is instead of repeating it along the batch (num_beams, num_return_sequences).
    `owner` is id() of the GPT they belong to: any other model that receives them (an assistant model, which
    transformers gives a copy of the main model's kwargs) computes its own."""

    k_L: torch.Tensor
    owner: int


def _own_layer_k(layer_k: torch.Tensor | _LayerK | None, model: GPT) -> torch.Tensor | None:
    """forward's `layer_k` as GPT.forward takes it: a `_LayerK` of another model is dropped (None: computed)."""
    if isinstance(layer_k, _LayerK):
        return layer_k.k_L if layer_k.owner == id(model) else None
    return layer_k


class SoftMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM for transformers: forward(input_ids, attention_mask, cache, labels) over one GPT.

    `activation_checkpointing_enable()` (what TrainingArguments(activation_checkpointing=True) calls) turns on GPT's
    activation checkpointing (torch.utils.checkpoint per block, non-reentrant).
    """

    config_class = SoftMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: SoftMoEConfig):
        super().__init__(config)
        self.model = GPT(config.to_model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # GPT initialises its own parameters, so this leaves them alone. It does recompute the non-persistent
        # RoPE tables: from_pretrained builds the model on the meta device and the checkpoint lacks them.
        if isinstance(module, GPT):
            c = module.config
            cos, sin = rope_tables(c.max_seq_len, c.head_dim, c.rope_theta)
            module.rope_cos.data = cos.to(module.rope_cos.device)
            module.rope_sin.data = sin.to(module.rope_sin.device)
        # A folder exported before SoftKRouter had its `threshold` buffer lacks it (a loaded one is marked).
        if isinstance(module, SoftKRouter):
            migrations.exported_threshold(module.threshold, getattr(module.threshold, "_is_hf_initialized", False),
                                          module.config.threshold)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        """What activation_checkpointing_enable / _disable call: GPT's own per-block checkpointing (always
        torch.utils.checkpoint, non-reentrant; `gradient_checkpointing_func` is not used)."""
        if enable and every_n_layers != 1:
            raise ValueError(f"every_n_layers={every_n_layers}: SoftMoEForCausalLM checkpoints every block (1)")
        self.model.activation_checkpointing = bool(enable)

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether the decoder recomputes its blocks in backward (transformers' gradient checkpointing)."""
        return self.model.activation_checkpointing

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save_pretrained, plus the modeling_softmoe.py that config.json's auto_map names and the
        sha256 manifest of the folder's files (softmoe/export/manifest.py), written last."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            (Path(save_directory) / REMOTE_CODE_FILE).write_text(_REMOTE_CODE)
            write_manifest(Path(save_directory))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, after checking a local folder's weights and config against its
        sha256 manifest (ExportIntegrityError naming the file; transformers itself checks no hashes)."""
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir():
            verify_export(folder, select=is_model_file)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def generate(self, *args, **kwargs):
        """transformers' `generate`, with the budget's per-layer k_l computed once for all its steps (GPT.forward's
        `layer_k`): they depend on the weights only, and recomputing them costs ~60 operators per step."""
        given = kwargs.get("layer_k")
        if isinstance(given, torch.Tensor):  # given: wrapped, so no beam repeats it
            kwargs["layer_k"] = _LayerK(given, id(self.model))
        elif given is None and self.model.budget is not None and kwargs.get("assistant_model") is None:
            # (not with an assistant model: transformers would hand it this kwarg, which it may not take)
            with torch.no_grad():
                kwargs["layer_k"] = _LayerK(self.model.layer_k(), id(self.model))
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """transformers' inputs for one generation step, routed without statistics (`measure=False`): decoding
        needs none, and they are about half of each router's operators."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if not kwargs.get("output_router_logits"):
            inputs["measure"] = False
        return inputs

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, output_router_logits: bool | None = None,
                past_key_values: Cache | None = None, measure: bool = True,
                layer_k: torch.Tensor | _LayerK | None = None, **kwargs) -> SoftMoECausalLMOutput:
        """Logits (and HF-style shifted loss) for input_ids (B, S).

        Args:
            input_ids: (B, S) int64 ids of slots [start, start + S), start = cached length.
            attention_mask: optional (B, start + S) 0/1 over the cached and new slots, 1 = real token;
                left and/or right padding, no holes (ValueError). Becomes GPT's attention_mask (module
                docstring); padding slots' logits are meaningless and the caller ignores them.
            cache: a transformers Cache; a DynamicCache is made when use_cache and none is given.
                recent transformers (5.24) passes it as `cache`, older releases as `past_key_values`; either
                name is accepted (not both), and the output carries it under the installed release's name.
            labels: (B, S) int64; the loss predicts labels[:, 1:] from positions [:-1], -100 ignored.
            logits_to_keep: 1 = last position only (what generate asks for); 0 = all.
            output_router_logits: return `aux_loss` and `router_logits` and, with labels, add
                config.router_aux_loss_coef * aux_loss to `loss` (Mixtral's convention); None = the config's.
            measure: False skips the routers' aux losses and statistics (GPT.forward's `measure`; inference
                only). `generate` passes False (prepare_inputs_for_generation); a direct call measures.
            layer_k: optional (L,) budget k_l precomputed for inference (GPT.forward's `layer_k`); `generate`
                passes them, computed once.
            **kwargs: ignored (transformers passes e.g. return_dict), except `position_ids`, which must be
                None: positions come from attention_mask. It is kept out of the signature on purpose, since
                generate builds position_ids only for models whose forward names it.
        Returns:
            SoftMoECausalLMOutput (a MoeCausalLMOutputWithPast) with (B, S, V) float32 logits, the cache and the
            layers' routing_stats; with output_router_logits also aux_loss (0-d float32) and router_logits
            (one (B * S, E) tensor per MoE layer).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if kwargs.get("position_ids") is not None:
            raise ValueError("position_ids is not supported by SoftMoEForCausalLM: positions are derived from "
                             "attention_mask (each row's first real token is position 0); pass attention_mask")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        start = 0 if cache is None else cache.get_seq_length()
        pad_mask = None
        if attention_mask is not None:
            shape = (input_ids.shape[0], start + input_ids.shape[1])
            if tuple(attention_mask.shape) != shape or not bool(attention_mask.all()):
                pad_mask = check_pad_mask(attention_mask, shape, name="attention_mask")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        view = None if cache is None else _CacheView(cache)
        targets = None
        if labels is not None:
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        last_only = logits_to_keep == 1 and labels is None
        out = self.model(input_ids, targets=targets, cache=view, last_only=last_only, attention_mask=pad_mask,
                         output_router_logits=output_router_logits, measure=measure,
                         layer_k=_own_layer_k(layer_k, self.model))
        loss, aux_loss = out.loss, None
        if output_router_logits:
            aux_loss = out.aux_loss
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return SoftMoECausalLMOutput(loss=loss, aux_loss=aux_loss, logits=out.logits,
                                     router_logits=out.router_logits, routing_stats=out.routing,
                                     **{_OUTPUT_CACHE_FIELD: cache})


def register() -> None:
    """Make "softmoe" known to AutoConfig / AutoModelForCausalLM in this process (idempotent).

    Needed only to load an exported folder with the Auto classes without trust_remote_code.
    """
    AutoConfig.register(SoftMoEConfig.model_type, SoftMoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(SoftMoEConfig, SoftMoEForCausalLM, exist_ok=True)

