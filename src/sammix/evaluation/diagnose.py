"""Where the Dice goes: `sammix evaluate --diagnose`.

For the organ-present slices of a test set, three Dice values side by side:
  * the run as users run it (CAM prompts, no human input);
  * the same fine-tuned model given each slice's true box (what the prompt costs);
  * the pretrained backbone given the true box (what fine-tuning gained or lost).
And every slice below FAIL_DICE with its cause:
  * "gate miss": the classifier called the slice organ-free, SAM never saw it;
  * "box on wrong structure": the prompt box overlaps the true box with IoU < WRONG_BOX_IOU;
  * "mask leak" / "mask shrink": a good box, but the mask is larger / smaller than the organ.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sammix.inference.geometry import clean_mask
from sammix.masks import box_iou, dice_score, mask_to_box

FAIL_DICE = 0.5
WRONG_BOX_IOU = 0.3


def _true_box_masks(model, images: np.ndarray, gts: np.ndarray, cleanup: bool, batch_size: int = 8) -> np.ndarray:
    boxes = torch.from_numpy(np.stack([mask_to_box(g) for g in gts]))
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size].astype(np.float32) / 255.0).unsqueeze(1)
        out.append(model.predict_slices(x, boxes=boxes[start:start + batch_size])["masks"].numpy())
    masks = np.concatenate(out)
    return clean_mask(masks) if cleanup else masks


def failure_cause(present: bool, box, gt: np.ndarray, pred: np.ndarray) -> str:
    """Why a slice scored below FAIL_DICE (see the module docstring)."""
    if not present:
        return "gate miss"
    if box_iou(box, mask_to_box(gt)) < WRONG_BOX_IOU:
        return "box on wrong structure"
    return "mask leak" if pred.sum() > gt.sum() else "mask shrink"


def diagnose(model, slices, idx: np.ndarray, pred: dict, figure: Path | None = None, pretrained=None,
             cleanup: bool = False) -> dict:
    """The diagnosis of predictions `pred` (masks, present, boxes per index of `idx`, as
    `evaluate.predict_all` gives them) of `model` (a SamMix) on `slices`. `pretrained`: the
    backbone before fine-tuning (default: a new SamMix of the same config, whose LoRA is zero
    and whose decoder is the pretrained one, without the run's organ levels and refining).
    `cleanup`: the true-box masks are cleaned up slice by slice (`geometry.clean_mask`), as
    `pred`'s were."""
    rows = np.flatnonzero(slices.has_mask[idx] & slices.labels[idx].astype(bool))
    if not len(rows):
        return {"n_slices": 0}
    images, gts = slices.images[idx[rows]], slices.masks[idx[rows]] > 0
    if pretrained is None:  # what a user of the backbone gets: the slice as it is, one answer to the box
        from sammix.models.sammix import SamMix

        plain = replace(model.cfg, organ_levels=None, refine=False)
        pretrained = SamMix(plain, model.prep).to(model.device).eval()
    tuned_box = _true_box_masks(model, images, gts, cleanup)
    backbone_box = _true_box_masks(pretrained, images, gts, cleanup)
    per_slice, failures = [], []
    for j, r in enumerate(rows):
        gt, mask = gts[j], pred["masks"][r]
        row = {"case": str(slices.case[idx[r]]), "slice": int(slices.slice_index[idx[r]]),
               "dice_cam": dice_score(mask, gt), "dice_true_box": dice_score(tuned_box[j], gt),
               "dice_true_box_pretrained": dice_score(backbone_box[j], gt),
               "box_iou": float(box_iou(pred["boxes"][r], mask_to_box(gt))) if pred["present"][r] else 0.0}
        per_slice.append(row)
        if row["dice_cam"] < FAIL_DICE:
            row["cause"] = failure_cause(bool(pred["present"][r]), pred["boxes"][r], gt, mask)
            failures.append((j, row))
    result = {
        "n_slices": len(rows),
        **{f"{k}_mean": float(np.mean([p[k] for p in per_slice]))
           for k in ("dice_cam", "dice_true_box", "dice_true_box_pretrained", "box_iou")},
        "below": FAIL_DICE,
        "failures": [row for _, row in failures],
        "failures_by_cause": {c: sum(row["cause"] == c for _, row in failures)
                              for c in ("gate miss", "box on wrong structure", "mask leak", "mask shrink")},
        # the target: no slice below FAIL_DICE where the true box gives above 0.8
        "failures_where_true_box_above_0.8": sum(row["dice_true_box"] > 0.8 for _, row in failures),
        "per_slice": per_slice,
    }
    if figure is not None and failures:
        from sammix.viz import overlay_montage

        picks = [j for j, _ in failures]
        titles = [f"{row['case']}/{row['slice']}: {row['cause']}" for _, row in failures]
        overlay_montage(images[picks], gts[picks], figure, pred=pred["masks"][rows[picks]], titles=titles,
                        max_panels=24, boxes=pred["boxes"][rows[picks]])
        result["figure"] = str(figure)
    return result
