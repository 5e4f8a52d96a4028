"""The command line: every job is listed, and user errors end in one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sammix.cli import main

SUBCOMMANDS = ["prepare", "train", "evaluate", "predict", "suggest", "export", "experiment", "demo"]


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "sammix.cli", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_train_contract_options_exist():
    result = subprocess.run([sys.executable, "-m", "sammix.cli", "train", "--help"], capture_output=True, text=True,
                            check=True)
    for option in ["--data", "--cls-only-data", "--slice-labels", "--annotated-slices", "--labeled", "--seed",
                   "--out", "--epochs", "--window", "--backbone", "--device"]:
        assert option in result.stdout


def test_evaluate_on_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err and "not a sammix run folder" in err


def test_bad_window_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "somewhere", "--window", "40"])
    assert "LEVEL,WIDTH" in capsys.readouterr().err


def test_set_overrides_any_setting_with_its_type_checked():
    from sammix.config import RunConfig, apply_overrides
    from sammix.errors import SammixError

    base = RunConfig()
    cfg = apply_overrides(base, ["train.sam_samples_per_epoch=128", "model.cam_threshold=0.3",
                                 "train.lr_sam=1", "model.lora_targets=[attn.qkv]"])
    assert cfg.train.sam_samples_per_epoch == 128 and cfg.model.cam_threshold == 0.3
    assert cfg.train.lr_sam == 1.0 and isinstance(cfg.train.lr_sam, float)
    assert cfg.model.lora_targets == ["attn.qkv"]
    assert base == RunConfig()  # a changed copy: the config given is left as it was
    for bad in ["train.nope=1", "nope.epochs=1", "train.epochs", "train.epochs=many", "data.x=1"]:
        with pytest.raises(SammixError, match="--set"):
            apply_overrides(RunConfig(), [bad])


def test_evaluate_and_predict_change_only_inference_settings():
    from sammix.config import ModelConfig, with_inference_overrides
    from sammix.errors import SammixError

    assert with_inference_overrides(ModelConfig(), ["model.propagate=false"]).propagate is False
    with pytest.raises(SammixError, match="only inference settings"):
        with_inference_overrides(ModelConfig(), ["model.lora_rank=4"])  # would not match the weights


def test_train_rejects_a_bad_set_in_one_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "train.epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.epoch=3" in err


def test_the_runs_window_and_8_bit_as_stored_are_different_answers():
    from sammix.cli import build_parser
    from sammix.config import RUN_WINDOW

    for argv in (["evaluate", "--run", "r", "--data", "d", "--out", "m.json"], ["predict", "--run", "r", "x", "-o", "o"]):
        assert build_parser().parse_args(argv).window == RUN_WINDOW
        assert build_parser().parse_args([*argv, "--window", "none"]).window is None
        assert build_parser().parse_args([*argv, "--window", "40,400"]).window == (40.0, 400.0)
