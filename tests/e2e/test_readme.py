"""The README's quick tour, pasted as it is, and its command block, in order, after `make run`, on the tiny preset
with the same paths.

`make run` is `softmoe main --preset demo --out runs/demo`; here it is `--preset tiny`, and every `demo`
config, preset and run name becomes its `tiny` twin (configs/demo/softmoe.yaml -> configs/tiny/softmoe.yaml,
runs/demo/demo-softmoe -> runs/demo/tiny-softmoe). A line the test cannot run here is listed in SKIPPED with the
test that covers it; a new README line that is neither run nor listed fails the test.

Run: .venv/bin/python -m pytest -q tests/e2e/test_readme.py
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from softmoe.cli import main

REPO = Path(__file__).resolve().parents[2]

SKIPPED = {  # the README line's start -> why it does not run here
    "softmoe lm-eval": "T is a placeholder task; tests/unit/export/test_hf_register.py runs the passthrough",
    "softmoe convert": "MIXTRAL_DIR is a placeholder; tests/unit/convert/test_from_hf.py converts a tiny model",
    "softmoe data fetch": "needs the network; tests/unit/data/test_fetch.py",
    "torchrun": "tests/e2e/test_distributed_cli.py runs this launch",
}
# Added on the tiny preset to keep the test short (the README's numbers are for the demo preset).
EXTRA = {"softmoe eval": ["--limit", "4", "--splits", "val"]}


def readme_commands() -> list[str]:
    """The lines of the README's bash block that follows `make run`'s description."""
    text = (REPO / "README.md").read_text()
    start = text.index("After `make run`")
    block = text[text.index("```bash\n", start) + len("```bash\n"):]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def on_tiny(line: str) -> list[str]:
    """`line` as argv for softmoe.cli.main, on the tiny preset (the leading `softmoe` dropped)."""
    line = re.sub(r"configs/demo/(\w+)\.yaml", lambda m: str(REPO / "configs" / "tiny" / f"{m.group(1)}.yaml"), line)
    line = line.replace("configs/studies/", f"{REPO / 'configs' / 'studies'}/")
    line = re.sub(r"\bdemo-(softmoe|topk|remoe)", r"tiny-\1", line)
    argv = shlex.split(line, comments=True)
    assert argv[0] == "softmoe", line
    return argv[1:]


def quick_tour() -> str:
    """The README's Python block under "## Quick tour"."""
    text = (REPO / "README.md").read_text()
    start = text.index("```python\n", text.index("## Quick tour")) + len("```python\n")
    return text[start:text.index("```", start)]


def test_the_quick_tour_runs_as_pasted():
    namespace: dict = {}
    exec(compile(quick_tour(), "README.md quick tour", "exec"), namespace)
    active = namespace["routing"].active_per_token()
    assert 1 <= int(active.min()) and int(active.max()) <= 4  # the comment's "1 to 4 experts each"
    assert namespace["y"].shape == (4, 128, 256)


def test_every_readme_line_is_run_or_listed():
    for line in readme_commands():
        assert line.startswith("softmoe ") or any(line.startswith(skip) for skip in SKIPPED), line


def test_readme_block_runs_in_order_after_make_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOFTMOE_DATA_DIR", str(tmp_path / "data"))
    assert main(["main", "--preset", "tiny", "--out", "runs/demo", "--quiet"]) == 0  # make run, on tiny
    ran = []
    for line in readme_commands():
        if any(line.startswith(skip) for skip in SKIPPED):
            continue
        argv = on_tiny(line)
        argv += EXTRA.get(f"softmoe {argv[0]}", [])
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, f"{line}\n-> {argv}\n{captured.out[-2000:]}\n{captured.err[-2000:]}"
        ran.append(argv[0])
    assert ran.count("train") == 4 and {"generate", "eval", "export", "compare", "demo"} <= set(ran)
    # the extension line continued the main job's run; export wrote next to it
    summary = (tmp_path / "runs" / "demo" / "tiny-softmoe" / "summary.json").read_text()
    assert '"step": 240' in summary
    assert (tmp_path / "hf" / "demo" / "softmoe_manifest.json").is_file()
