"""Self-training (beyond the paper): after the supervised stage the model labels slices that have
no mask, and SAM is fine-tuned on the answers it can vouch for.

An answer is kept when three checks agree that it is right: SAM's own predicted IoU, the fit of
the CAM's box to the mask's box (the classifier and SAM found the same thing), and, in volumes,
the Dice with the answers on the neighbouring slices (an organ changes little from slice to
slice; a leak or a jump to another organ does not). `sammix suggest` asks the opposite question
of the same checks: where they disagree most is worth a person's label.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from sammix.masks import box_iou, dice_score, mask_to_box


def answer_checks(masks, scores, prompt_boxes, case, z, depth) -> dict[str, np.ndarray]:
    """For N answers (masks (N,S,S) bool, or a callable j -> mask; SAM's predicted IoUs (N,);
    the boxes SAM was prompted with (N,4); the case, slice index and volume depth of each, depth
    0 for 2D slices): {"sam_iou", "box_iou" (prompt box against the mask's box, 0 for an empty
    mask), "neighbour_dice" (mean Dice with the answers at z - 1 and z + 1 of the same volume,
    NaN where neither is among them)}."""
    mask_of = masks if callable(masks) else (lambda j: masks[j])
    at = {(c, int(k)): j for j, (c, k) in enumerate(zip(case, z))}
    fits, neighbours = [], []
    for j in range(len(scores)):
        mask = mask_of(j)
        box = mask_to_box(mask)
        fits.append(0.0 if box is None else box_iou(prompt_boxes[j], box))
        near = [at.get((case[j], int(z[j]) + d)) for d in (-1, 1)] if depth[j] else []
        dice = [dice_score(mask, mask_of(k)) for k in near if k is not None]
        neighbours.append(float(np.mean(dice)) if dice else np.nan)
    return {"sam_iou": np.clip(np.asarray(scores, dtype=np.float64), 0, 1), "box_iou": np.array(fits),
            "neighbour_dice": np.array(neighbours)}


CHECKS = ("sam_iou", "box_iou", "neighbour_dice")


def answer_doubt(checks: dict) -> np.ndarray:
    """(N,) in [0, 1]: 1 - the mean of the checks that could be made (what `sammix suggest` ranks by)."""
    return np.nanmean([1 - checks[k] for k in CHECKS], axis=0)


def confident(checks: dict, min_score: float, min_box_iou: float, min_neighbour_dice: float) -> np.ndarray:
    """(N,) bool: the answers every check vouches for (a check that could not be made, NaN,
    does not veto)."""
    neighbour = checks["neighbour_dice"]
    return ((checks["sam_iou"] >= min_score) & (checks["box_iou"] >= min_box_iou)
            & (np.isnan(neighbour) | (neighbour >= min_neighbour_dice)))


def score_bar(min_score: float, validation_score: float) -> float:
    """The predicted IoU an answer must reach to be kept: `min_score`, or SAM's median predicted
    IoU on the validation organ slices where that is lower. SAM's IoU head runs on its own scale:
    the best epoch of a SAM-Mix-5 run can come early, before the head has learnt to say 0.9 of
    anything (docs/results.md), and a fixed bar then keeps no answer at all."""
    return float(min_score) if not np.isfinite(validation_score) else float(min(min_score, validation_score))


@torch.no_grad()
def pseudo_label(inferer, images: np.ndarray, case, z, depth, t, batch: int = 8, desc: str | None = None) -> dict:
    """SAM-Mix's answers on slices without masks (images (N,S,S) uint8), through the one
    inference path (gate, CAM prompt, SAM), and which of them to train on (`confident` with the
    TrainConfig `t`'s pseudo_* thresholds). Returns {"index" (P,): the slices the gate passed,
    "masks" (P,S,S) bool, "boxes" (P,4): their prompt boxes, "keep" (P,) bool, and the checks}."""
    index, masks, scores, boxes = [], [], [], []
    for start in tqdm(range(0, len(images), batch), desc=desc, unit="batch", disable=desc is None, leave=False):
        x = torch.from_numpy(images[start:start + batch]).float()[:, None] / 255.0
        out = inferer.predict(x)
        index += (out["index"].numpy() + start).tolist()
        masks.append((out["logits"] > 0).numpy())
        scores.append(out["scores"].numpy())
        boxes.append(out["boxes"].numpy())
    index = np.array(index, dtype=int)
    size = images.shape[-1]
    found = {"index": index, "masks": np.concatenate(masks) if index.size else np.zeros((0, size, size), bool),
             "boxes": np.concatenate(boxes) if index.size else np.zeros((0, 4), np.float32)}
    case, z, depth = np.asarray(case)[index], np.asarray(z)[index], np.asarray(depth)[index]
    checks = answer_checks(found["masks"], np.concatenate(scores) if index.size else np.zeros(0), found["boxes"],
                           case, z, depth)
    nonempty = found["masks"].reshape(len(index), -1).any(axis=1)
    keep = nonempty & confident(checks, t.pseudo_min_score, t.pseudo_min_box_iou, t.pseudo_min_neighbour_dice)
    return {**found, **checks, "keep": keep}
