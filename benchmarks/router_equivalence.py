"""Are the routers of this tree bitwise identical to those of another git revision?

For every router (and the option combinations that take other code paths) a layer is built from the same seed
under both trees; its initial state is compared, then the router runs once on the same inputs (with padding,
with and without a budget k_l, in training mode: gate noise and loss-free bias included) and its routing
weights, logits, aux loss, every statistic and every gradient are compared with torch.equal. State or statistics
this tree adds (a new buffer, a new logged value) are listed next to the case, not counted as differences; ones it
lacks are.

    .venv/bin/python benchmarks/router_equivalence.py --against main

The other revision's `softmoe/` is extracted with `git archive` into a temporary directory and imported from
there in a subprocess, so nothing in the working tree changes. Prints one line per case and exits 1 on a
difference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = [
    ("softmoe", 2.0, {}, None),
    ("softmoe", 2.0, {}, 1.3),
    ("softmoe", 2.0, dict(learn_k=True, gate_noise=0.3, loss_free_bias=True), None),
    ("softmoe", 2.0, dict(alpha=0.1, truncation="min_weight", combine="mask_softmax"), None),
    ("topk", 2.0, {}, None),
    ("topk", 1.0, dict(normalize=False, loss_free_bias=True), None),
    ("topp", 2.0, dict(p=0.7), None),
    ("null", 4.0, dict(num_null=8), None),
    ("null", 2.0, dict(normalize=False, lb_coef=0.5, z_coef=0.1), None),
    ("remoe", 2.0, dict(lambda_init=0.5), None),
    ("expert_choice", 2.0, dict(group_size=5), None),
]


def run_cases(out_path: str) -> None:
    """Build and run every case with the softmoe found on sys.path; save the results to `out_path`."""
    import torch

    from softmoe.layers import MoELayer

    results = {}
    for i, (name, k, options, mean_k) in enumerate(CASES):
        torch.manual_seed(i)
        layer = MoELayer(16, 32, 8, router=name, k=k, **options)
        init = {n: t.clone() for n, t in layer.state_dict().items()}
        with torch.no_grad():
            layer.router.gate.weight.mul_(3.0)  # spread the scores: variable counts per token
        x = torch.randn(21, 16, generator=torch.Generator().manual_seed(100 + i))
        mask = torch.ones(21, dtype=torch.bool)
        mask[-2:] = False
        torch.manual_seed(1000 + i)  # the gate noise's draw
        budget = {} if mean_k is None else {"mean_k": torch.tensor(mean_k, requires_grad=True)}
        out = layer.router(x, mask_T=mask, **budget)
        ((out.routing.dense_weights() * torch.arange(8.0)).sum() + out.aux_loss).backward()
        results[f"{i}-{name}-{options}-mean_k={mean_k}"] = {
            "init": init, "weights": out.routing.dense_weights().detach(), "logits": out.logits_TE.detach(),
            "aux_loss": out.aux_loss.detach(), "stats": dict(out.stats),
            "grads": {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None},
        }
    torch.save(results, out_path)


def _differences(this: dict, other: dict) -> tuple[list[str], list[str]]:
    """(differences, entries this tree adds): a new state entry (a controller's buffer) or statistic is listed,
    not a difference; entries missing here, a changed set of gradients, and any value that is not bitwise
    equal, are differences."""
    import torch

    bad = []
    added = [f"{field}.{n}" for field in ("init", "stats") for n in sorted(set(this[field]) - set(other[field]))]
    for field in ("init", "stats", "grads"):
        missing = set(other[field]) - set(this[field])
        if field == "grads" and set(this[field]) != set(other[field]):
            bad.append(f"{field} keys {sorted(set(this[field]) ^ set(other[field]))}")
            continue
        if missing:
            bad.append(f"{field} keys missing here {sorted(missing)}")
        bad += [f"{field}.{n}" for n in other[field] if n in this[field]
                and not torch.equal(this[field][n], other[field][n])]
    bad += [field for field in ("weights", "logits", "aux_loss") if not torch.equal(this[field], other[field])]
    return bad, added


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="main", help="the git revision to compare with (default: main)")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run the cases, save to this path
    args = parser.parse_args()
    if args.run:
        run_cases(args.run)
        return 0
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        other_src = Path(tmp) / "src"
        other_src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.against, "softmoe"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(other_src)], input=archive, check=True)
        paths = {"this tree": (REPO, Path(tmp) / "this.pt"), args.against: (other_src, Path(tmp) / "other.pt")}
        for where, (src, out) in paths.items():
            subprocess.run([sys.executable, __file__, "--run", str(out)], check=True, cwd=tmp,
                           env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
        this, other = (torch.load(out) for _, out in paths.values())
    failed = 0
    for case in this:
        bad, added = _differences(this[case], other[case])
        failed += bool(bad)
        new_state = f" (new here: {', '.join(added)})" if added else ""
        print(f"{case}: {'identical' if not bad else 'DIFFERS in ' + ', '.join(bad)}{new_state}")
    print(f"{len(this) - failed} of {len(this)} cases bitwise identical to {args.against}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
