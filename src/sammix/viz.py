"""Figures: overlay montages, CAM prompts, Dice box plots, method comparisons, volume previews.

Matplotlib's object API only (no pyplot, so no global state and no GUI backend), no torch. Every
figure is written atomically. Slice panels are laid out in whole pixels, one image pixel per screen
pixel at the default panel size, with `GAP` pixels between panels and no margins:
a grid of R x C panels of side P is C*P + (C-1)*GAP wide and R*P + (R-1)*GAP (+ header / legend
bands of `BAND` pixels) high.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from sammix.config import PAPER_WINDOW
from sammix.data.io import atomic_path
from sammix.masks import dice_score, mask_to_box

DPI = 100
GAP = 2  # pixels between slice panels
BAND = 22  # pixels: column-header strip and legend strip
BACKGROUND = "#111111"
GT_COLOR = "#33dd55"
PRED_COLOR = "#ff3b30"
BOX_COLOR = "#ffd400"
HU_WINDOW = PAPER_WINDOW


def to_unit(image: np.ndarray) -> np.ndarray:
    """A slice as float in [0, 1]: uint8 / 255, floats in [0, 1] as they are, anything else as HU
    through the level 40 / width 400 window."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    if image.size and (image.min() < 0.0 or image.max() > 1.0):
        level, width = HU_WINDOW
        image = (image - (level - width / 2)) / width
    return np.clip(image, 0.0, 1.0)


def _panel_grid(rows: int, cols: int, panel: int, top: int = 0, bottom: int = 0):
    """A figure of rows x cols image panels placed to the pixel; returns (fig, axes[r][c])."""
    width = cols * panel + (cols - 1) * GAP
    height = top + rows * panel + (rows - 1) * GAP + bottom
    # Agg truncates width*dpi to an int; a hundredth of a pixel keeps 3.92*100 from becoming 391.
    fig = Figure(figsize=((width + 0.01) / DPI, (height + 0.01) / DPI), dpi=DPI, facecolor=BACKGROUND)
    axes = []
    for r in range(rows):
        row = []
        for c in range(cols):
            left, upper = c * (panel + GAP), top + r * (panel + GAP)
            ax = fig.add_axes((left / width, 1 - (upper + panel) / height, panel / width, panel / height))
            ax.set_axis_off()
            row.append(ax)
        axes.append(row)
    return fig, axes


def _show(ax, image: np.ndarray, gt=None, pred=None) -> None:
    """A grey slice with the ground truth filled and outlined in green, the prediction outlined in red."""
    ax.imshow(to_unit(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear")
    if gt is not None and np.any(gt):
        gt = np.asarray(gt) > 0
        fill = np.zeros(gt.shape + (4,), np.float32)
        fill[gt] = (0.2, 0.87, 0.33, 0.28)
        ax.imshow(fill, interpolation="nearest")
        ax.contour(gt, levels=[0.5], colors=GT_COLOR, linewidths=1.0)
    if pred is not None and np.any(pred):
        ax.contour(np.asarray(pred) > 0, levels=[0.5], colors=PRED_COLOR, linewidths=1.3)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)


def _label(ax, text: str, corner: str = "top") -> None:
    y, va = (0.985, "top") if corner == "top" else (0.015, "bottom")
    ax.text(0.015 if corner == "top" else 0.985, y, text, transform=ax.transAxes, va=va,
            ha="left" if corner == "top" else "right", color="white", fontsize=8,
            bbox=dict(facecolor="black", alpha=0.6, edgecolor="none", pad=1.5))


def _legend(fig, has_gt: bool, has_pred: bool, extra: Sequence = ()) -> None:
    handles = []
    if has_gt:
        handles.append(Patch(facecolor=(0.2, 0.87, 0.33, 0.4), edgecolor=GT_COLOR, label="ground truth"))
    if has_pred:
        handles.append(Line2D([], [], color=PRED_COLOR, lw=1.5, label="prediction"))
    handles.extend(extra)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8,
                   labelcolor="white", bbox_to_anchor=(0.5, 0.0), borderaxespad=0.2, handlelength=1.5)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor=fig.get_facecolor())
    return path


