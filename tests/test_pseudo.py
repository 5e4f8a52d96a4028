"""Self-training's pseudo-label checks (training/pseudo.py) on constructed answers."""

from __future__ import annotations

import numpy as np

from sammix.config import SELF_TRAIN_MAX_LABELED, TrainConfig
from sammix.training.pseudo import answer_checks, confident, score_bar


def disc(cy, cx, r, size=64):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max(), ys.max()]


def test_a_volume_answer_that_jumps_away_from_its_neighbours_is_caught():
    """Five adjacent slices of one volume: the organ drifts slowly except on slice 3, where the
    answer is somewhere else. Its neighbour Dice is 0, and so is slice 4's (slice 3 is its only
    neighbour); slice 2 keeps half its agreement, from slice 1."""
    masks = np.stack([disc(30, 30 + z, 10) for z in range(5)])
    masks[3] = disc(12, 50, 6)
    boxes = np.array([box_of(m) for m in masks], dtype=np.float32)
    checks = answer_checks(masks, np.full(5, 0.95), boxes, ["a"] * 5, range(5), [5] * 5)
    n = checks["neighbour_dice"]
    assert n[3] == 0.0
    assert n[0] > 0.9 and n[1] > 0.9 and 0.4 < n[2] < 0.6 and n[4] == 0.0
    assert np.allclose(checks["box_iou"], 1.0)
    keep = confident(checks, min_score=0.9, min_box_iou=0.7, min_neighbour_dice=0.8)
    assert keep.tolist() == [True, True, False, False, False]


def test_2d_slices_have_no_neighbours_and_the_other_checks_decide():
    """Slices of a 2D folder (depth 0), even with adjacent indices, are not compared; an answer
    whose box strays from the CAM's box, or that SAM doubts, or that is empty, is dropped."""
    masks = np.stack([disc(30, 30, 10), disc(30, 30, 10), disc(30, 30, 10), np.zeros((64, 64), bool)])
    boxes = np.array([box_of(masks[0]), [0, 0, 63, 63], box_of(masks[0]), [20, 20, 40, 40]], dtype=np.float32)
    checks = answer_checks(masks, np.array([0.95, 0.95, 0.5, 0.99]), boxes, ["a"] * 4, [7, 8, 9, 10], [0] * 4)
    assert np.isnan(checks["neighbour_dice"]).all()
    assert checks["box_iou"][1] < 0.2 and checks["box_iou"][3] == 0.0
    keep = confident(checks, min_score=0.9, min_box_iou=0.7, min_neighbour_dice=0.8)
    assert keep.tolist() == [True, False, False, False]


def test_neighbours_are_looked_up_within_the_same_case_only():
    masks = np.stack([disc(30, 30, 10), disc(10, 10, 5)])
    boxes = np.array([box_of(m) for m in masks], dtype=np.float32)
    checks = answer_checks(lambda j: masks[j], np.ones(2), boxes, ["a", "b"], [4, 5], [9, 9])
    assert np.isnan(checks["neighbour_dice"]).all()


def test_the_score_bar_follows_sams_scale_only_downwards():
    """An IoU head that scores every validation answer about 0.79 (an early best epoch): the bar
    drops to its median there, so its surest answers can still be kept; a head that scores higher
    than the bar leaves it where it was; without validation answers the bar is the fixed one."""
    assert score_bar(0.9, 0.79) == 0.79
    assert score_bar(0.9, 0.93) == 0.9
    assert score_bar(0.9, float("nan")) == 0.9
    scores = np.array([0.77, 0.78, 0.80, 0.81])
    kept = confident({"sam_iou": scores, "box_iou": np.ones(4), "neighbour_dice": np.full(4, np.nan)},
                     score_bar(0.9, 0.79), 0.7, 0.8)
    assert kept.tolist() == [False, False, True, True]


def test_self_training_is_on_by_default_only_for_sam_mix_with_few_labelled_slices():
    default = TrainConfig()
    assert default.rounds_of_self_training(5, "cam") == 1
    assert default.rounds_of_self_training(SELF_TRAIN_MAX_LABELED + 1, "cam") == 0  # SAM-Mix-50: off
    assert default.rounds_of_self_training(5, "full_box") == 0  # the SAM-PP baselines stay the paper's
    assert TrainConfig(self_train_rounds=0).rounds_of_self_training(5, "cam") == 0  # as set, always
    assert TrainConfig(self_train_rounds=2).rounds_of_self_training(50, "full_box") == 2


def test_a_self_training_epoch_draws_its_own_number_of_sam_samples_only_when_set():
    t = TrainConfig(sam_samples_per_epoch=32)
    assert t.sam_samples(5, self_training=True) == 32 and t.sam_samples(50, self_training=False) == 50
    t = TrainConfig(sam_samples_per_epoch=32, self_train_samples_per_epoch=128)
    assert t.sam_samples(5, self_training=True) == 128 and t.sam_samples(5, self_training=False) == 32
