"""Figures: each writes a PNG of the documented pixel size, atomically, without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sammix import viz
from sammix.masks import mask_to_box

SLICES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lits-slices"


def _synthetic(n: int, size: int = 64):
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for i in range(n):
        blob = ((yy - size * 0.45) / (size * 0.25)) ** 2 + ((xx - size * (0.35 + 0.03 * i)) / (size * 0.18)) ** 2 < 1
        images.append(np.where(blob, 0.6, 0.2).astype(np.float32) + 0.05 * np.sin(xx / 3.0))
        masks.append(blob.astype(np.uint8))
    return np.stack(images), np.stack(masks)


@pytest.fixture(scope="module")
def slices():
    """Five real LiTS slices (uint8 images, 0/1 masks) when ../shared is here, synthetic ones otherwise."""
    names = sorted((SLICES / "images").glob("*.png"))[::90][:5] if SLICES.is_dir() else []
    if len(names) < 5:
        return _synthetic(5)
    images = np.stack([np.asarray(Image.open(p)) for p in names])
    masks = np.stack([(np.asarray(Image.open(SLICES / "masks" / p.name)) > 0).astype(np.uint8) for p in names])
    return images, masks


def _shifted(masks, dx):
    return np.roll(masks, dx, axis=-1)


def _png(path: Path) -> np.ndarray:
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _pixels_near(rgb: np.ndarray, hex_color: str, tol: int = 40) -> int:
    target = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.astype(int) - target).max(axis=-1) < tol).sum())


def test_overlay_montage_size_and_colours(slices, tmp_path):
    images, masks = slices
    out = viz.overlay_montage(images, masks, tmp_path / "m.png", pred=_shifted(masks, 4),
                              titles=[f"slice {i}" for i in range(5)], panel_px=96)
    rgb = _png(out)
    # 5 panels -> 3 columns x 2 rows of 96 px, 2 px gaps, a 22 px legend strip.
    assert rgb.shape[:2] == (2 * 96 + 2 + 22, 3 * 96 + 2 * 2)
    assert _pixels_near(rgb, viz.GT_COLOR) > 50
    assert _pixels_near(rgb, viz.PRED_COLOR) > 50


def test_overlay_montage_thins_to_max_panels_without_legend(slices, tmp_path):
    images = np.concatenate([slices[0], slices[0]])[:9]
    rgb = _png(viz.overlay_montage(images, None, tmp_path / "m.png", max_panels=4, panel_px=64))
    assert rgb.shape[:2] == (2 * 64 + 2, 2 * 64 + 2)
    assert _pixels_near(rgb, viz.PRED_COLOR) == 0


def test_overlay_montage_rejects_mismatched_masks(slices, tmp_path):
    with pytest.raises(ValueError, match="masks"):
        viz.overlay_montage(slices[0], slices[1][:2], tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_cam_figure(slices, tmp_path):
    image, gt = slices[0][0], slices[1][0]
    cam = np.zeros((8, 8), np.float32)
    cam[2:5, 1:4] = 1.0
    x0, y0, x1, y1 = mask_to_box(gt)
    rgb = _png(viz.cam_figure(image, cam, (x0 + 3, y0 - 2, x1 - 4, y1 + 2), tmp_path / "c.png",
                              gt_mask=gt, pred=_shifted(gt, 3), panel_px=96))
    assert rgb.shape[:2] == (22 + 96 + 22, 2 * 96 + 2)
    assert _pixels_near(rgb, viz.BOX_COLOR) > 20
    # No box and no masks is a valid figure too (the CAM found nothing).
    assert _png(viz.cam_figure(image, cam * 0, None, tmp_path / "c0.png", panel_px=96)).shape[:2] == (140, 194)


def test_dice_boxplot(tmp_path):
    rng = np.random.default_rng(0)
    scores = {m: {"LiTS": list(rng.uniform(0.6, 1, 30)), "TotalSeg": list(rng.uniform(0.3, 0.9, 20))}
              for m in ["U-Net", "SAM", "SAM-Mix k=5", "SAM-Mix k=50", "nnU-Net"]}
    scores["SAM"]["TotalSeg"] = []  # a method not scored on one set still plots
    assert _png(viz.dice_boxplot(scores, tmp_path / "b.png")).shape[:2] == (420, 140 + 80 * 10)
    small = {"a": {"x": [0.5, 0.7]}}
    assert _png(viz.dice_boxplot(small, tmp_path / "s.png")).shape[:2] == (420, 640)
    with pytest.raises(ValueError):
        viz.dice_boxplot({}, tmp_path / "e.png")


def test_qualitative_grid(slices, tmp_path):
    images, gts = slices[0][:2], slices[1][:2]
    preds = {"SAM": list(_shifted(gts, 6)), "SAM-Mix": list(gts)}
    rgb = _png(viz.qualitative_grid(images, gts, preds, tmp_path / "q.png", panel_px=80))
    # 2 rows x (ground truth + 2 methods), header and legend strips.
    assert rgb.shape[:2] == (22 + 2 * 80 + 2 + 22, 3 * 80 + 2 * 2)
    with pytest.raises(ValueError, match="SAM"):
        viz.qualitative_grid(images, gts, {"SAM": [gts[0]]}, tmp_path / "bad.png")


def test_preview_slices_spread_through_the_mask_plus_a_few_outside():
    mask = np.zeros((40, 8, 8), np.uint8)
    mask[10:30, 2:5, 2:5] = 1
    z = viz.preview_slices(mask, n=12)
    assert z == sorted(z, reverse=True) and len(set(z)) == 12
    inside = [k for k in z if 10 <= k < 30]
    assert len(inside) == 10 and inside[0] == 29 and inside[-1] == 10
    assert len(z) - len(inside) == 2
    assert viz.preview_slices(np.zeros((5, 4, 4)), n=12) == [4, 3, 2, 1, 0]


def test_volume_preview_from_hu(tmp_path):
    zz, yy, xx = np.mgrid[:40, :48, :48]
    mask = ((zz - 20) / 10.0) ** 2 + ((yy - 24) / 12.0) ** 2 + ((xx - 20) / 10.0) ** 2 < 1
    hu = np.where(mask, 60.0, -100.0) + 20 * np.sin(xx / 4.0)
    rgb = _png(viz.volume_preview(hu, mask.astype(np.uint8), tmp_path / "p.png", n=12, panel_px=48))
    assert rgb.shape[:2] == (2 * 48 + 2 + 22, 6 * 48 + 5 * 2)
    assert _pixels_near(rgb, viz.PRED_COLOR) > 20


def test_a_failed_write_leaves_no_temp_file_and_keeps_the_old_figure(slices, tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    target.write_bytes(b"previous figure")

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(viz.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        viz.overlay_montage(slices[0][:2], slices[1][:2], target)
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    assert target.read_bytes() == b"previous figure"


def test_importing_viz_does_not_import_torch():
    code = "import sys, sammix.viz; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
