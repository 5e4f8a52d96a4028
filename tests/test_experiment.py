"""The experiment grid end to end on synthetic CT, and the U-Net baseline on its own."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sammix.cli import build_parser, main
from sammix.config import ModelConfig, PrepConfig, TrainConfig
from sammix.data.splits import split_cases
from sammix.data.synthetic import write_synthetic_dataset
from sammix.errors import SammixError
from sammix.evaluation.experiment import METHODS, ExperimentSpec, run_grid, spec_from_args
from sammix.models.baselines import BaselineRunConfig, NetConfig, SegNet
from sammix.training.baselines import train_baseline
from sammix.training.slices import load_sources

PREP = PrepConfig(window=None, size=64)  # 8-bit slices as they are; SAM resizes to its own 256
SMALL_UNET = NetConfig(arch="unet", channels=[8, 16, 32, 64], batch_size=8, lr=3e-3)
GRID_METHODS = ["unet", "unet-full", "sam-zeroshot", "sam-oracle", "sammix"]


def _mtimes(paths):
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One tiny grid run twice: first in two worker processes with a cell made to fail, then
    (failure removed) again in this process."""
    root = tmp_path_factory.mktemp("grid")
    train = write_synthetic_dataset(root / "train", "slices", n_cases=5, shape=(64, 64, 32), slice_step=8)
    cross = write_synthetic_dataset(root / "cross", "totalseg", n_cases=1, shape=(64, 64, 5), seed=50)
    spec = ExperimentSpec(
        train_data=[str(train)], out=str(root / "out"), test_data={"cross": str(cross)},
        methods=GRID_METHODS, ks=[2], seeds=[0], prep=PREP,
        train=TrainConfig(epochs=1, batch_size=2, cls_batch_size=16, sam_samples_per_epoch=2,
                          val_max_slices=1, device="cpu"),
        model=ModelConfig(), nets={"unet": SMALL_UNET}, cache_dir=str(root / "cache"), command="sammix experiment (test)",
    )
    # a run folder left by other settings: its cell must fail, the others must not care
    bad = root / "out" / "runs" / "unet-k2-s0"
    bad.mkdir(parents=True)
    (bad / "config.yaml").write_text("kind: baseline\nnet: {arch: unet}\ndata: [somewhere/else]\n")
    first = run_grid(replace(spec, jobs=2))
    out = Path(spec.out)
    kept = sorted(out.glob("runs/*/best.pt")) + sorted(out.glob("runs/*/eval/*.json"))
    before = _mtimes(kept)
    log_before = (out / "experiment.log").read_text()
    shutil.rmtree(bad)
    second = run_grid(spec)
    log = (out / "experiment.log").read_text()
    # a report of what is finished (in a copy), with one more k asked for than was trained
    shutil.copytree(out, root / "copy")
    no_train = run_grid(replace(spec, out=str(root / "copy"), ks=[2, 3], no_train=True))
    return {"spec": spec, "out": out, "first": first, "second": second, "before": before, "kept": kept,
            "log_before": log_before, "log": log, "no_train": no_train}


@pytest.mark.slow
def test_a_failing_cell_is_reported_and_the_others_finish(grid):
    first, out = grid["first"], grid["out"]
    assert first["failed"] == ["unet-k2-s0"]
    done = {s["cell"] for s in first["statuses"] if s["status"] == "done"}
    assert done == {"unet-full-s0", "sam-zeroshot", "sam-oracle", "sammix-k2-s0"}
    bad = next(s for s in first["statuses"] if s["cell"] == "unet-k2-s0")
    assert "other settings" in bad["error"]
    assert "FAILED" in grid["log_before"] and "unet-k2-s0" in grid["log_before"]
    assert grid["second"]["failed"] == []


@pytest.mark.slow
def test_no_train_reports_the_finished_cells_and_trains_none(grid):
    statuses = {s["cell"]: s for s in grid["no_train"]["statuses"]}
    assert sorted(grid["no_train"]["failed"]) == ["sammix-k3-s0", "unet-k3-s0"]
    assert "--no-train" in statuses["unet-k3-s0"]["error"]
    assert all(s["training"] in ("reused", "untrained") for s in statuses.values() if s["status"] == "done")
    assert not (grid["out"].parent / "copy" / "runs" / "unet-k3-s0" / "best.pt").exists()
    assert "sammix-k2-s0: reused finished run" in (grid["out"].parent / "copy" / "experiment.log").read_text()


