"""The `lightcrl` command line as a new user meets it: usage errors, Ctrl-C, exit codes, help."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightcrl.app.cli import main
from lightcrl.app.experiment import ExperimentResult

CONFIG = Path(__file__).parents[1] / "configs" / "smoke.yaml"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trian"], "No such command 'trian'"),
        (["train", "--confg", "x.yaml", "--out", "run"], "No such option: --confg"),
        (["eval", "--run", "raw", "--task", "zeroshot"], "Missing option '--data'"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("Usage: lightcrl") and message in err, err


def test_boolean_flags_show_no_type_in_help(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite" in out and "<path>" in out  # typed options keep their type
    assert "<bool>" not in out, out


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "command, target, resume_words",
    [
        (["train", "--config", str(CONFIG)], "lightcrl.app.train.train", "last checkpoint"),
        (["embed", "--encoder", "toy-image", "--data", "csv:pairs.csv"], "lightcrl.embed.embed", "resume"),
        (["experiment", "grid.yaml"], "lightcrl.app.experiment.run_experiment", "continue"),
    ],
)
def test_ctrl_c_exits_130_with_one_line_on_how_to_resume(command, target, resume_words, tmp_path,
                                                         monkeypatch, capsys):
    monkeypatch.setattr(target, _interrupt)
    assert main([*command, "--out", str(tmp_path / "out")]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted") and resume_words in lines[0], lines


def test_ctrl_c_in_a_short_command_still_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lightcrl.app.report.build_report", _interrupt)
    assert main(["report", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_experiment_with_failed_cells_exits_non_zero(tmp_path, monkeypatch, capsys):
    table = tmp_path / "results.md"
    table.write_text("| cell |\n")

    def failing_grid(*args, **kwargs) -> ExperimentResult:
        return ExperimentResult(tmp_path, ["a"], [], {"b": "RuntimeError: boom"}, [], table,
                                tmp_path / "results.csv", [])

    monkeypatch.setattr("lightcrl.app.experiment.run_experiment", failing_grid)
    assert main(["experiment", "grid.yaml", "--out", str(tmp_path)]) == 1
    assert "failed: b: RuntimeError: boom" in capsys.readouterr().err


def test_usage_errors_of_click_itself_are_reported_too(monkeypatch, capsys):
    """Older typers raise click's exception classes rather than their vendored copies."""
    click_exceptions = pytest.importorskip("click.exceptions")

    def bad_usage(*args, **kwargs):
        raise click_exceptions.UsageError("no such thing")

    monkeypatch.setattr("lightcrl.app.train.train", bad_usage)
    assert main(["train", "--config", str(CONFIG), "--out", "run"]) == 2
    assert "Error: no such thing" in capsys.readouterr().err


def test_report_refuses_a_missing_folder_and_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "run directory not found" in err and "Traceback" not in err, err
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"")
    assert main(["report", str(tmp_path / "photos")]) == 2
    assert "not a lightcrl run" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]  # nothing written