def _pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def _columns(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


# -------------------------------------------------------------------------------------- figures

def overlay_montage(images, masks, path, pred=None, titles=None, max_panels: int = 16,
                    panel_px: int = 256, columns: int | None = None, boxes=None) -> Path:
    """A grid of slices: ground truth green (fill + contour), prediction red contour, and the
    prompt box yellow where `boxes` (N, 4) xyxy are given.

    `images` (N, H, W) in [0, 1], uint8 or HU; `masks`, `pred` (N, H, W) or None. More than
    `max_panels` slices are thinned evenly.
    """
    n = len(images)
    if n == 0:
        raise ValueError("overlay_montage needs at least one image")
    for name, other in (("masks", masks), ("pred", pred), ("titles", titles), ("boxes", boxes)):
        if other is not None and len(other) != n:
            raise ValueError(f"{name} has {len(other)} entries for {n} images")
    chosen = _pick(n, max_panels)
    cols = min(columns or _columns(len(chosen)), len(chosen))
    rows = math.ceil(len(chosen) / cols)
    has_gt, has_pred = masks is not None, pred is not None
    fig, axes = _panel_grid(rows, cols, panel_px, bottom=BAND if (has_gt or has_pred) else 0)
    for slot, ax in enumerate(a for row in axes for a in row):
        if slot >= len(chosen):
            continue
        i = chosen[slot]
        _show(ax, np.asarray(images[i]), None if masks is None else masks[i], None if pred is None else pred[i])
        if boxes is not None and np.all(np.isfinite(boxes[i])):
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=1.5, edgecolor=BOX_COLOR))
        if titles is not None:
            _label(ax, str(titles[i]))
        if has_gt and has_pred:
            _label(ax, f"Dice {dice_score(masks[i], pred[i]):.3f}", corner="bottom")
    _legend(fig, has_gt, has_pred)
    return _save(fig, path)


