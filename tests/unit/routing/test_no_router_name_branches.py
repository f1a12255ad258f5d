"""No code outside softmoe/routing/ branches on a router's name: it asks the router class (`router_class(name)`:
`uses_budget`, `causal`, `label`, `describe`, `fixed_active_experts`, `marker`, `config_class.check_k`).

Read with `ast` from every module outside routing/: a comparison of something named like a router (`router`,
`m.router`, `model["router"]`, ...) with a registered router's name, or a dict literal keyed by router names
or a set literal of them (a lookup table by name), is a branch on the name.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_no_router_name_branches.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import softmoe
from softmoe.routing import ROUTERS

PACKAGE_DIR = Path(softmoe.__file__).resolve().parent


def _mentions_router(node: ast.AST) -> bool:
    """Whether an expression reads something called router (a name, an attribute, a ["router"] key)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and "router" in sub.id:
            return True
        if isinstance(sub, ast.Attribute) and "router" in sub.attr:
            return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and "router" in sub.value:
            return True
    return False


def _router_names(node: ast.AST, names: set[str]) -> set[str]:
    """Registered router names written as string literals in `node` (itself, or the items of a literal
    tuple/list/set)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {item.value for item in items if isinstance(item, ast.Constant) and item.value in names}


def name_branches(source: str, filename: str, names: set[str]) -> list[str]:
    """`filename:line` of every branch on a router name in `source`."""
    found = []
    for node in sorted(ast.walk(ast.parse(source, filename=filename)), key=lambda n: getattr(n, "lineno", 0)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literal = set().union(*(_router_names(side, names) for side in sides))
            if literal and any(_mentions_router(side) for side in sides if not _router_names(side, names)):
                found.append(f"{filename}:{node.lineno} compares a router with {sorted(literal)}")
        elif isinstance(node, ast.Dict):
            keys = {key.value for key in node.keys if isinstance(key, ast.Constant) and key.value in names}
            if len(keys) >= 2:
                found.append(f"{filename}:{node.lineno} a dict keyed by router names {sorted(keys)}")
        elif isinstance(node, ast.Set) and len(_router_names(node, names)) >= 2:
            found.append(f"{filename}:{node.lineno} a set of router names {sorted(_router_names(node, names))}")
    return found


def test_no_code_outside_routing_branches_on_a_router_name():
    names = set(ROUTERS)
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if (PACKAGE_DIR / "routing") in path.parents:
            continue
        found += name_branches(path.read_text(), str(path.relative_to(PACKAGE_DIR.parent)), names)
    assert not found, "ask the router class instead (softmoe.routing.router_class):\n" + "\n".join(found)


def test_the_scan_finds_each_kind_of_branch():
    names = {"softmoe", "topk", "expert_choice"}
    source = '''
what = "budget K" if model.router == "softmoe" else "k"
if config["router"] in ("topk", "expert_choice"):
    pass
MARKERS = {"topk": "^", "softmoe": "o"}
if mine[0]["router"] != "topk":
    pass
ok = router == "dense" or name == "softmoe" or variants == ("softmoe", "topk")
fixed = {"dense", "topk", "expert_choice"}
'''
    found = name_branches(source, "example.py", names)
    assert [line.split()[0] for line in found] == ["example.py:2", "example.py:3", "example.py:5", "example.py:6",
                                                   "example.py:9"]
