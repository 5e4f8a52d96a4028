"""Per-slice and per-volume segmentation metrics, computed by MONAI the way the field reports them.

Per-slice scores are taken over organ-present slices (as in the paper). A prediction that is
empty where the organ is present scores Dice 0 and, since a Hausdorff distance to nothing is
undefined, the image diagonal (the worst possible distance), so failures are never dropped.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

SURFACE_TOLERANCE_MM = 2.0  # normalised surface Dice tolerance (mm where spacing is known, else px)


def _onehot(mask: np.ndarray) -> torch.Tensor:
    """(H,W) or (D,H,W) 0/1 -> (1, 2, ...) one-hot with background, as MONAI expects."""
    fg = torch.as_tensor(np.asarray(mask) > 0)
    return torch.stack([~fg, fg]).unsqueeze(0).float()


def slice_metrics(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] | None = None) -> dict:
    """Dice, Hausdorff (max and 95th percentile) and surface Dice of one 2D slice.

    Distances are in pixels of the given arrays; where `spacing` (row, col mm) is known the
    `_mm` variants are filled too."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if not gt.any():
        raise ValueError("slice metrics are defined on organ-present slices only")
    p, g = _onehot(pred), _onehot(gt)
    out = {"dice": float(compute_dice(p, g, include_background=False)[0, 0])}
    diagonal = math.hypot(*gt.shape)
    spacings = {"": None}
    if spacing is not None and all(np.isfinite(spacing)):
        spacings["_mm"] = tuple(float(s) for s in spacing)
    for suffix, sp in spacings.items():
        if not pred.any():
            worst = diagonal if sp is None else math.hypot(gt.shape[0] * sp[0], gt.shape[1] * sp[1])
            out[f"hd{suffix}"] = out[f"hd95{suffix}"] = worst
            out[f"nsd{suffix}"] = 0.0
            continue
        out[f"hd{suffix}"] = float(compute_hausdorff_distance(p, g, spacing=sp)[0, 0])
        out[f"hd95{suffix}"] = float(compute_hausdorff_distance(p, g, percentile=95, spacing=sp)[0, 0])
        tol = SURFACE_TOLERANCE_MM if sp is not None else 2.0
        out[f"nsd{suffix}"] = float(compute_surface_dice(p, g, class_thresholds=[tol], spacing=sp)[0, 0])
    return out


def volume_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """3D Dice of a whole case (NaN when both are empty)."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if not gt.any() and not pred.any():
        return float("nan")
    return float(compute_dice(_onehot(pred), _onehot(gt), include_background=False)[0, 0])


def summarize(per_slice: list[dict]) -> dict:
    """Mean and standard deviation of every numeric per-slice metric."""
    out: dict = {"n_slices": len(per_slice)}
    if not per_slice:
        return out
    keys = [k for k, v in per_slice[0].items() if isinstance(v, float)]
    for key in keys:
        values = np.array([row[key] for row in per_slice if key in row], dtype=float)
        out[f"{key}_mean"] = float(np.nanmean(values)) if values.size else float("nan")
        out[f"{key}_std"] = float(np.nanstd(values)) if values.size else float("nan")
    return out
