"""From stored intensities to model-ready (S, S) slices in [0, 1], and masks to match."""

from __future__ import annotations

import numpy as np
from PIL import Image

# HU volumes prepared with window=None follow the lits-slices convention: HU clipped to [0, 255].
RAW_8BIT_WINDOW = (127.5, 255.0)


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> float32 in [0, 1]: level - width/2 maps to 0, level + width/2 to 1."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / width, 0.0, 1.0).astype(np.float32)


def to_unit(image: np.ndarray) -> np.ndarray:
    """An integer image (uint8: /255, uint16: /65535) -> float32 in [0, 1]."""
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"to_unit expects an integer image, got {image.dtype}")
    return (image.astype(np.float32) / float(np.iinfo(image.dtype).max)).astype(np.float32)


def slice_to_unit(image: np.ndarray, window_: tuple[float, float] | None) -> np.ndarray:
    """A 2D image as read from disk -> [0, 1]. 8-bit images are used as they are (/255) whatever
    the window; other values are HU and go through the window (lits-slices convention if None)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return to_unit(image)
    return window(image, *(window_ or RAW_8BIT_WINDOW))


def volume_to_unit(hu: np.ndarray, window_: tuple[float, float] | None) -> np.ndarray:
    """HU -> [0, 1] through the window; window None clips HU to [0, 255] like lits-slices."""
    return window(hu, *(window_ or RAW_8BIT_WINDOW))


def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    rows, cols = size
    return int(rows), int(cols)


def square_padding(shape_rc: tuple[int, int], spacing_rc: tuple[float, float] | None = None):
    """((top, bottom), (left, right)) pixels that make a (rows, cols) slice cover a square field of
    view: in mm where the in-plane spacing is known, else in pixels. Resized to S x S after this
    padding, a slice keeps its aspect ratio (a 366 x 303 mm TotalSegmentator crop would otherwise
    be stretched by a fifth, and the model sees another anatomy than it was trained on)."""
    rows, cols = (int(n) for n in shape_rc)
    sr, sc = spacing_rc if spacing_rc is not None else (1.0, 1.0)
    side = max(rows * sr, cols * sc)
    pads = []
    for n, s in ((rows, sr), (cols, sc)):
        extra = max(0, int(round(side / s)) - n)
        pads.append((extra // 2, extra - extra // 2))
    return tuple(pads)


def square_shape(shape_rc: tuple[int, int], spacing_rc: tuple[float, float] | None = None) -> tuple[int, int]:
    """The (rows, cols) of a slice of this shape once padded by `square_padding`."""
    return tuple(int(n) + sum(p) for n, p in zip(shape_rc, square_padding(shape_rc, spacing_rc)))


def to_square(image: np.ndarray, spacing_rc: tuple[float, float] | None = None) -> np.ndarray:
    """An image or a stack (..., H, W) padded with zeros (air, after the window) to a square field of view."""
    image = np.asarray(image)
    pads = square_padding(image.shape[-2:], spacing_rc)
    if not any(sum(p) for p in pads):
        return image
    return np.pad(image, [(0, 0)] * (image.ndim - 2) + list(pads))


def from_square(image: np.ndarray, shape_rc: tuple[int, int], spacing_rc: tuple[float, float] | None = None):
    """The inverse of `to_square`: (..., H', W') -> the original (..., H, W) part."""
    (top, _), (left, _) = square_padding(shape_rc, spacing_rc)
    rows, cols = shape_rc
    return image[..., top:top + rows, left:left + cols]


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of a 2D image to `size` (int side, or (rows, cols)); float32 out."""
    rows, cols = _size_hw(size)
    image = np.asarray(image, dtype=np.float32)
    if image.shape == (rows, cols):
        return image.copy()
    out = Image.fromarray(image).resize((cols, rows), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """Nearest-neighbour resize of a 2D label mask to `size`; uint8 out (labels kept)."""
    rows, cols = _size_hw(size)
    mask = np.asarray(mask)
    if mask.max(initial=0) > 255 or mask.min(initial=0) < 0:
        raise ValueError("resize_mask expects labels in 0..255")
    mask = mask.astype(np.uint8)
    if mask.shape == (rows, cols):
        return mask.copy()
    return np.asarray(Image.fromarray(mask).resize((cols, rows), Image.NEAREST), dtype=np.uint8)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 0..255 (how the slice cache stores images)."""
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def middle_slices(n: int, fraction: float) -> range:
    """The middle `fraction` of n slices (at least one), centred."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"middle fraction must be in (0, 1], got {fraction}")
    keep = min(n, max(1, int(round(n * fraction))))
    start = (n - keep) // 2
    return range(start, start + keep)


def resized_spacing(spacing_rc: tuple[float, float] | None, shape_rc: tuple[int, int], size) -> tuple[float, float]:
    """mm per pixel after resizing a (rows, cols) slice with that spacing to `size` (NaN unknown)."""
    if spacing_rc is None:
        return float("nan"), float("nan")
    rows, cols = _size_hw(size)
    return spacing_rc[0] * shape_rc[0] / rows, spacing_rc[1] * shape_rc[1] / cols
