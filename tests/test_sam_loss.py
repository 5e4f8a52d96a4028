"""SAM's training levers (issue 11): which mask is trained, the pull towards the pretrained
decoder, the prompt mix and the intensity jitter. Small tensors, no model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sammix.config import TrainConfig
from sammix.errors import SammixError
from sammix.masks import box_iou, mask_to_box
from sammix.training.augment import augment, random_intensity, random_resolution, random_window
from sammix.training.train import SamLoss, jittered_truth_boxes

S = 32


def _organ() -> torch.Tensor:
    m = torch.zeros(1, 1, S, S)
    m[..., 8:20, 10:24] = 1
    return m


def _three_masks(truth: torch.Tensor) -> torch.Tensor:
    """Logits (1,3,S,S): mask 0 the truth, masks 1 and 2 the image's other half."""
    right, wrong = truth[0, 0] * 16 - 8, (1 - truth[0, 0]) * 16 - 8
    return torch.stack([right, wrong, wrong])[None].clone().requires_grad_(True)


@pytest.mark.parametrize("choice,trained", [("scored", 2), ("closest", 0)])
def test_the_mask_choice_decides_which_of_sams_masks_learns(choice, trained):
    m = _organ()
    logits = _three_masks(m)
    scores = torch.tensor([[0.1, 0.2, 0.9]], requires_grad=True)  # the IoU head ranks the wrong mask first
    loss = SamLoss(dataclasses.replace(TrainConfig(), mask_choice=choice), torch.nn.Linear(1, 1))
    loss(logits, scores, m).backward()
    moved = logits.grad.abs().sum(dim=(2, 3))[0]
    assert moved[trained] > 0 and all(moved[k] == 0 for k in range(3) if k != trained)
    assert scores.grad.abs().sum() > 0  # the head learns the true IoUs either way


def test_an_unknown_mask_choice_or_loss_is_refused():
    with pytest.raises(SammixError, match="mask_choice"):
        SamLoss(dataclasses.replace(TrainConfig(), mask_choice="best"), torch.nn.Linear(1, 1))
    with pytest.raises(SammixError, match="seg_loss"):
        SamLoss(dataclasses.replace(TrainConfig(), seg_loss="tversky"), torch.nn.Linear(1, 1))


def test_the_anchor_pulls_the_decoder_back_to_its_starting_weights():
    decoder = torch.nn.Linear(4, 4)
    t = dataclasses.replace(TrainConfig(), anchor_weight=0.5)
    anchored, free = SamLoss(t, decoder), SamLoss(TrainConfig(), decoder)
    m = _organ()
    scores = torch.tensor([[0.9, 0.1, 0.1]])
    assert anchored(_three_masks(m), scores, m).item() == pytest.approx(free(_three_masks(m), scores, m).item())
    with torch.no_grad():
        decoder.weight += 0.1
    gap = anchored(_three_masks(m), scores, m) - free(_three_masks(m), scores, m)
    assert gap.item() == pytest.approx(0.5 * 16 * 0.1 ** 2, rel=1e-4)
    for p in decoder.parameters():
        p.grad = None
    anchored(_three_masks(m), scores, m).backward()
    assert torch.allclose(decoder.weight.grad, torch.full((4, 4), 2 * 0.5 * 0.1), atol=1e-5)


def test_cam_boxes_off_the_organ_become_true_boxes_and_good_ones_stay():
    m = torch.cat([_organ(), _organ()])
    truth = mask_to_box(m[0, 0].numpy() > 0)
    boxes = torch.tensor([[0.0, 24.0, 8.0, 31.0], [9.0, 7.0, 24.0, 21.0]])  # off the organ; on it
    out = jittered_truth_boxes(boxes, m, share=0.0, rng=np.random.default_rng(0), min_iou=0.3)
    assert box_iou(out[0].numpy(), truth) > 0.5
    assert torch.equal(out[1], boxes[1])
    unchanged = jittered_truth_boxes(boxes, m, share=0.0, rng=np.random.default_rng(0))
    assert torch.equal(unchanged, boxes)