@pytest.mark.slow
def test_report_folder_has_the_table_the_scores_and_the_figures(grid):
    out, spec = grid["out"], grid["spec"]
    report = (out / "report.md").read_text()
    for method in GRID_METHODS:
        assert sum(line.startswith(f"| {METHODS[method].label} |") for line in report.splitlines()) == 1, method
    assert "Dice train" in report and "HD95 cross" in report
    assert "## Where the Dice goes (SAM-Mix)" in report and "| sammix-k2-s0 | cross |" in report
    assert spec.command in report and "Wall time" in report
    for png in ("dice_boxplot.png", "qualitative.png", "cam.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png

    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    # one row per organ-present test slice per cell and test set
    train = load_sources(spec.train_data, PREP, Path(spec.cache_dir), masks=True)
    cross = load_sources([spec.test_data["cross"]], PREP, Path(spec.cache_dir), masks=True)
    split = split_cases(sorted(set(train.case)), 0.15, 0.15, seed=0)
    test = train.indices_for(split["test"])
    n_in = int((train.labels[test] > 0).sum())
    n_cross = int((cross.labels > 0).sum())
    assert n_in > 0 and n_cross > 0
    cells = json.loads((out / "experiment.json").read_text())["cells"]
    assert len(rows) == len(cells) * (n_in + n_cross)
    assert {r["test_set"] for r in rows} == {"train", "cross"}
    assert {r["case"] for r in rows if r["test_set"] == "train"} == set(split["test"])
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and float(r["hd"]) >= float(r["hd95"]) >= 0.0
    oracle = [float(r["dice"]) for r in rows if r["method"] == "sam-oracle"]
    zeroshot = [float(r["dice"]) for r in rows if r["method"] == "sam-zeroshot"]
    assert np.mean(oracle) > np.mean(zeroshot)  # the ground-truth box is the better prompt


@pytest.mark.slow
def test_running_the_grid_again_reuses_runs_and_scores(grid):
    log_new = grid["log"][len(grid["log_before"]):]
    for cell in ("unet-full-s0", "sammix-k2-s0"):
        assert f"{cell}: reused finished run" in log_new
        assert f"{cell}: trained" not in log_new
    assert "unet-k2-s0: trained" in log_new  # the cell that failed is retried
    assert _mtimes(grid["kept"]) == grid["before"]  # no weights and no score rewritten
    statuses = {s["cell"]: s for s in grid["second"]["statuses"]}
    assert statuses["sammix-k2-s0"]["training"] == "reused"
    assert statuses["sammix-k2-s0"]["train_seconds"] > 0  # the time recorded when it trained


def test_cli_options_resolve_to_a_grid(tmp_path):
    args = build_parser().parse_args([
        "experiment", "--train-data", "a/lits", "--test-data", "ts=b/totalseg", "--methods", "unet,sam-zeroshot,sammix",
        "--k", "5,50", "--seeds", "0,1", "--epochs", "3", "--out", str(tmp_path / "x"), "--window", "none",
        "--set", "train.sam_samples_per_epoch=64", "--set", "model.cam_threshold=0.3", "--jobs", "2"])
    spec = spec_from_args(args)
    names = [c.name for c in spec.cells()]
    assert names == ["unet-k5-s0", "unet-k5-s1", "unet-k50-s0", "unet-k50-s1", "sam-zeroshot",
                     "sammix-k5-s0", "sammix-k5-s1", "sammix-k50-s0", "sammix-k50-s1"]
    assert spec.prep.window is None and spec.train.epochs == 3 and spec.test_data == {"ts": "b/totalseg"}
    assert "--window none" in spec.command and "--k 5,50" in spec.command
    assert spec.train.sam_samples_per_epoch == 64 and spec.model.cam_threshold == 0.3 and spec.jobs == 2
    assert "--set train.sam_samples_per_epoch=64" in spec.command
    assert spec_from_args(build_parser().parse_args(spec.command.split()[1:])).cells() == spec.cells()

    bad = build_parser().parse_args(["experiment", "--train-data", "a", "--methods", "unet,nope", "--out", "x"])
    with pytest.raises(SammixError, match="nope"):
        spec_from_args(bad)
    assert main(["experiment", "--train-data", str(tmp_path), "--test-data", "nodir", "--out", str(tmp_path / "o")]) == 2


def test_parts_cover_the_grid_once():
    spec = ExperimentSpec(train_data=["a"], out="x", methods=["unet", "sam-zeroshot", "sammix"], ks=[5, 50],
                          seeds=[0, 1, 2])
    parts = [replace(spec, num_parts=4, part_id=i).my_cells() for i in range(4)]
    assert sorted((c for p in parts for c in p), key=spec.cells().index) == spec.cells()
    assert sum(len(p) for p in parts) == len(spec.cells()) and all(parts)
    assert replace(spec, report_only=True).my_cells() == []


def test_parts_merged_by_report_only_give_the_single_process_report(tmp_path):
    data = write_synthetic_dataset(tmp_path / "d", "slices", n_cases=5, shape=(64, 64, 32), slice_step=8)
    spec = ExperimentSpec(train_data=[str(data)], out=str(tmp_path / "one"), methods=["unet", "unet-full"],
                          ks=[2], seeds=[0, 1], prep=PREP, nets={"unet": SMALL_UNET}, cache_dir=str(tmp_path / "c"),
                          train=TrainConfig(epochs=1, sam_samples_per_epoch=2, device="cpu"), command="test")
    whole = run_grid(spec)
    parted = replace(spec, out=str(tmp_path / "parts"))
    runs = [run_grid(replace(parted, num_parts=2, part_id=i)) for i in range(2)]
    assert all(r["report"] is None for r in runs) and sum(r["n_cells"] for r in runs) == whole["n_cells"] == 4
    assert not (tmp_path / "parts" / "report.md").exists()
    merged = run_grid(replace(parted, report_only=True))
    assert merged["failed"] == [] and whole["failed"] == []
    assert (tmp_path / "parts" / "results.csv").read_text() == (tmp_path / "one" / "results.csv").read_text()
    table = [line for line in (tmp_path / "one" / "report.md").read_text().splitlines() if line.startswith("| U-Net")]
    assert table and all(line in (tmp_path / "parts" / "report.md").read_text() for line in table)


def test_unet_baseline_learns_on_synthetic_ct(tmp_path):
    data = write_synthetic_dataset(tmp_path / "d", "slices", n_cases=5, shape=(64, 64, 32), slice_step=4)
    cfg = BaselineRunConfig(prep=PREP, net=SMALL_UNET, data=[str(data)],
                            train=TrainConfig(labeled=0, epochs=6, seed=0, sam_samples_per_epoch=32, device="cpu"))
    result = train_baseline(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")
    for name in ("config.yaml", "split.json", "labeled.json", "log.jsonl", "best.pt", "last.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    assert result["best_val_score"] > 0.2

    slices = load_sources([str(data)], PREP, tmp_path / "cache", masks=True)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    idx = slices.indices_for(split["test"])
    idx = idx[slices.labels[idx] > 0]
    x = torch.from_numpy(slices.images[idx].astype(np.float32) / 255.0).unsqueeze(1)
    gt = slices.masks[idx] > 0

    def dice(model):
        pred = model.predict_slices(x)["masks"].numpy()
        return float(np.mean([2 * (p & g).sum() / max(p.sum() + g.sum(), 1) for p, g in zip(pred, gt)]))

    torch.manual_seed(0)
    trained, untrained = dice(SegNet.load(tmp_path / "run", "cpu")), dice(SegNet(SMALL_UNET, PREP))
    assert trained > 0.4 and trained > untrained + 0.2, (trained, untrained)

    # finished runs are reused, not retrained
    stamp = (tmp_path / "run" / "best.pt").stat().st_mtime_ns
    assert train_baseline(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")["best_val_score"] == result["best_val_score"]
    assert (tmp_path / "run" / "best.pt").stat().st_mtime_ns == stamp


def test_swinunetr_baseline_predicts_through_the_shared_interface():
    pytest.importorskip("einops")
    torch.manual_seed(0)
    model = SegNet(NetConfig(arch="swinunetr", feature_size=12), PREP)
    x = torch.rand(2, 1, 64, 64)
    assert model(x).shape == (2, 1, 64, 64)
    out = model.predict_slices(x)
    assert set(out) >= {"masks", "present", "boxes", "probs"}
    assert out["masks"].shape == (2, 64, 64) and out["masks"].dtype == torch.bool
    assert torch.equal(out["present"], out["masks"].flatten(1).any(1))
    with pytest.raises(SammixError, match="divisible by 32"):
        SegNet(NetConfig(arch="swinunetr"), PrepConfig(size=48))


def test_nnunet_raw_dataset_and_missing_commands(tmp_path, monkeypatch):
    from PIL import Image

    from sammix.models.baselines import nnunet_command
    from sammix.training.baselines import write_nnunet_raw

    data = write_synthetic_dataset(tmp_path / "d", "slices", n_cases=2, shape=(64, 64, 32), slice_step=8)
    slices = load_sources([str(data)], PREP, tmp_path / "cache", masks=True)
    idx = np.arange(len(slices))
    names = write_nnunet_raw(slices, idx, tmp_path / "raw" / "Dataset501_SammixLiver")
    ds = tmp_path / "raw" / "Dataset501_SammixLiver"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == len(idx) == len(set(names)) and meta["file_ending"] == ".png"
    assert meta["labels"] == {"background": 0, "liver": 1}
    for name, i in zip(names, idx):
        image = np.asarray(Image.open(ds / "imagesTr" / f"{name}_0000.png"))
        label = np.asarray(Image.open(ds / "labelsTr" / f"{name}.png"))
        assert np.array_equal(image, slices.images[i]) and np.array_equal(label, slices.masks[i] > 0)

    monkeypatch.setenv("SAMMIX_NNUNET_BIN", str(tmp_path))  # a folder without nnU-Net
    with pytest.raises(SammixError, match="nnunetv2"):
        nnunet_command("nnUNetv2_train")
