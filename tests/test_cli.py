"""The command line: every job is listed, and user errors end in one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sammix.cli import main

SUBCOMMANDS = ["prepare", "train", "evaluate", "predict", "export", "experiment", "demo"]


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "sammix.cli", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_train_contract_options_exist():
    result = subprocess.run([sys.executable, "-m", "sammix.cli", "train", "--help"], capture_output=True, text=True,
                            check=True)
    for option in ["--data", "--cls-only-data", "--labeled", "--seed", "--out", "--epochs", "--window",
                   "--backbone", "--device"]:
        assert option in result.stdout


def test_evaluate_on_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err and "not a sammix run folder" in err


def test_bad_window_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "somewhere", "--window", "40"])
    assert "LEVEL,WIDTH" in capsys.readouterr().err
