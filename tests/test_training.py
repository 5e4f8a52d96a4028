"""SAM-Mix training and evaluation end to end on generated CT, with the real pretrained models.

Tiny settings (64-pixel slices, 2 labelled slices, 2 epochs of one SAM step) keep each run to
seconds; the numbers that matter come from the documented runs in docs/results.md."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sammix.cli import main
from sammix.config import ModelConfig, PrepConfig, RunConfig, TrainConfig
from sammix.errors import SammixError
from sammix.models.sammix import SamMix
from sammix.training import train as train_module
from sammix.training.slices import load_sources
from sammix.training.train import CAM_THRESHOLDS, gate_threshold, organ_levels, train

pytestmark = pytest.mark.slow


def tiny_config(data, epochs=2) -> RunConfig:
    return RunConfig(
        prep=PrepConfig(size=64),
        model=ModelConfig(),
        train=TrainConfig(labeled=2, epochs=epochs, batch_size=2, cls_batch_size=8, sam_samples_per_epoch=2,
                          val_max_slices=2, val_fraction=0.25, test_fraction=0.25, self_train_rounds=0),
        data=[str(data)],
    )


def interrupt_sam_epoch(monkeypatch, at_call: int):
    """Make `Trainer.sam_epoch` raise KeyboardInterrupt (a kill) at its at_call-th call; returns
    the undo."""
    calls = {"n": 0}
    original = train_module.Trainer.sam_epoch

    def stop(self, bar):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return original(self, bar)

    monkeypatch.setattr(train_module.Trainer, "sam_epoch", stop)
    return lambda: monkeypatch.setattr(train_module.Trainer, "sam_epoch", original)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from sammix.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), "lits", n_cases=4, shape=(64, 64, 24))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    run = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_config(dataset), run, cache_dir=cache)
    return run, cache


def test_run_folder_records_everything(trained):
    run, _ = trained
    for name in ["config.yaml", "split.json", "labeled.json", "log.jsonl", "best.pt", "last.pt"]:
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    parts = [set(split[p]) for p in ("train", "val", "test")]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    labeled = json.loads((run / "labeled.json").read_text())
    assert len(labeled) == 2 and all(row["case"] in parts[0] for row in labeled)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [row for row in log if "epoch" in row]
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert all(np.isfinite(row["cls_loss"]) and np.isfinite(row["sam_loss"]) for row in epochs)
    (calibration,) = [row["calibration"] for row in log if "calibration" in row]
    assert sorted(map(float, calibration["val_dice_by_cam_threshold"])) == list(CAM_THRESHOLDS)
    assert calibration["cam_threshold"] in CAM_THRESHOLDS
    assert all(0 <= row["val_dice"] <= 1 and 0 <= row["val_cls_accuracy"] <= 1 for row in epochs)
    for row in epochs:  # the synthetic volumes' validation case has organ-free slices too
        n_organ, n_free = row["val_slices_scored"], row["val_organ_free_scored"]
        assert n_organ > 0 and n_free > 0
        expected = (row["val_dice"] * n_organ + row["val_organ_free_rejected"] * n_free) / (n_organ + n_free)
        assert row["val_score"] == pytest.approx(expected)
    best = max(epochs, key=lambda row: row["val_score"])  # the first of equals
    assert torch.load(run / "best.pt", weights_only=False)["epoch"] == best["epoch"]


def test_the_calibrated_cam_threshold_travels_with_the_weights(trained, tmp_path):
    run, _ = trained
    state = torch.load(run / "best.pt", weights_only=False)
    chosen = state["model"]["cam_threshold"]
    model = SamMix.load(run, device="cpu")
    assert model.prompter.threshold == model.cfg.cam_threshold == chosen
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "config.yaml").write_text((run / "config.yaml").read_text())
    state["model"]["cam_threshold"] = 0.123
    torch.save(state, copy / "best.pt")
    assert SamMix.load(copy, device="cpu").prompter.threshold == 0.123


def test_the_labelled_slices_organ_levels_travel_with_the_weights(trained, dataset):
    run, cache = trained
    state = torch.load(run / "best.pt", weights_only=False)["model"]
    labelled = {(row["case"], row["slice"]) for row in json.loads((run / "labeled.json").read_text())}
    slices = load_sources([dataset], SamMix.load(run, device="cpu").prep, cache, masks=True)
    rows = [i for i, (case, z) in enumerate(zip(slices.case, slices.slice_index))
            if (str(case).rpartition("/")[2], int(z)) in labelled]
    assert len(rows) == len(labelled)
    assert tuple(state["organ_levels"]) == pytest.approx(organ_levels(slices.images[rows], slices.masks[rows]))
    assert SamMix.load(run, device="cpu").cfg.organ_levels == pytest.approx(state["organ_levels"])


def test_validation_sees_sams_input_at_the_organ_levels_from_the_start(dataset, tmp_path):
    trainer = train_module.Trainer(tiny_config(dataset), tmp_path / "run", cache_dir=tmp_path / "cache")
    expected = organ_levels(trainer.data.images[trainer.labeled], trainer.data.masks[trainer.labeled])
    assert trainer.model.cfg.organ_levels == pytest.approx(expected)  # before any epoch: validation shifts too
    assert trainer.best_weights()["organ_levels"] == pytest.approx(expected)  # each best.pt carries them


def test_organ_levels_span_the_organ_medians_of_the_labelled_slices():
    masks = np.zeros((20, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 1
    masks[0] = 0  # a slice without the organ has no level
    images = np.zeros((20, 8, 8), np.uint8)
    for i in range(20):
        images[i, 2:6, 2:6] = 10 * i  # the organ's level: 10 i / 255
    low, high = organ_levels(images, masks)
    assert low == pytest.approx(np.percentile(np.arange(1, 20) * 10 / 255, 5))
    assert high == pytest.approx(np.percentile(np.arange(1, 20) * 10 / 255, 95))


def test_gate_threshold_passes_every_validation_organ_slice_with_a_margin():
    probs = np.array([0.97, 0.8, 0.99, 0.9])
    gate = gate_threshold(probs)
    assert (probs >= gate).all() and gate < probs.min()  # a margin below the least sure organ slice
    assert gate > 0.5  # yet a confident classifier still rejects the slices it calls organ-free
    assert gate_threshold(np.array([0.3])) < 0.3 < gate < gate_threshold(np.array([0.99]))  # follows confidence


def test_the_gate_chosen_on_validation_travels_with_the_weights(trained, dataset, tmp_path):
    run, cache = trained
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    state = torch.load(run / "best.pt", weights_only=False)
    (best,) = [row for row in log if row.get("epoch") == state["epoch"]]
    assert state["model"]["cls_threshold"] == best["val_gate_threshold"]
    assert SamMix.load(run, device="cpu").cfg.cls_threshold == best["val_gate_threshold"]

    # weights saved before the gate was chosen get it when `train` meets the finished run
    old = shutil.copytree(run, tmp_path / "run")
    del state["model"]["cls_threshold"]
    torch.save(state, old / "best.pt")
    train(tiny_config(dataset), old, cache_dir=cache)
    row = json.loads((old / "log.jsonl").read_text().splitlines()[-1])["calibration"]
    assert set(row) == {"gate_threshold"}  # the CAM threshold was there already
    assert torch.load(old / "best.pt", weights_only=False)["model"]["cls_threshold"] == row["gate_threshold"]
    assert 0 < row["gate_threshold"] < 1


def test_only_trained_parts_are_saved_and_base_weights_recorded(trained):
    run, _ = trained
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert state["base_weights"]["backbone"] == "litemedsam" and len(state["base_weights"]["sha256"]) == 64
    assert any(".lora_" in k for k in state["sam"]) and any("mask_decoder" in k for k in state["sam"])
    assert not any("image_encoder" in k and ".lora_" not in k for k in state["sam"])  # frozen base not saved


def test_evaluate_writes_the_metrics_contract(trained, dataset, tmp_path):
    run, cache = trained
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--run", str(run), "--data", str(dataset), "--out", str(out), "--split", "test"]) == 0
    metrics = json.loads(out.read_text())
    for key in ["n_slices", "dice_mean", "dice_std", "hd_mean", "hd95_mean", "hd_mm_mean", "hd95_mm_mean",
                "nsd_mean", "cls_accuracy", "cam_box_iou_mean", "per_slice", "dice3d_per_case"]:
        assert key in metrics, key
    test_cases = set(json.loads((run / "split.json").read_text())["test"])
    assert metrics["n_slices"] == len(metrics["per_slice"]) > 0
    assert {row["case"] for row in metrics["per_slice"]} <= test_cases
    assert all({"case", "slice", "dice", "hd95"} <= set(row) for row in metrics["per_slice"])
    assert 0 <= metrics["dice_mean"] <= 1 and 0 <= metrics["cls_accuracy"] <= 1


def test_python_api_predicts_a_slice_of_any_size(trained, dataset):
    """`SamMix.predict` on a native-size slice gives the mask of the model's own path, resized back."""
    import torch.nn.functional as F

    from sammix.data.io import read_volume

    run, _ = trained
    model = SamMix.load(run, device="cpu")
    model.set_thresholds(cls_threshold=0.0)  # SAM answers every slice, so the mask is SAM's own
    ct = read_volume(dataset / "volume-0.nii.gz").axial()
    image = np.clip((ct[len(ct) // 2] + 160) / 400, 0, 1).astype(np.float32)[:, 10:]  # not square
    mask = model.predict(image)
    assert mask.shape == image.shape and mask.dtype == np.uint8 and mask.any()
    x = F.interpolate(torch.from_numpy(image)[None, None], size=(64, 64), mode="bilinear", align_corners=False)
    small = model.predict_slices(x)["masks"][0].float()[None, None]
    assert (F.interpolate(small, size=image.shape, mode="nearest")[0, 0].numpy() == mask).all()


def test_interrupted_training_resumes_to_the_same_weights(trained, dataset, tmp_path, monkeypatch):
    """Seeded CPU runs are reproducible, and a run stopped after epoch 1 and started again ends
    with exactly the weights of the uninterrupted run."""
    reference, cache = trained
    run = tmp_path / "run"
    undo = interrupt_sam_epoch(monkeypatch, at_call=2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(dataset), run, cache_dir=cache)
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
    undo()
    train(tiny_config(dataset), run, cache_dir=cache)

    ours = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]
    ref = torch.load(reference / "last.pt", map_location="cpu", weights_only=False)["model"]
    for part in ("classifier", "sam"):
        assert ours[part].keys() == ref[part].keys()
        for key in ref[part]:
            assert torch.equal(ours[part][key], ref[part][key]), f"{part}.{key} differs"


def test_a_run_folder_with_another_config_is_refused(trained, dataset):
    run, cache = trained
    with pytest.raises(SammixError, match="different config"):
        train(tiny_config(dataset, epochs=3), run, cache_dir=cache)


def test_a_single_case_run_without_validation_still_keeps_best_weights(tmp_path):
    """One volume (the demo's case): no validation cases, so the lowest SAM loss picks best.pt."""
    from sammix.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "one", "lits", n_cases=1, shape=(64, 64, 16))
    cfg = tiny_config(data, epochs=1)
    train(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert json.loads((tmp_path / "run" / "split.json").read_text())["val"] == []
    assert (tmp_path / "run" / "best.pt").is_file()


def test_jittered_truth_boxes_surround_the_organ_loosely():
    from sammix.masks import box_iou, mask_to_box
    from sammix.training.train import jittered_truth_boxes

    masks = torch.zeros(200, 1, 64, 64)
    masks[:, :, 20:40, 10:30] = 1
    cam_boxes = torch.tensor([[0.0, 0.0, 63.0, 63.0]]).repeat(200, 1)
    rng = np.random.default_rng(0)
    assert torch.equal(jittered_truth_boxes(cam_boxes, masks, 0.0, rng), cam_boxes)
    out = jittered_truth_boxes(cam_boxes, masks, 0.5, rng)
    replaced = (out != cam_boxes).any(1).numpy()
    assert 0.35 < replaced.mean() < 0.65
    truth = mask_to_box(masks[0, 0].numpy() > 0)
    ious = box_iou(out[replaced].numpy(), np.repeat(truth[None], replaced.sum(), 0))
    assert ious.min() > 0.3 and ious.mean() < 0.95  # near the organ, rarely exact
    assert (out[replaced, 2] - out[replaced, 0]).mean() > truth[2] - truth[0]  # looser on average
    assert out.min() >= 0 and out.max() <= 63


def self_training_config(dataset, unlabeled) -> RunConfig:
    """One supervised epoch, then one self-training round of one epoch; thresholds at 0 keep every
    non-empty answer, so the kept set is not down to how well a tiny run does."""
    cfg = tiny_config(dataset, epochs=1)
    cfg.unlabeled_data = [str(unlabeled)]
    t = cfg.train
    t.self_train_rounds, t.self_train_epochs = 1, 1
    t.pseudo_min_score = t.pseudo_min_box_iou = t.pseudo_min_neighbour_dice = 0.0
    t.self_train_samples_per_epoch = 6
    return cfg


@pytest.fixture(scope="module")
def unlabeled(dataset, tmp_path_factory):
    """One of the dataset's CTs as an images-only folder (no label files of any kind)."""
    folder = tmp_path_factory.mktemp("unlabeled")
    (folder / "scan.nii.gz").symlink_to(dataset / "volume-0.nii.gz")
    return folder


def test_a_self_training_round_starts_from_the_best_weights_not_the_last(dataset, unlabeled, tmp_path, monkeypatch):
    cfg = self_training_config(dataset, unlabeled)
    cfg.train.epochs = 2
    # validation prefers the first epoch; the classifier moves in the second and stays fixed in self-training
    monkeypatch.setattr(train_module.Trainer, "score", lambda self, losses, val: -self.epoch)
    run = tmp_path / "run"
    train(cfg, run, cache_dir=tmp_path / "cache")
    best = torch.load(run / "best.pt", weights_only=False)
    last = torch.load(run / "last.pt", weights_only=False)
    assert best["epoch"] == 1 and last["epoch"] == 3
    moved = [k for k, v in best["model"]["classifier"].items() if v.is_floating_point()]
    assert moved and all(torch.equal(last["model"]["classifier"][k], best["model"]["classifier"][k]) for k in moved)


def test_self_training_trains_sam_on_the_kept_answers_and_resumes_inside_a_round(dataset, unlabeled, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    train(self_training_config(dataset, unlabeled), run, cache_dir=cache)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    (labelled,) = [r for r in rows if r.get("epoch") == 1]
    (round_row,) = [r for r in rows if "self_training_round" in r]
    (second,) = [r for r in rows if r.get("epoch") == 2]
    assert "cls_loss" in labelled and "cls_loss" not in second  # the classifier stays as trained
    # the pool: the training cases' organ slices but the 2 labelled ones (organ-free ones are known
    # from the masks), then all of the unlabelled scan's
    data = load_sources([dataset], PrepConfig(size=64), cache, masks=True)
    train_slices = data.indices_for(json.loads((run / "split.json").read_text())["train"])
    assert round_row["pool"] == int(data.labels[train_slices].sum()) - 2 + 24
    assert 0 < round_row["kept"] <= round_row["answered"] <= round_row["pool"]
    assert round_row["min_score"] <= 0.0  # the configured bar, or SAM's validation median where lower
    assert second["sam_slices"] == 2 + round_row["kept"]  # SAM's samples are drawn from these
    assert second["sam_samples"] == 6  # as many as a self-training epoch is set to draw
    pseudo = torch.load(run / "pseudo-1.pt", weights_only=False)
    assert len(pseudo["index"]) == round_row["kept"] and pseudo["masks"].shape[0] == round_row["kept"]

    # killed in the self-training epoch: the rerun reuses the round's pseudo-labels and ends with
    # the uninterrupted run's weights
    again = tmp_path / "again"
    undo = interrupt_sam_epoch(monkeypatch, at_call=2)
    with pytest.raises(KeyboardInterrupt):
        train(self_training_config(dataset, unlabeled), again, cache_dir=cache)
    made = (again / "pseudo-1.pt").stat().st_mtime_ns
    undo()
    train(self_training_config(dataset, unlabeled), again, cache_dir=cache)
    assert (again / "pseudo-1.pt").stat().st_mtime_ns == made
    ours = torch.load(again / "last.pt", map_location="cpu", weights_only=False)["model"]["sam"]
    ref = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]["sam"]
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
