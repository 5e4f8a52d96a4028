"""Geometry of prediction: a volume's axial slices in display orientation (`io.Volume.axial`) ->
the model's S x S inputs, and back: model-resolution logits -> native-size slices -> the 3D
clean-up -> the volume's stored voxel grid, so a mask lines up voxel for voxel with its input."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from sammix.data import io
from sammix.data.preprocess import from_square, resize_image, square_shape, to_square


def to_model_input(unit_slices: np.ndarray, size: int, spacing_rc=None) -> torch.Tensor:
    """(B,H,W) in [0,1] -> (B,1,S,S), padded to a square field of view and resized like the
    training slices (`preprocess.to_square`, `resize_image`). `spacing_rc`: in-plane mm, if known."""
    square = to_square(np.asarray(unit_slices), spacing_rc)
    return torch.from_numpy(np.stack([resize_image(s, size) for s in square]))[:, None]


def logits_to_native(logits: torch.Tensor, shape_hw: tuple[int, int], spacing_rc=None) -> np.ndarray:
    """Mask logits (N,S,S) -> bool masks (N,H,W): bilinear resize of the logits to the padded
    square, then > 0, then the padding cut off.

    The inverse of `to_model_input` (pixel centres aligned), so the mask covers the same anatomy
    it was predicted on."""
    if len(logits) == 0:
        return np.zeros((0, *shape_hw), dtype=bool)
    up = F.interpolate(logits[:, None].float(), size=square_shape(shape_hw, spacing_rc), mode="bilinear", align_corners=False)
    return from_square((up[:, 0] > 0).numpy(), shape_hw, spacing_rc)


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """A mask (H,W) or (Z,H,W) with the holes of each axial slice filled (tumours inside the organ).
    No component is dropped: keeping only the largest 3D one cuts LiTS 117's liver, which its crop
    and a few bad slices split; keeping the largest piece of a slice cut organs that one slice
    shows in two (docs/results.md). Slices apart from the organ are dropped before, where the
    volume is known (`inferer.keep_main_run`)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    return np.stack([ndimage.binary_fill_holes(s) if s.any() else s for s in mask])


def mask_to_stored(volume: io.Volume, mask_axial: np.ndarray, cleanup: bool = True, times: dict | None = None):
    """Native-size display-orientation mask (Z,H,W) -> (uint8 mask on the stored grid, the
    cleaned axial mask)."""
    times = {} if times is None else times
    t0 = time.perf_counter()
    if cleanup:
        mask_axial = clean_mask(mask_axial)
    times["cleanup"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stored = volume.from_axial(mask_axial.astype(np.uint8))
    times["reorient"] = times.get("reorient", 0.0) + time.perf_counter() - t0
    return stored, mask_axial
