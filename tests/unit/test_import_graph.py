"""The import graph of softmoe: imports only run downward through the stages, and no modules import each
other.

Every module's imports are read with `ast` (module-level and function-level ones alike, `from . import x`
resolved), so a lazy import inside a function counts as much as one at the top of the file.

The stages, bottom to top (a module may import its own stage and the stages below it, never one above):

    common     softmoe/common/: helpers that import nothing from softmoe (checks, precision, progress bars,
               optional extras, where the presets live), shared by every stage
    data       corpora, tokenizer, dataset files, window loader
    ops        the LapSum soft top-k
    routing    routers, the ragged routing record, the budget, aux losses
    layers     the MoE layer, experts, dense FFN
    model      the GPT decoder, its config, loss, generation
    train      training loop, checkpoints, run directories
    parallel   data / expert parallelism: wraps train's loop, so it sits above train
    eval       measurement: perplexity, downstream tasks, FLOPs, the budget dial, the noise test, plot helpers
               (reads checkpoints: above train)
    convert    retrofitting transformers MoE models (uses layers and routing only; above eval by choice, as
               a separate front end)
    export     the transformers (HF) classes and checkpoint export: above model and train, whose checkpoints
               it reads
    studies    study orchestration and reports: compare (plan, run, results), run summaries, the study report,
               the run report, the main job
    cli        the command line, softmoe/cli/: every command, above everything it may launch (`softmoe train`
               starts the parallel launcher, `softmoe compare` a study)

A module's stage is its folder under softmoe/ (no module sits directly under softmoe/, and no file name is
exempt). Two modules sit outside the folder of their stage, each named in PLACED with the reason; nothing imports
softmoe.train.__main__, and only the cli stage imports the facade (checked):

    softmoe              the package facade: it names (lazily) every stage's main classes, so it sits on top
    softmoe.train.__main__   `python -m softmoe.train` (what torchrun launches) must live in softmoe/train/; it
                         only hands its arguments to the command line

Run: .venv/bin/python -m pytest -q tests/unit/test_import_graph.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import softmoe

PACKAGE_DIR = Path(softmoe.__file__).resolve().parent
STAGES = ("common", "data", "ops", "routing", "layers", "model", "train", "parallel", "eval", "convert",
          "export", "studies", "cli")
PLACED = {  # modules outside their stage's folder -> their stage (see the module docstring)
    "softmoe": "cli",
    "softmoe.train.__main__": "cli",
}

# Upward edges a branch must keep until another branch's change removes them, each with a comment naming that
# branch; a stale entry fails the test. Empty: model/hf.py's edges into train went with issue14a's move of the
# transformers classes to softmoe/export/.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def stage_of(module: str) -> str:
    """The stage of a softmoe module: its folder, or its entry in PLACED (see the module docstring)."""
    if module in PLACED:
        return PLACED[module]
    parts = module.split(".")
    assert parts[1] in STAGES, f"{module}: folder {parts[1]!r} is not a stage; add it to STAGES in this test"
    return parts[1]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The softmoe modules `module` imports anywhere in its file; `from pkg import sub` counts as pkg.sub when
    sub is a module, else as pkg."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "softmoe" or t.startswith("softmoe."))
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph = {}
    for module, path in modules.items():
        targets = imports_of(module, path, modules)
        unknown = {t for t in targets if t not in modules}
        assert not unknown, f"{module} imports modules that do not exist: {sorted(unknown)}"
        graph[module] = targets
    return graph


def upward_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    rank = {stage: i for i, stage in enumerate(STAGES)}
    return {(a, b) for a, targets in graph.items() for b in targets if rank[stage_of(b)] > rank[stage_of(a)]}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_has_a_stage():
    for module in all_modules():
        assert stage_of(module) in STAGES, module


def test_no_import_runs_upward():
    upward = upward_edges(import_graph())
    new = sorted(f"{a} ({stage_of(a)}) imports {b} ({stage_of(b)})" for a, b in upward - KNOWN_UPWARD)
    assert not new, "imports from a lower stage to a higher one:\n" + "\n".join(new)
    stale = sorted(KNOWN_UPWARD - upward)
    assert not stale, f"these known upward edges are gone: remove them from KNOWN_UPWARD: {stale}"


def test_no_import_cycles_between_modules():
    graph = import_graph()
    for a, b in KNOWN_UPWARD:  # a known upward edge closes its own cycle: checked above
        graph[a].discard(b)
    assert cycles(graph) == []


def test_common_imports_nothing_from_softmoe():
    graph = import_graph()
    for module in graph:
        if module.startswith("softmoe.common"):
            assert graph[module] == set(), module


def test_nothing_imports_the_placed_modules():
    graph = import_graph()
    for module, targets in graph.items():
        assert not targets & (set(PLACED) - {"softmoe"}), f"{module} imports {sorted(targets & set(PLACED))}"
    importers = sorted(m for m, targets in graph.items() if "softmoe" in targets)
    assert all(stage_of(m) == "cli" for m in importers), f"below the cli stage, {importers} import the facade"


def test_no_module_sits_directly_under_the_package():
    loose = sorted(path.name for path in PACKAGE_DIR.glob("*.py") if path.name != "__init__.py")
    assert not loose, f"modules directly under softmoe/ belong in a stage's folder: {loose}"


def test_the_checker_catches_upward_edges_and_cycles():
    # The checks above must be able to fail: a made-up graph with one upward edge and one cycle.
    graph = {"softmoe.data.a": {"softmoe.model.b"}, "softmoe.model.b": {"softmoe.data.a"},
             "softmoe.routing.c": {"softmoe.ops.d"}, "softmoe.ops.d": set()}
    assert upward_edges(graph) == {("softmoe.data.a", "softmoe.model.b")}
    assert cycles(graph) == [["softmoe.data.a", "softmoe.model.b"]]
    assert stage_of("softmoe.train.loop") == "train" and stage_of("softmoe.train.__main__") == "cli"
    assert stage_of("softmoe.common.progress") == "common" and stage_of("softmoe") == "cli"
    assert stage_of("softmoe.train.cli") == "train"  # no exemption by file name: a stage's cli.py is in that stage
