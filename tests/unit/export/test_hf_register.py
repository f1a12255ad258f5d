"""`import softmoe` registers the "softmoe" model type with transformers (fresh interpreters), without
importing torch or transformers itself; `softmoe lm-eval` runs lm-eval's own CLI on an exported folder.

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


def test_import_softmoe_is_light():
    done = run_python("import sys, softmoe; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("code", [
    # softmoe first: the import hook registers when transformers loads.
    "import sys, softmoe\nfrom transformers import AutoModelForCausalLM\n"
    "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)",
    # AutoConfig alone, through the lazy top-level transformers module.
    "import sys, softmoe, transformers\nprint(type(transformers.AutoConfig.from_pretrained(sys.argv[1])).__name__)",
    # transformers first: import softmoe registers at once.
    "import sys, transformers, softmoe\nprint(type(transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)",
])
def test_import_softmoe_then_auto_classes_load_the_folder(exported, code):
    done = run_python(code, str(exported))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] in ("SoftMoEForCausalLM", "SoftMoEConfig")


def test_without_softmoe_transformers_does_not_know_the_type(exported):
    done = run_python("import sys\nfrom transformers import AutoConfig\nAutoConfig.from_pretrained(sys.argv[1])",
                      str(exported))
    assert done.returncode != 0 and "softmoe" in done.stderr


def test_lm_eval_cli_on_an_exported_folder(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the dev extra)")
    from benchmarks.crosscheck_lm_eval import task_yaml
    from softmoe.data.tokenizer import train_bpe
    from softmoe.eval.downstream import evaluate_items
    from softmoe.eval.tasks import TASKS, load_rows, task_path

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

    cli = ("import sys\nfrom softmoe.cli import main\nsys.exit(main(sys.argv[1:]))")
    done = run_python(cli, "lm-eval", "run", "--model", "hf", "--model_args",
                      f"pretrained={folder},backend=causal,dtype=float32", "--tasks", name,
                      "--include_path", str(tmp_path / "tasks"), "--limit", "4", "--batch_size", "2",
                      "--output_path", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"][name]
    ours = evaluate_items(model.model, tok, "arc_easy", [TASKS["arc_easy"].build(r) for r in rows], batch_size=2)
    assert (results["acc,none"], results["acc_norm,none"]) == (ours.acc, ours.acc_norm)