def test_a_small_cam_box_inside_the_organ_stays_when_min_organ_allows_it():
    m = torch.cat([_organ(), _organ(), _organ()])
    truth = mask_to_box(m[0, 0].numpy() > 0)
    inside = [12.0, 10.0, 16.0, 14.0]  # a quarter of the organ's side: IoU with its box far below 0.3
    boxes = torch.tensor([inside, [0.0, 24.0, 8.0, 31.0], [9.0, 7.0, 24.0, 21.0]])  # inside; off; on
    assert box_iou(boxes[0].numpy(), truth) < 0.3
    out = jittered_truth_boxes(boxes, m, share=0.0, rng=np.random.default_rng(0), min_iou=0.3, min_organ=0.7)
    assert torch.equal(out[0], boxes[0]) and torch.equal(out[2], boxes[2])
    assert box_iou(out[1].numpy(), truth) > 0.5
    iou_only = jittered_truth_boxes(boxes, m, share=0.0, rng=np.random.default_rng(0), min_iou=0.3)
    assert box_iou(iou_only[0].numpy(), truth) > 0.5  # without min_organ the small box is replaced


def test_intensity_jitter_scales_with_its_strength():
    x = torch.rand(8, 1, S, S)
    assert torch.equal(random_intensity(x, torch.Generator().manual_seed(0), 0.0), x)
    mild = (random_intensity(x, torch.Generator().manual_seed(0), 1.0) - x).abs().mean()
    strong = (random_intensity(x, torch.Generator().manual_seed(0), 2.5) - x).abs().mean()
    assert 0 < mild < strong


def test_resolution_jitter_blurs_by_up_to_its_factor_and_is_off_at_one():
    gen = torch.Generator().manual_seed(0)
    x = (torch.arange(64.0).view(1, 1, 1, 64).expand(4, 1, 64, 64) % 2)  # the finest stripes there are
    assert torch.equal(random_resolution(x, gen, 1.0), x)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    coarse = random_resolution(x, gen, 3.0)
    assert coarse.shape == x.shape
    assert torch.allclose(coarse.mean(), x.mean(), atol=0.05)  # the same image, its detail gone
    assert (coarse[..., 1:] - coarse[..., :-1]).abs().mean() < 0.5 * (x[..., 1:] - x[..., :-1]).abs().mean()


def test_another_window_turns_clipped_fat_grey_inside_the_body_and_keeps_air_black():
    # lits-slices' convention, HU clipped to [0, 255]: a body of liver (100 HU) ringed by fat
    # (clipped to 0) inside skin (50 HU), in air
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    hu = np.where(r < 14, 100.0, np.where(r < 20, 0.0, np.where(r < 22, 50.0, 0.0)))
    x = torch.from_numpy(hu / 255.0).float().view(1, 1, 64, 64).repeat(2, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_window(x, gen, 0.0), x)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    out = random_window(x, gen, 1.0, None, levels=(40.0, 40.0), widths=(400.0, 400.0))  # exported at 40 / 400
    low = 40.0 - 200.0
    assert torch.allclose(out[0, 0, 32, 32], torch.tensor((100.0 - low) / 400))  # the liver
    assert torch.allclose(out[0, 0, 32, 32 + 17], torch.tensor((-100.0 - low) / 400))  # fat, grey now
    assert out[0, 0, 0, 0] == 0  # air outside the body stays black
    # a slice already prepared at 40 / 400 kept its fat: its zeros are gas, black in any window
    same = random_window(out, gen, 1.0, (40.0, 400.0), levels=(40.0, 40.0), widths=(400.0, 400.0))
    assert torch.allclose(same, out, atol=1e-6)
    plain, windowed = (augment(x, None, torch.Generator().manual_seed(0),
                               TrainConfig(intensity_augment=0.0, window_augment=w))[0] for w in (0.0, 1.0))
    assert (plain - windowed).abs().mean() > 0.05  # TrainConfig.window_augment reaches the training slices


def test_the_classifier_can_keep_its_own_augmentation_strengths():
    x = torch.rand(4, 1, S, S)
    m = torch.zeros(4, 1, S, S)
    strong = TrainConfig(intensity_augment=2.5, resolution_augment=2.5, cls_intensity_augment=0.0,
                         cls_resolution_augment=1.0)

    def changed(t, classifier):  # how far the jitter moved the image, the same affine draw each time
        affine_only = TrainConfig(intensity_augment=0.0)
        ref = augment(x, m, torch.Generator().manual_seed(0), affine_only)[0]
        return (augment(x, m, torch.Generator().manual_seed(0), t, classifier)[0] - ref).abs().mean()

    assert changed(strong, classifier=False) > 0.01
    assert changed(strong, classifier=True) == 0  # the classifier's strengths: no jitter at all
    assert changed(TrainConfig(intensity_augment=2.5), classifier=True) > 0.01  # None: SAM's
