"""Data-parallel training: 2 gloo processes on the CPU (torchrun through `sammix train --nproc 2`)
train like one process over the same global batch, write one complete run folder, and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sammix.data.synthetic import write_synthetic_dataset
from sammix.models.sammix import SamMix
from sammix.runfolder import RunFolder

pytestmark = pytest.mark.slow  # several real trainings of tiny models, in subprocesses


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("ddp"), "lits", n_cases=4, shape=(64, 64, 24))


def _train(data: Path, out: Path, nproc: int, batch: int, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "sammix.cli", "train", "--data", str(data), "--labeled", "4", "--size", "64",
           "--device", "cpu", "--cache-dir", str(out.parent / "cache"), "--out", str(out), "--nproc", str(nproc),
           "--batch-size", str(batch), "--set", "train.sam_samples_per_epoch=8", "--set", "train.val_max_slices=2",
           "--set", "train.val_fraction=0.25", "--set", "train.test_fraction=0.25",
           "--set", "train.self_train_rounds=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_processes_take_the_step_one_process_takes_over_the_same_global_batch(data, tmp_path):
    """The SAM branch alone (`prompt: full_box`: no classifier, no BatchNorm in training): two
    ranks of batch 2 log the losses of one process of batch 4, to float rounding (1e-6)."""
    extra = ("--epochs", "2", "--set", "model.prompt=full_box")
    one = _train(data, tmp_path / "one", 1, 4, *extra)
    two = _train(data, tmp_path / "two", 2, 2, *extra)
    assert [row["epoch"] for row in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["sam_loss"] == pytest.approx(a["sam_loss"], rel=1e-6)


def test_sammix_trains_data_parallel_into_one_complete_run_that_resumes(data, tmp_path):
    """Both branches under DDP: one run folder, written by rank 0, loadable; the classifier's
    BatchNorm sees each rank's half of the batch, so its loss is close to one process's, not equal.
    A run killed in its second epoch and started again ends with the uninterrupted run's weights."""
    extra = ("--epochs", "2", "--set", "train.cls_batch_size=4")
    reference = _train(data, tmp_path / "ref", 2, 2, *extra)
    single = _train(data, tmp_path / "one", 1, 4, "--epochs", "2", "--set", "train.cls_batch_size=8")
    assert reference[0]["sam_loss"] == pytest.approx(single[0]["sam_loss"], rel=0.05)
    assert reference[0]["cls_loss"] == pytest.approx(single[0]["cls_loss"], rel=0.25)
    run = RunFolder(tmp_path / "ref")
    for name in (RunFolder.CONFIG, RunFolder.SPLIT, RunFolder.LABELED, RunFolder.LOG, RunFolder.LAST, RunFolder.BEST):
        assert (run / name).is_file(), name
    assert sum(1 for row in run.log() if "epoch" in row) == 2  # one log, not one per rank
    model = SamMix.load(run.path, device="cpu")
    assert 0 < model.cfg.cls_threshold < 1  # the gate chosen on validation travels with the weights

    out = tmp_path / "killed"
    proc = _train(data, out, 2, 2, *extra, wait=False)
    deadline = time.time() + 300
    while not (out / RunFolder.LOG).is_file() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # in epoch 2
    proc.wait()
    assert len(RunFolder(out).log()) == 1
    _train(data, out, 2, 2, *extra)
    ours, ref = (RunFolder(p).load_weights(RunFolder.LAST)["model"] for p in (out, tmp_path / "ref"))
    for part in ("classifier", "sam"):
        for key in ref[part]:
            assert torch.equal(ours[part][key], ref[part][key]), f"{part}.{key} differs"


def test_a_self_training_round_runs_data_parallel_into_the_same_one_run(data, tmp_path):
    """The round after the supervised epochs under DDP (on by default for few labelled slices):
    one pseudo-label file, SAM's next epoch drawn from the labelled slices plus the kept answers,
    one log with the round's row, and loadable weights. The bars at 0 keep every non-empty answer."""
    rows = _train(data, tmp_path / "run", 2, 2, "--epochs", "1", "--set", "train.cls_batch_size=4",
                  "--set", "train.self_train_rounds=1", "--set", "train.self_train_epochs=1",
                  "--set", "train.pseudo_min_score=0", "--set", "train.pseudo_min_box_iou=0",
                  "--set", "train.pseudo_min_neighbour_dice=0")
    (round_row,) = [r for r in rows if "self_training_round" in r]
    assert [r["epoch"] for r in rows if "epoch" in r] == [1, 2]
    assert 0 < round_row["kept"] <= round_row["answered"] <= round_row["pool"]
    (second,) = [r for r in rows if r.get("epoch") == 2]
    labelled = len(json.loads((tmp_path / "run" / RunFolder.LABELED).read_text()))
    assert second["sam_slices"] == labelled + round_row["kept"]
    pseudo = torch.load(tmp_path / "run" / "pseudo-1.pt", weights_only=False)
    assert len(pseudo["index"]) == round_row["kept"]
    SamMix.load(tmp_path / "run", device="cpu")
