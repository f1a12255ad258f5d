"""The router contract as plain check functions, shared by the registry-wide suite and the registry test.

Each `check_*` takes a `Case` (a registered router name, k, options, an optional budget k_l) and fails with
an AssertionError when the router breaks the template's contract. `test_router_conformance.py` runs every
check on every registered router; `test_router_registry.py` runs them on a router defined in the test.

Shape legend: T tokens, D d_model, E experts.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import pytest
import torch

from softmoe.layers import MoELayer
from softmoe.model import GPT, ModelConfig
from softmoe.routing import ROUTERS, BudgetRouter, DispatchOverflow, GateRouter, build_router, router_class
from tests.reference import dense_moe as ref
from tests.reference.invariance import assert_batch_and_decoding_invariant

D, H, E = 16, 32, 8
SHARED_STATS = ("k", "active_experts_mean", "active_experts_hist", "expert_load", "load_balance_loss",
                "z_loss")


@dataclass(frozen=True)
class Case:
    """One router configuration under test: `router` with `k` and `options`, routed with `mean_k` (budget
    routers only) and its gate scaled by `scale` (a sharper gate spreads the per-token counts)."""

    router: str
    k: float = 2.0
    options: dict = field(default_factory=dict)
    mean_k: float | None = None
    scale: float = 3.0

    @property
    def id(self) -> str:
        extra = [f"{key}={value}" for key, value in self.options.items()]
        extra += [] if self.mean_k is None else [f"mean_k={self.mean_k}"]
        return "-".join([self.router, f"k{self.k:g}", *extra])


def make_layer(case: Case, impl: str = "padded", seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, H, E, router=case.router, k=case.k, experts_impl=impl, **case.options)
    with torch.no_grad():
        layer.router.gate.weight.mul_(case.scale)
    return layer


def budget_kwargs(case: Case) -> dict:
    """{"mean_k": k_l} for a case routed with a budget, else {} (routers without one take no mean_k)."""
    return {} if case.mean_k is None else {"mean_k": torch.tensor(case.mean_k)}


def router_kwargs(case: Case) -> dict:
    """{"k": k_l} for a router called directly with a budget (the one router call signature), else {}."""
    return {} if case.mean_k is None else {"k": torch.tensor(case.mean_k)}


def layer_fn(case: Case, layer: MoELayer):
    """`layer` with this case's budget k_l bound, called as layer(x, ...)."""
    return functools.partial(layer, **budget_kwargs(case))


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def check_class_contract(case: Case) -> None:
    """The registry entry answers every question code outside routing/ asks instead of the name."""
    cls = router_class(case.router)
    assert ROUTERS[case.router] == (cls.config_class, cls) and cls.name == case.router
    assert issubclass(cls, GateRouter)
    assert cls.uses_budget == issubclass(cls, BudgetRouter)
    assert isinstance(cls.causal, bool) and isinstance(cls.fixed_active_experts, bool)
    assert isinstance(cls.label, str) and cls.label and isinstance(cls.marker, str) and cls.marker
    assert f"={case.k:g} of {E}" in cls.describe(case.k, E)
    assert ("fixed soft mass k" in cls.describe(case.k, E, learned=False)) == cls.uses_budget
    cls.config_class.check_k(case.k, E)  # the model config's coarse check accepts the case's k
    # One call signature for every router: router(x_TD, mask_T=None, k=None, measure=True), no override.
    assert list(inspect.signature(cls.forward).parameters) == ["self", "x_TD", "mask_T", "k", "measure"]
    assert cls.forward is GateRouter.forward


