"""`evaluate --diagnose`: every slice below 0.5 gets its cause, on predictions with known failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sammix.evaluation.diagnose import diagnose
from sammix.training.slices import SliceSet

S = 64


def _rect(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


class BoxFiller:
    """A "SAM" that, given a box, fills it: the true box gives the organ exactly (a rectangle)."""

    def __init__(self, shrink: int = 0):
        self.shrink = shrink

    def predict_slices(self, x, boxes):
        masks = torch.zeros(len(x), S, S, dtype=torch.bool)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            k = self.shrink
            masks[i, y1 + k:y2 + 1 - k, x1 + k:x2 + 1 - k] = True
        return {"masks": masks}


def _slices(masks: list[np.ndarray]) -> SliceSet:
    n = len(masks)
    return SliceSet(images=np.zeros((n, S, S), np.uint8), masks=np.stack(masks), labels=np.ones(n, np.uint8),
                    has_mask=np.ones(n, bool), case=np.array([f"c{i}" for i in range(n)]),
                    slice_index=np.arange(n), source=np.zeros(n, int), spacing=np.full((n, 2), np.nan, np.float32),
                    depth=np.zeros(n, int), known=np.ones(n, bool))


def test_each_failed_slice_gets_its_cause(tmp_path):
    organ = _rect(10, 40, 10, 40)  # the same organ on every slice; its box is (10, 10, 39, 39)
    truth_box = [10, 10, 39, 39]
    slices = _slices([organ] * 5)
    pred = {
        "present": np.array([True, False, True, True, True]),
        "masks": np.stack([organ, 0 * organ, _rect(45, 60, 45, 60), _rect(0, 64, 0, 64), _rect(20, 24, 20, 24)]) > 0,
        "boxes": np.array([truth_box, [np.nan] * 4, [45, 45, 59, 59], truth_box, truth_box], np.float32),
    }
    result = diagnose(BoxFiller(), slices, np.arange(5), pred, tmp_path / "f.png", pretrained=BoxFiller(shrink=3))
    causes = {row["case"]: row["cause"] for row in result["failures"]}
    assert causes == {"c1": "gate miss", "c2": "box on wrong structure", "c3": "mask leak", "c4": "mask shrink"}
    assert result["failures_by_cause"] == {"gate miss": 1, "box on wrong structure": 1, "mask leak": 1,
                                           "mask shrink": 1}
    assert result["dice_true_box_mean"] == 1.0  # the fine-tuned stand-in follows the true box exactly
    assert result["dice_true_box_pretrained_mean"] < 1.0  # the pretrained one shrinks inside it
    assert result["dice_cam_mean"] == pytest.approx(np.mean([1.0, 0.0, 0.0, 2 * 900 / (900 + 4096), 2 * 16 / 916]))
    assert result["failures_where_true_box_above_0.8"] == 4
    assert (tmp_path / "f.png").stat().st_size > 1000 and result["figure"] == str(tmp_path / "f.png")


def test_a_run_without_failures_draws_nothing(tmp_path):
    organ = _rect(10, 40, 10, 40)
    pred = {"present": np.array([True]), "masks": organ[None] > 0, "boxes": np.array([[10, 10, 39, 39]], np.float32)}
    result = diagnose(BoxFiller(), _slices([organ]), np.arange(1), pred, tmp_path / "f.png", pretrained=BoxFiller())
    assert result["failures"] == [] and not (tmp_path / "f.png").exists()