def cam_figure(image, cam, box, path, gt_mask=None, pred=None, panel_px: int = 384) -> Path:
    """Two panels: the slice with ground truth and prediction; the CAM over the slice with the CAM's
    prompt box (yellow) and the ground-truth box (green, dashed). `box` is (x0, y0, x1, y1) in the
    image's pixels, or None when the CAM found nothing; `cam` may be coarser than the image."""
    image = np.asarray(image)
    h, w = image.shape
    fig, ((left, right),) = _panel_grid(1, 2, panel_px, top=BAND, bottom=BAND)
    _show(left, image, gt_mask, pred)
    if gt_mask is not None and pred is not None:
        _label(left, f"Dice {dice_score(gt_mask, pred):.3f}", corner="bottom")

    right.imshow(to_unit(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear")
    cam = np.asarray(cam, dtype=np.float32)
    cam = np.clip(cam / max(1.0, float(cam.max())), 0.0, 1.0)
    heat = colormaps["jet"](cam)
    heat[..., 3] = 0.15 + 0.5 * cam  # cold regions stay see-through, so the anatomy shows
    # extent stretches a coarse CAM over the whole slice, as it is upsampled for prompting.
    right.imshow(heat, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
    if pred is not None and np.any(pred):
        right.contour(np.asarray(pred) > 0, levels=[0.5], colors=PRED_COLOR, linewidths=1.3)
    gt_box = mask_to_box(gt_mask) if gt_mask is not None else None
    for b, style in ((gt_box, dict(edgecolor=GT_COLOR, linestyle="--")), (box, dict(edgecolor=BOX_COLOR))):
        if b is not None:
            x0, y0, x1, y1 = (float(v) for v in b)
            right.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=1.8, **style))
    right.set_xlim(-0.5, w - 0.5)
    right.set_ylim(h - 0.5, -0.5)
    if box is None:
        _label(right, "no CAM box (nothing above threshold)", corner="bottom")

    for ax, text in ((left, "ground truth and prediction"), (right, "GradCAM and prompt box")):
        fig.text(ax.get_position().x0 + ax.get_position().width / 2, 1 - (BAND / 2) / fig.bbox.height,
                 text, ha="center", va="center", color="white", fontsize=10)
    extra = [Line2D([], [], color=BOX_COLOR, lw=1.8, label="CAM box")]
    if gt_box is not None:
        extra.append(Line2D([], [], color=GT_COLOR, lw=1.8, ls="--", label="ground-truth box"))
    _legend(fig, gt_mask is not None, pred is not None, extra)
    return _save(fig, path)


def dice_boxplot(scores: dict[str, dict[str, Sequence[float]]], path, title: str = "Per-slice Dice") -> Path:
    """Box plots of per-slice Dice: methods along x, one box per test set within each method."""
    methods = list(scores)
    test_sets = list(dict.fromkeys(t for m in methods for t in scores[m]))
    if not methods or not test_sets:
        raise ValueError("dice_boxplot needs at least one method with one test set")
    n_sets = len(test_sets)
    width_px = max(640, 140 + 80 * len(methods) * n_sets)
    fig = Figure(figsize=((width_px + 0.01) / DPI, 420.01 / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    step = 0.8 / n_sets
    for j, test_set in enumerate(test_sets):
        offset = (j - (n_sets - 1) / 2) * step
        data, positions = [], []
        for i, method in enumerate(methods):
            values = [v for v in scores[method].get(test_set, []) if np.isfinite(v)]
            if values:
                data.append(values)
                positions.append(i + offset)
        if not data:
            continue
        color = palette[j % len(palette)]
        ax.boxplot(data, positions=positions, widths=step * 0.8, patch_artist=True, showmeans=True,
                   boxprops=dict(facecolor=color, alpha=0.55, edgecolor=color),
                   medianprops=dict(color="black"), whiskerprops=dict(color=color), capprops=dict(color=color),
                   meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="black", markersize=4),
                   flierprops=dict(marker=".", markersize=3, markeredgecolor=color))
        ax.plot([], [], "s", color=color, alpha=0.7, label=test_set)
    ax.set_xticks(range(len(methods)), methods, rotation=20 if len(methods) > 4 else 0,
                  ha="right" if len(methods) > 4 else "center")
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="test set", loc="lower right", fontsize=8, title_fontsize=8)
    return _save(fig, path)


def qualitative_grid(images, gts, preds_by_method: dict[str, Sequence[np.ndarray]], path,
                     panel_px: int = 192) -> Path:
    """The same slices (rows) across methods (columns): first column the ground truth, then each
    method's prediction in red over the ground truth in green, with its Dice."""
    n = len(images)
    if n == 0 or len(gts) != n:
        raise ValueError(f"qualitative_grid needs as many ground truths as images ({len(gts)} vs {n})")
    for method, preds in preds_by_method.items():
        if len(preds) != n:
            raise ValueError(f"{method}: {len(preds)} predictions for {n} images")
    methods = list(preds_by_method)
    fig, axes = _panel_grid(n, 1 + len(methods), panel_px, top=BAND, bottom=BAND)
    for r in range(n):
        _show(axes[r][0], np.asarray(images[r]), gts[r])
        for c, method in enumerate(methods, start=1):
            pred = preds_by_method[method][r]
            _show(axes[r][c], np.asarray(images[r]), gts[r], pred)
            _label(axes[r][c], f"Dice {dice_score(gts[r], pred):.3f}", corner="bottom")
    for c, text in enumerate(["ground truth", *methods]):
        pos = axes[0][c].get_position()
        fig.text(pos.x0 + pos.width / 2, 1 - (BAND / 2) / fig.bbox.height, text, ha="center", va="center",
                 color="white", fontsize=9)
    _legend(fig, True, bool(methods))
    return _save(fig, path)


def preview_slices(mask: np.ndarray, n: int = 12) -> list[int]:
    """Up to n slice indices of a (Z, H, W) mask, superior first: evenly spaced through the slices
    that contain it, plus about one in six evenly spaced among those that do not."""
    has = np.asarray(mask).reshape(len(mask), -1).any(axis=1)
    inside, outside = np.flatnonzero(has), np.flatnonzero(~has)
    n_out = min(len(outside), max(1, n // 6)) if len(inside) else min(len(outside), n)
    n_in = min(len(inside), n - n_out)
    z = [int(inside[i]) for i in _pick(len(inside), n_in)] + [int(outside[i]) for i in _pick(len(outside), n_out)]
    return sorted(z, reverse=True)  # slice 0 is the most inferior; readers scroll from the head down


def volume_preview(axial, mask, path, n: int = 12, panel_px: int = 192) -> Path:
    """Evenly spaced axial slices through the mask, plus a few without it (to show where it ends),
    the mask outlined in red. `axial` (Z, H, W) in [0, 1] or HU, slice 0 the most inferior."""
    axial, mask = np.asarray(axial), np.asarray(mask)
    if axial.shape != mask.shape or axial.ndim != 3:
        raise ValueError(f"volume_preview needs matching (Z, H, W) arrays, got {axial.shape} and {mask.shape}")
    z = preview_slices(mask, n)
    has = mask.reshape(len(mask), -1).any(axis=1)
    titles = [f"z {k}/{len(axial) - 1}" + ("" if has[k] else " (none)") for k in z]
    return overlay_montage(axial[z], None, path, pred=mask[z], titles=titles, max_panels=len(z),
                           panel_px=panel_px, columns=min(len(z), 6))
