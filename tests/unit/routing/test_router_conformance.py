"""Every registered router passes the router template's contract (tests/unit/routing/conformance.py):
class contract, routing record and statistics, the dense reference for every expert implementation, batch
invariance and token-by-token decoding, padding, KV-cache decoding in a GPT, gradients, bad input and config.

A new router is covered by registering it: the default case below is built for every name in ROUTERS.
EXTRA crosses the checks with options that change a router's code path; a router's own rule (its weights
against a definition-level oracle, its special losses) stays in its own test file.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_router_conformance.py
"""

from __future__ import annotations

import pytest

from softmoe.routing import ROUTERS
from tests.unit.routing.conformance import CHECKS, Case

EARLIER = dict(alpha=0.1, truncation="min_weight", min_weight=0.05)  # SoftMoE's rule before the paper's

# Options that take another branch of a router's code: each is run through every check.
EXTRA = {
    "softmoe": [
        Case("softmoe", 2.0, mean_k=1.3),
        Case("softmoe", 1.5, dict(max_active=2, threshold=0.5)),
        Case("softmoe", 2.0, dict(EARLIER, combine="mask_softmax")),
        Case("softmoe", 2.0, dict(EARLIER, combine="mask_softmax_raw")),
        Case("softmoe", 2.5, dict(EARLIER, combine="p", max_active=2, alpha=0.5), mean_k=3.3),
        Case("softmoe", 2.0, dict(learn_k=True, learn_alpha=True)),
        Case("softmoe", 2.0, dict(loss_free_bias=True)),
        Case("softmoe", 1.5, dict(combine="raw_p_norm")),
    ],
    "topk": [
        Case("topk", 1.0, dict(normalize=False)),
        Case("topk", 2.0, dict(normalize=False, loss_free_bias=True)),
    ],
    "topp": [
        Case("topp", 2.0, dict(p=0.7, normalize=True)),
        Case("topp", 2.0, dict(p=0.9, max_active=3)),
    ],
    "null": [
        Case("null", 4.0, dict(num_null=8)),
        Case("null", 3.0, dict(num_null=4, normalize=False)),
    ],
    "remoe": [
        Case("remoe", 2.0, dict(max_active=3)),
        Case("remoe", 8.0, dict(lambda_init=0.5)),
    ],
    "expert_choice": [
        Case("expert_choice", 3.0, dict(group_size=5)),
        Case("expert_choice", 0.5, dict(capacity_factor=1.5, group_size=4)),
    ],
}

CASES = [case for name in ROUTERS for case in [Case(name), *EXTRA.get(name, [])]]


def test_every_registered_router_is_covered():
    assert {case.router for case in CASES} == set(ROUTERS)
    assert set(EXTRA) <= set(ROUTERS)


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_router_conformance(case, check):
    check(case)