def check_routing_record_and_stats(case: Case) -> None:
    """One ragged, expert-sorted record of real pairs; the shared stats, detached and consistent; a 0-d
    differentiable float32 aux loss; fp32 logits even under bf16 autocast."""
    layer = make_layer(case)
    x_TD = torch.randn(21, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.router(x_TD, **router_kwargs(case))
    routing = out.routing
    assert out.logits_TE.dtype == torch.float32 and out.logits_TE.shape[0] == 21
    assert routing.num_experts == E and int(routing.counts_E.sum()) == routing.token_N.numel()
    assert bool((routing.expert_N[1:] >= routing.expert_N[:-1]).all())  # sorted by expert
    pairs = routing.token_N * E + routing.expert_N
    assert pairs.unique().numel() == pairs.numel()  # no (token, expert) pair twice
    assert torch.isfinite(routing.weight_N).all() and routing.weight_N.dtype == torch.float32
    for name in SHARED_STATS:
        assert name in out.stats, name
    assert all(not t.requires_grad for t in out.stats.values())
    hist = out.stats["active_experts_hist"]
    assert hist.shape == (E + 1,) and float(hist.sum()) == 21
    realised = float(routing.active_per_token().float().mean())
    assert out.stats["active_experts_mean"] == pytest.approx(realised, abs=1e-5)
    assert out.aux_loss.dim() == 0 and out.aux_loss.dtype == torch.float32 and torch.isfinite(out.aux_loss)
    if case.mean_k is not None:
        assert out.stats["k"] == pytest.approx(case.mean_k)


def check_dense_reference(case: Case) -> None:
    """For every expert implementation the layer equals the naive dense MoE over the router's own weights:
    every expert on every token, y_t = sum_e w_te E_e(x_t)."""
    x = torch.randn(3, 7, D)
    for impl in ("padded", "grouped", "loop"):
        layer = make_layer(case, impl)
        weight_TE = layer.router(x.reshape(-1, D), **router_kwargs(case)).routing.dense_weights()
        y = layer(x, **budget_kwargs(case)).output
        torch.testing.assert_close(y, ref.dense_moe(layer, x, weight_TE), rtol=0, atol=1e-5, msg=impl)


def check_batch_and_decoding_invariance(case: Case) -> None:
    """A causal router's token output is the same in another batch and alone; a router flagged non-causal
    really is not (the flag is truthful both ways)."""
    layer = make_layer(case)
    if router_class(case.router).causal:
        assert_batch_and_decoding_invariant(layer_fn(case, layer), D)
    else:
        with pytest.raises(AssertionError):
            assert_batch_and_decoding_invariant(layer_fn(case, layer), D)


def check_padding_ignored(case: Case) -> None:
    """NaN padding changes no real token's output, no 0-d statistic, the histogram, the aux loss or any
    gradient's finiteness; padding gets zero output. (A non-causal router's groups may move with the padding: checked on its own.)"""
    if not router_class(case.router).causal:
        return
    layer = make_layer(case)
    x = torch.randn(2, 5, D)
    padded = torch.cat([x, torch.full((2, 3, D), float("nan"))], dim=1)  # garbage in the padding
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1).bool()
    y = layer(x, **budget_kwargs(case)).output
    y_pad = layer(padded, attention_mask=mask, **budget_kwargs(case)).output
    torch.testing.assert_close(y_pad[:, :5], y, rtol=0, atol=1e-6)
    assert torch.equal(y_pad[:, 5:], torch.zeros(2, 3, D))
    out = layer.router(x.reshape(-1, D), **router_kwargs(case))
    out_pad = layer.router(padded.reshape(-1, D), mask_T=mask.reshape(-1), **router_kwargs(case))
    for name, t in out.stats.items():
        if t.dim() == 0:
            assert out_pad.stats[name] == pytest.approx(float(out.stats[name]), abs=1e-6), name
    torch.testing.assert_close(out_pad.stats["active_experts_hist"], out.stats["active_experts_hist"])
    torch.testing.assert_close(out_pad.aux_loss, out.aux_loss, rtol=0, atol=1e-6)
    out_pad = layer(padded, attention_mask=mask, **budget_kwargs(case))
    (out_pad.output.sum() + out_pad.aux_loss).backward()  # the garbage reaches no gradient either
    for name, param in layer.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def check_incremental_decoding(case: Case) -> None:
    """In a GPT, KV-cache decoding (prefill, chunk, token by token) equals the full forward for a causal
    router; a non-causal one makes the model refuse a cache."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=31, d_model=D, n_layers=2, n_heads=2, num_experts=E, d_expert=8,
                         router=case.router, k=case.k, router_options=dict(case.options), max_seq_len=16)
    model = GPT(config).eval()
    assert model.causal == router_class(case.router).causal
    assert (model.budget is not None) == router_class(case.router).uses_budget
    if not model.causal:
        with pytest.raises(ValueError, match="not causal"):
            model.new_cache(1)
        return
    idx = torch.randint(0, 31, (2, 12))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(batch_size=2)
        pieces = [model(idx[:, :5], cache=cache).logits, model(idx[:, 5:8], cache=cache).logits]
        pieces += [model(idx[:, t:t + 1], cache=cache).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def check_gradients_reach_gate_and_experts(case: Case) -> None:
    """Output + aux loss backpropagate into the gate and into every expert matrix."""
    layer = make_layer(case, seed=1)
    x = torch.randn(4, 16, D)
    out = layer(x, **budget_kwargs(case))
    (out.output.square().sum() + out.aux_loss).backward()
    assert layer.router.gate.weight.grad is not None and layer.router.gate.weight.grad.abs().sum() > 0
    for name, param in layer.experts.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def check_bad_input_and_config(case: Case) -> None:
    """Clear errors naming the argument: wrong types are TypeError, bad values ValueError; an unknown option
    names itself; NaN in a real token is refused; mean_k is a 0-d tensor, and only for budget routers."""
    name, k, options = case.router, case.k, case.options
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['no_such_option'\]"):
        build_router(name, D, E, k, no_such_option=1.0, **options)
    with pytest.raises(ValueError, match="k=0.0"):
        build_router(name, D, E, 0.0, **options)
    with pytest.raises(ValueError, match=f"k={E + 1.0}"):
        build_router(name, D, E, E + 1.0, **options)
    with pytest.raises(TypeError, match="k must be a float, got str"):
        build_router(name, D, E, "2", **options)
    with pytest.raises(ValueError, match="num_experts=0"):
        build_router(name, D, 0, k, **options)
    with pytest.raises(TypeError, match="num_experts=8.0"):
        build_router(name, D, 8.0, k, **options)
    with pytest.raises(ValueError, match="d_model=0"):
        build_router(name, 0, E, k, **options)
    with pytest.raises(ValueError, match="lb_coef=nan"):
        build_router(name, D, E, k, **{**options, "lb_coef": float("nan")})
    with pytest.raises(ValueError, match="registered routers"):
        build_router(name + "_unknown", D, E, k)
    layer = make_layer(case)
    with pytest.raises(ValueError, match="not finite"):
        layer.router(torch.full((2, D), float("nan")), **router_kwargs(case))
    if router_class(name).uses_budget:
        with pytest.raises(ValueError, match="k must be a 0-d tensor"):
            layer(torch.randn(1, 2, D), mean_k=torch.tensor([k, k]))
    else:
        with pytest.raises(ValueError, match="takes no budget k_l .uses_budget=False.; k must be None"):
            layer(torch.randn(1, 2, D), mean_k=torch.tensor(k))


def _with_options(case: Case, **options) -> Case:
    return Case(case.router, case.k, {**case.options, **options}, case.mean_k, case.scale)


def check_static_dispatch(case: Case) -> None:
    """`dispatch_cap` (a static-size routing of T * cap pairs, no host sync) changes nothing but the padding:
    the real pairs are the exact routing's, in order; output, aux loss, statistics and every gradient are
    the exact layer's for every expert implementation, also when the padding pairs point at a NaN padding
    token; a cap the routing exceeds is a clear error, never a silent drop."""
    x = torch.randn(3, 7, D)
    x[0, 0] = float("nan")  # token 0, where padding pairs point, is a padding token holding garbage
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 0] = False
    exact_case, static_case = case, _with_options(case, dispatch_cap=E)
    exact = make_layer(exact_case).router(x.reshape(-1, D), mask_T=mask.reshape(-1), **router_kwargs(case))
    static = make_layer(static_case).router(x.reshape(-1, D), mask_T=mask.reshape(-1), **router_kwargs(case))
    n, r = exact.routing.num_pairs, static.routing
    assert r.num_pairs == 21 * E and torch.equal(r.counts_E, exact.routing.counts_E)
    for name in ("token_N", "expert_N", "weight_N"):
        assert torch.equal(getattr(r, name)[:n], getattr(exact.routing, name)), name
    assert not r.weight_N[n:].any() and bool((r.expert_N[n:] == E - 1).all()) and not r.token_N[n:].any()
    assert torch.equal(r.real_pairs(), torch.arange(21 * E) < n)
    torch.testing.assert_close(r.dense_weights(), exact.routing.dense_weights(), rtol=0, atol=0)
    for impl in ("padded", "grouped", "loop"):
        results = []
        for c in (exact_case, static_case):
            layer = make_layer(c, impl)
            x_in = x.clone().requires_grad_()
            out = layer(x_in, attention_mask=mask, **budget_kwargs(case))
            params = [p for p in layer.parameters() if p.requires_grad]
            grads = torch.autograd.grad(out.output.square().sum() + out.aux_loss, [x_in, *params], allow_unused=True)
            results.append((out, grads))
        (a, grads_a), (b, grads_b) = results
        torch.testing.assert_close(b.output, a.output, rtol=0, atol=1e-6, msg=impl)
        assert not b.output[0, 0].any() and torch.isfinite(b.output).all()
        torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=0, atol=1e-7)
        for name, t in a.stats.items():
            torch.testing.assert_close(b.stats[name], t, rtol=0, atol=1e-7, msg=name)
        for g_a, g_b in zip(grads_a, grads_b):
            assert (g_a is None) == (g_b is None)
            if g_a is not None:
                assert torch.isfinite(g_b).all(), impl
                torch.testing.assert_close(g_b, g_a, rtol=1e-5, atol=1e-6, msg=impl)
    try:
        smallest = make_layer(_with_options(case, dispatch_cap=1))
    except ValueError as err:  # a router whose config already knows every routing would exceed it (top-k, k > 1)
        assert n > 21 and "dispatch_cap=1 is below" in str(err), err
        smallest = None
    if smallest is not None and n > 21:  # some token keeps two experts or more: T * 1 pairs cannot hold them
        with pytest.raises(DispatchOverflow, match=rf"keeps {n} \(token, expert\) pairs, more than its static "
                                                   r"bound max_pairs=21 \(21 tokens x the router's dispatch_cap\)"):
            smallest.router(x.reshape(-1, D), mask_T=mask.reshape(-1), **router_kwargs(case))
    elif smallest is not None:
        out = smallest.router(x.reshape(-1, D), mask_T=mask.reshape(-1), **router_kwargs(case))
        assert torch.equal(out.routing.token_N[:n], exact.routing.token_N)
    for bad, error in ((0, ValueError), (E + 1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match=f"dispatch_cap={bad!r} must be"):
            make_layer(_with_options(case, dispatch_cap=bad))


def check_forward_stores_nothing(case: Case) -> None:
    """Results are return values: a training forward (and its backward) leaves every buffer and attribute of the
    layer and its submodules as they were (no counter, no cached tensor: the controllers read returned counts)."""
    layer = make_layer(case).train()
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    attrs = {name: dict(vars(m)) for name, m in layer.named_modules()}
    out = layer(torch.randn(2, 6, D), **budget_kwargs(case))
    (out.output.sum() + out.aux_loss).backward()
    assert {name for name, _ in layer.named_buffers()} == buffers.keys()
    for name, b in layer.named_buffers():
        assert torch.equal(b, buffers[name]), f"buffer {name} changed in forward"
    for name, m in layer.named_modules():
        now = vars(m)
        assert now.keys() == attrs[name].keys(), f"{name or 'layer'} gained attributes {set(now) - set(attrs[name])}"
        for key, value in now.items():
            if key.startswith("_") and key not in ("_parameters", "_buffers", "_modules"):
                continue  # torch's own hook dicts
            assert value is attrs[name][key] or key in ("_parameters", "_buffers", "_modules"), f"{name}.{key}"


def check_unmeasured_routing_is_the_same(case: Case) -> None:
    """measure=False (what `generate` uses) routes exactly as a measured forward and returns the same output,
    with aux_loss 0 and no statistics; where gradients are on it is refused (training needs the aux losses)."""
    layer = make_layer(case).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        measured = layer(x, **budget_kwargs(case))
        bare = layer(x, measure=False, **budget_kwargs(case))
        routed = layer.router(x.reshape(-1, D), measure=False, **router_kwargs(case)).routing
        reference = layer.router(x.reshape(-1, D), **router_kwargs(case)).routing
    assert torch.equal(bare.output, measured.output)
    assert float(bare.aux_loss) == 0.0 and dict(bare.stats) == {}
    assert torch.equal(routed.token_N, reference.token_N) and torch.equal(routed.weight_N, reference.weight_N)
    with pytest.raises(ValueError, match="measure=False"):
        layer(x, measure=False, **budget_kwargs(case))


CHECKS = (
    check_class_contract,
    check_unmeasured_routing_is_the_same,
    check_forward_stores_nothing,
    check_routing_record_and_stats,
    check_dense_reference,
    check_batch_and_decoding_invariance,
    check_padding_ignored,
    check_incremental_decoding,
    check_gradients_reach_gate_and_experts,
    check_bad_input_and_config,
    check_static_dispatch,
)
