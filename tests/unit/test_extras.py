"""Optional dependencies: a missing one is a one-line message naming the extra that installs it.

Run: .venv/bin/python -m pytest -q tests/unit/test_extras.py
"""

from __future__ import annotations

import sys

import pytest

from softmoe.cli import main
from softmoe.common.extras import MissingExtra, require
from softmoe.train.metrics import MetricsWriter


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"plotting needs matplotlib, .* pip install 'softmoe\[viz\]'"):
        require("matplotlib", "viz", "plotting")
    assert require("yaml", "viz", "x").__name__ == "yaml"


def test_report_plot_without_matplotlib(monkeypatch, tmp_path):
    from softmoe.studies.report import plot_losses

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"softmoe\[viz\]"):
        plot_losses([], tmp_path / "loss.png")


@pytest.mark.parametrize("argv", [["export", "--checkpoint", "x", "--out", "y"],
                                  ["convert", "--checkpoint", "x", "--out", "y"]])
def test_export_and_convert_without_transformers(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'softmoe[hf]'" in err and err.startswith(f"softmoe {argv[0]}:")


def test_tensorboard_missing_is_a_note_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    notes: list[str] = []
    writer = MetricsWriter(tmp_path, tensorboard=True, report=notes.append)
    writer.write({"step": 1, "split": "train", "loss": 1.0})
    writer.close()
    assert any("softmoe[viz]" in n for n in notes) and (tmp_path / "metrics.jsonl").is_file()


def test_version(capsys):
    import softmoe

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"softmoe {softmoe.__version__}"
