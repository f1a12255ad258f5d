"""`import softmoe` is cheap and has no side effects (no import hook, no torch / transformers / matplotlib); an
exported folder loads with the Auto classes after `softmoe.register_hf()` or with trust_remote_code=True (its
config.json's auto_map) without importing softmoe (fresh interpreters); `softmoe lm-eval` runs lm-eval's own CLI
on an exported folder.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:xdist tests/unit/export/test_hf_register.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softmoe.model import ModelConfig
from softmoe.export.checkpoint import hf_tokenizer
from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM

ROOT = Path(__file__).resolve().parents[3]
TINY = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, d_expert=16,
                   k=2.0, max_seq_len=64)


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("exported")
    SoftMoEForCausalLM(SoftMoEConfig.from_model_config(TINY)).save_pretrained(out)
    return out


def test_import_softmoe_is_light_and_has_no_side_effects():
    code = ("import sys\nbefore = list(sys.meta_path), set(sys.modules)\nimport softmoe\n"
            "assert sys.meta_path == before[0], 'import hook installed'\n"
            "print(sorted(m for m in set(sys.modules) - before[1] if not m.startswith('softmoe')))\n"
            "print(softmoe.soft_topk.__module__, softmoe.MoELayer.__name__, softmoe.SoftMoEBudget.__name__)")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    imported, names = done.stdout.strip().splitlines()
    assert not {"torch", "transformers", "matplotlib", "numpy"} & set(eval(imported))
    assert names == "softmoe.ops.lapsum MoELayer SoftMoEBudget"  # the names load on first use


def test_every_public_name_resolves():
    import softmoe

    for name in softmoe.__all__:
        assert getattr(softmoe, name) is not None, name
    assert softmoe.SoftMoEForCausalLM is SoftMoEForCausalLM and callable(softmoe.load_model)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        softmoe.nope  # noqa: B018


@pytest.mark.parametrize("code", [
    "import sys, softmoe\nsoftmoe.register_hf()\nfrom transformers import AutoModelForCausalLM\n"
    "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)",
    "import sys, transformers\nfrom softmoe.export import register\nregister()\n"
    "print(type(transformers.AutoConfig.from_pretrained(sys.argv[1])).__name__)",
])
def test_register_then_auto_classes_load_the_folder(exported, code):
    done = run_python(code, str(exported))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] in ("SoftMoEForCausalLM", "SoftMoEConfig")


def test_trust_remote_code_loads_the_folder_without_importing_softmoe(exported, tmp_path):
    assert json.loads((exported / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_softmoe.SoftMoEForCausalLM"
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "print(type(m).__module__, type(m).__name__)")
    done = run_python(code, str(exported), env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "softmoe.export.hf SoftMoEForCausalLM"  # our class, not a copy


def test_without_registration_transformers_does_not_know_the_type(exported):
    code = "import sys, softmoe\nfrom transformers import AutoConfig\nAutoConfig.from_pretrained(sys.argv[1])"
    done = run_python(code, str(exported))
    assert done.returncode != 0 and "trust_remote_code" in done.stderr


@pytest.fixture
def arc_folder(tmp_path):
    """(exported folder with its tokenizer, the local ARC-Easy task name, the tasks dir, model, tokenizer, rows)."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the dev extra)")
    from benchmarks.crosscheck_lm_eval import task_yaml
    from softmoe.data.tokenizer import train_bpe
    from softmoe.eval.tasks import load_rows, task_path

    try:
        rows = load_rows("arc_easy", 4)
        data_file = sorted(task_path("arc_easy").glob("*.arrow"))[0]
    except (FileNotFoundError, IndexError) as err:
        pytest.skip(f"ARC-Easy data not available: {err}")
    texts = [f"Question: {r['question']}\nAnswer: {t}" for r in rows for t in r["choices"]["text"]] * 3
    tok = train_bpe(texts, vocab_size=TINY.vocab_size)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    model = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(TINY)).eval()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    hf_tokenizer(tmp_path / "tokenizer.json").save_pretrained(folder)
    name, text = task_yaml("arc_easy", data_file, cache_dir=tmp_path / "cache")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{name}.yaml").write_text(text)
    return folder, name, tmp_path / "tasks", model, tok, rows


def test_lm_eval_cli_on_an_exported_folder(arc_folder, tmp_path):
    from softmoe.eval.downstream import evaluate_items
    from softmoe.eval.tasks import TASKS

    folder, name, tasks, model, tok, rows = arc_folder
    cli = ("import sys\nfrom softmoe.cli import main\nsys.exit(main(sys.argv[1:]))")
    done = run_python(cli, "lm-eval", "run", "--model", "hf", "--model_args",
                      f"pretrained={folder},backend=causal,dtype=float32", "--tasks", name,
                      "--include_path", str(tasks), "--limit", "4", "--batch_size", "2",
                      "--output_path", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"][name]
    ours = evaluate_items(model.model, tok, "arc_easy", [TASKS["arc_easy"].build(r) for r in rows], batch_size=2)
    assert (results["acc,none"], results["acc_norm,none"]) == (ours.acc, ours.acc_norm)


def test_the_docs_lm_eval_python_snippet_runs_in_a_fresh_interpreter(arc_folder):
    """docs/evaluation.md's `HFLM` snippet, pasted, with the tiny folder in place of hf/demo-softmoe and 4 items."""
    folder, name, tasks, *_ = arc_folder
    text = (ROOT / "docs" / "evaluation.md").read_text()
    snippet = next(block for block in text.split("```python\n")[1:] if "simple_evaluate" in block).split("```")[0]
    for old, new in (('"hf/demo-softmoe"', repr(str(folder))), ('include_path="tasks"', f"include_path={str(tasks)!r}"),
                     ("bootstrap_iters=0,", "bootstrap_iters=0, limit=4,")):
        assert old in snippet, old
        snippet = snippet.replace(old, new)
    done = run_python(snippet)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "acc,none" in done.stdout
