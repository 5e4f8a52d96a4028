"""Small mask and box helpers shared by every stage: boxes, box IoU, Dice.

Boxes are xyxy in pixel indices of the slice, inclusive (x2 is the last column inside the box),
the convention of MedSAM's ground-truth boxes.
"""

from __future__ import annotations

import numpy as np


def dice_score(a, b) -> float:
    """Dice of two masks (anything > 0 is inside); 1.0 when both are empty. A quick score for
    choices inside the model (validation, agreement of neighbours); reported metrics come from
    MONAI (`evaluation.metrics`)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def mask_to_box(mask) -> np.ndarray | None:
    """Bounding box (x1, y1, x2, y2), inclusive pixel indices, of a 2D mask; None if it is empty."""
    ys, xs = np.nonzero(np.asarray(mask))
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def _area(a) -> np.ndarray:
    return (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)


def _intersection(a, b) -> np.ndarray:
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0, None)
    return iw * ih


def box_iou(a, b):
    """IoU of inclusive-pixel xyxy boxes; (4,) and (4,) -> float, (N, 4) and (N, 4) -> (N,)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    inter = _intersection(a, b)
    iou = inter / np.maximum(_area(a) + _area(b) - inter, 1e-12)
    return float(iou) if iou.ndim == 0 else iou


def box_covered(box, by) -> float:
    """The share of inclusive-pixel xyxy `box`'s pixels inside xyxy box `by`."""
    box, by = np.asarray(box, dtype=np.float64), np.asarray(by, dtype=np.float64)
    return float(_intersection(box, by) / _area(box))


def expand_box(box, fraction: float, size, pixels: float = 0.0) -> np.ndarray:
    """Grow a box by `fraction` of its width/height plus `pixels` on every side, clipped to a
    (H, W) slice."""
    h, w = (size, size) if isinstance(size, int) else size
    x1, y1, x2, y2 = np.asarray(box, dtype=np.float64)
    dx, dy = fraction * (x2 - x1 + 1) + pixels, fraction * (y2 - y1 + 1) + pixels
    return np.array(
        [max(0.0, x1 - dx), max(0.0, y1 - dy), min(w - 1.0, x2 + dx), min(h - 1.0, y2 + dy)], dtype=np.float32
    )


def organ_share(box, mask: np.ndarray) -> float:
    """The share of an xyxy box's pixels that are organ in `mask` (H,W) bool."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return float(mask[y1:y2 + 1, x1:x2 + 1].mean()) if x2 >= x1 and y2 >= y1 else 0.0
