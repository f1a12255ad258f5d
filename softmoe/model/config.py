"""ModelConfig: every architectural choice of the decoder in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from softmoe.common.checks import check_choice, check_float, check_int
from softmoe.layers.moe import fine_grained
from softmoe.routing import ROUTERS, RouterConfig, RouterOptions, router_class, router_options
from softmoe.routing.budget import BudgetOptions, budget_options

__all__ = ["ModelConfig", "FFN_KINDS"]

FFN_KINDS = ("dense", "moe")


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-style decoder: embed -> n_layers x (attention, FFN) -> RMSNorm -> tied lm_head.

    Block i uses an MoE FFN when `ffn == "moe"` and (i + 1) % moe_every == 0, otherwise a dense
    SwiGLU FFN of width d_ff. The input embedding and the output head always share one matrix.
    """

    vocab_size: int = 8192  # V, from the tokenizer
    d_model: int = 256  # D, residual stream width
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # attention heads; d_model must divide evenly
    d_ff: int = 1024  # hidden width of the dense SwiGLU FFN (dense blocks)
    ffn: str = "moe"  # "dense" | "moe"
    moe_every: int = 1  # MoE FFN in every n-th block (1 = every block); others are dense
    num_experts: int = 8  # E, experts per MoE layer
    d_expert: int = 256  # hidden width of one SwiGLU expert
    router: str = "softmoe"  # a registered router: softmoe (LapSum soft top-k, learned k_l) | topk | topp | null ...
    k: float = 2.0  # softmoe: global budget K = mean over MoE layers of k_l (soft mass; realized count with
    # budget_options.realized); other routers: their config's k
    # The router's options (typed: `router_class(router).options_class`, e.g. SoftKOptions) and the budget's
    # (BudgetOptions; softmoe only: mode, realized, ...). A dict (a parsed YAML section, a saved config) is built
    # into them once, here; to_dict / dataclasses.asdict write them back as dicts with every default.
    router_options: RouterOptions | dict = field(default_factory=dict)
    budget_options: BudgetOptions | dict = field(default_factory=dict)
    num_shared_experts: int = 0  # always-on experts per MoE layer, each as wide as a routed expert (DeepSeekMoE)
    granularity: int = 1  # split each expert into g of width d_expert/g: E*g routed experts, budget k*g
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 256  # longest sequence (RoPE table and KV cache size)
    init_std: float = 0.02  # std of embedding and attention weights at init
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self) -> None:
        for name, low in [("vocab_size", 2), ("d_model", 1), ("n_layers", 1), ("n_heads", 1), ("d_ff", 1),
                          ("moe_every", 1), ("num_experts", 1), ("d_expert", 1), ("max_seq_len", 1),
                          ("num_shared_experts", 0), ("granularity", 1)]:
            check_int(name, getattr(self, name), low)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        check_choice("ffn", self.ffn, FFN_KINDS)
        if self.router is None:  # YAML reads a bare `null` as None
            raise ValueError("router=None: to select the null-expert router write the name as a string, "
                             "e.g. model.router='\"null\"' on the command line or router: \"null\" in YAML")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} must be one of the registered routers {sorted(ROUTERS)}")
        for name in ("rope_theta", "init_std", "norm_eps"):
            check_float(name, getattr(self, name), 0.0, open_low=True)
        object.__setattr__(self, "router_options", self._typed_router_options())
        object.__setattr__(self, "budget_options", self._typed_budget_options())
        if self.ffn == "moe":
            self._check_moe()

    def _typed_router_options(self) -> RouterOptions:
        """`router_options` as this router's options: a dict is built into them; another router's options (a
        `dataclasses.replace` that changes `router`) carry the options they changed from that router's defaults,
        as a dict of those options would."""
        options = self.router_options
        if isinstance(options, RouterOptions) and type(options) is not router_class(self.router).options_class:
            options = options.changed()
        if isinstance(options, dict):
            return router_options(self.router, **options)
        if not isinstance(options, RouterOptions):
            raise TypeError(f"router_options must be a dict or {router_class(self.router).options_class.__name__} "
                            f"for router={self.router!r}, got {type(options).__name__}")
        return options

    def _typed_budget_options(self) -> BudgetOptions:
        options = self.budget_options
        if isinstance(options, dict):
            return budget_options(**options)
        if not isinstance(options, BudgetOptions):
            raise TypeError(f"budget_options must be a dict or BudgetOptions, got {type(options).__name__}")
        return options

    def _check_moe(self) -> None:
        if self.moe_every > self.n_layers:
            raise ValueError(f"moe_every={self.moe_every} > n_layers={self.n_layers}: the model would have no MoE block")
        check_float("k", self.k, 0.0, open_low=True)
        router = router_class(self.router)
        router.config_class.check_k(self.k, self.num_experts)  # the router's rule for k, on the coarse (k, E)
        if router.uses_budget and not self.k < self.num_experts:  # a global budget K needs room below E
            raise ValueError(f"k={self.k} must be in (0, num_experts={self.num_experts}) "
                             f"for router={self.router!r}")
        fine_grained(self.num_experts, self.d_expert, self.k, self.granularity)  # d_expert % granularity
        rule = self.routed_router_config()  # router-specific checks
        if self.budget_options.realized and getattr(rule, "truncation", None) != "relative":
            raise ValueError("model.budget_options.realized=true steers the paper's relative threshold of each layer; "
                             f"it needs router=softmoe with router_options.truncation=relative (got router="
                             f"{self.router!r}, truncation={getattr(rule, 'truncation', None)!r})")

    # ---- derived, read-only ----

    def describe_routing(self) -> str:
        """The configured expert count for run listings and report labels, from the router class's `describe`:
        "k=2 of 8", "soft mass K=1.5 of 16, learned k_l" (the paper's rule: K is the soft top-k mass),
        "realized count K=1.5 of 16, learned k_l" (`budget_options: {realized: true}`), or "fixed soft mass
        k=1.5 of 16" for a budget that does not learn its k_l (`budget_options: {learnable: false}`)."""
        return router_class(self.router).describe(self.k, self.num_experts, learned=self.budget_options.learnable,
                                                  realized=self.budget_options.realized)

    @property
    def uses_budget(self) -> bool:
        """Whether the model owns a global Budget: MoE blocks whose router takes k_l (`uses_budget`)."""
        return self.ffn == "moe" and router_class(self.router).uses_budget

    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_model / n_heads (checked to divide evenly)."""
        return self.d_model // self.n_heads

    def is_moe_block(self, i: int) -> bool:
        """Whether block i (0-based) has an MoE FFN."""
        return self.ffn == "moe" and (i + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        """Block indices with an MoE FFN, in order (the budget's layer axis)."""
        return [i for i in range(self.n_layers) if self.is_moe_block(i)]

    # Fine-grained experts (DeepSeekMoE): the scaling lives in softmoe.layers.moe.fine_grained, which
    # MoELayer applies to the coarse (num_experts, d_expert, k) it is given. These are its results,
    # for the Budget (built over routed experts with K = k * g) and for counting.

    @property
    def routed_experts(self) -> int:
        """Experts the router chooses from: num_experts * granularity."""
        return fine_grained(self.num_experts, self.d_expert, self.k, self.granularity)[0]

    @property
    def routed_d_expert(self) -> int:
        """Hidden width of one routed (and one shared) expert: d_expert / granularity."""
        return fine_grained(self.num_experts, self.d_expert, self.k, self.granularity)[1]

    @property
    def routed_k(self) -> float:
        """The router's k (and the Budget's K): k * granularity."""
        return float(fine_grained(self.num_experts, self.d_expert, self.k, self.granularity)[2])

    def routed_router_config(self) -> RouterConfig:
        """The checked config of the MoE blocks' router (routed experts and k, `router_options`)."""
        return self.router_options.config(self.routed_experts, self.routed_k)

    def nominal_active_experts(self) -> float:
        """NOMINAL routed experts per token of one MoE block, in routed (fine) experts, shared excluded.

        From the config alone: the router config's `nominal_active_experts()` (k for top-k, the mean
        K for softmoe, k * E / (E + num_null) for null experts at uniform slot load, the configured k
        for top-p and ReMoE whose realised count is data dependent). The realised count is
        `stats["active_experts_mean"]`, and `softmoe.eval.flops.compute_cost` counts from it.
        """
        return self.routed_router_config().nominal_active_experts()

    def active_ffn_params(self) -> float:
        """NOMINAL FFN parameters a token uses, summed over blocks (SwiGLU: 3 matrices of D x width).

        A budget to match presets on before training, not a measurement: dense blocks count d_ff;
        MoE blocks count `nominal_active_experts()` routed experts plus `num_shared_experts` shared
        ones, each of width d_expert / granularity. Reported numbers (eval.json's `cost`, the compare
        tables) use the REALISED routing instead (`softmoe.eval.flops.compute_cost`).
        """
        dense = 3 * self.d_model * self.d_ff
        if self.ffn != "moe":
            return float(dense * self.n_layers)
        experts = self.nominal_active_experts() + self.num_shared_experts
        moe = 3 * self.d_model * self.routed_d_expert * experts
        return sum(moe if self.is_moe_block(i) else dense for i in range(self.n_layers))
