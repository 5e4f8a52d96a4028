"""Simple, anatomy-preserving augmentation for slices and their masks.

No flips: the liver sits on the image's left in radiological view, and a flipped slice would
teach the classifier and SAM an anatomy that does not exist."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from sammix.data.preprocess import RAW_8BIT_WINDOW, window as to_window

# Another window's view of a slice: the HU that a window starting above them clips to 0 come back
# as fat inside the body and air outside it (fat and gas are both 0 in lits-slices: gas is taken
# for fat, the price of the clipped data)
FAT_HU, AIR_HU = -100.0, -1000.0
WINDOW_LEVELS = (30.0, 130.0)  # HU: abdomen (40 / 400), liver (60 / 160) and lits-slices' (127.5 / 255)
WINDOW_WIDTHS = (150.0, 450.0)


def random_affine(x: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator,
                  degrees: float = 10.0, scale: float = 0.1, shift: float = 0.06):
    """Same small rotation / scale / shift for each image (B,1,S,S) and its mask (B,1,S,S)."""
    b = x.shape[0]
    u = torch.rand(b, 3, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(degrees)
    zoom = 1 + u[:, 1] * scale
    t = (torch.rand(b, 2, generator=generator) * 2 - 1) * shift * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x, masks


def random_intensity(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Contrast (+-15%), brightness (+-0.08) and gamma (x e^+-0.2) jitter of images in [0,1], each
    range times `strength` (scanner and window variation)."""
    b = x.shape[0]
    r = (torch.rand(b, 3, generator=generator).to(x) * 2 - 1) * strength
    c = (1 + r[:, 0] * 0.15).view(b, 1, 1, 1)
    br = (r[:, 1] * 0.08).view(b, 1, 1, 1)
    g = torch.exp(r[:, 2] * 0.2).view(b, 1, 1, 1)
    return ((x.clamp(0, 1) ** g) * c + br).clamp(0, 1)


def random_resolution(x: torch.Tensor, generator: torch.Generator, max_factor: float = 1.0) -> torch.Tensor:
    """Each image (B,1,S,S) as a coarser scan shows it once resized to S (3 mm pixels against LiTS's
    1.5 at 256): downsampled by a factor drawn in [1, max_factor] and back, bilinear. 1: none (and
    no random numbers drawn, so runs without it are unchanged)."""
    if max_factor <= 1.0:
        return x
    s = x.shape[-1]
    factors = 1 + torch.rand(x.shape[0], generator=generator) * (max_factor - 1)
    out = torch.empty_like(x)
    for i, f in enumerate(factors.tolist()):
        side = max(8, round(s / f))
        small = F.interpolate(x[i:i + 1], size=(side, side), mode="area")
        out[i:i + 1] = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    return out


def random_window(x: torch.Tensor, generator: torch.Generator, share: float, window=None,
                  levels=WINDOW_LEVELS, widths=WINDOW_WIDTHS) -> torch.Tensor:
    """A `share` of slices (B,1,S,S), prepared at the HU `window` (level, width; None: lits-slices'
    [0, 255]), as a window drawn from `levels` x `widths` shows them: an 8-bit slice exported at
    40 / 400 has grey fat and 0.64 times the contrast of lits-slices'. 0: none (and no random
    numbers drawn)."""
    if share <= 0:
        return x
    u = torch.rand(len(x), 3, generator=generator)
    level, width = window or RAW_8BIT_WINDOW
    low = level - width / 2
    out = x.clone()
    for i in (u[:, 0] < share).nonzero().flatten().tolist():
        y = x[i, 0].float().cpu().numpy()
        hu = low + y * width
        if low > FAT_HU:  # the window clipped fat to 0 with the air: inside the body it was fat
            below = y <= 0
            hu[below] = np.where(ndimage.binary_fill_holes(y > 0), FAT_HU, AIR_HU)[below]
        new_level = levels[0] + float(u[i, 1]) * (levels[1] - levels[0])
        new_width = widths[0] + float(u[i, 2]) * (widths[1] - widths[0])
        out[i, 0] = torch.from_numpy(to_window(hu, new_level, new_width)).to(out)
    return out


def augment(x: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, t, classifier: bool = False,
            window=None):
    """The training augmentation of TrainConfig `t` for slices prepared at the HU `window`: the
    affine (image and mask), then another window's view (`random_window`), intensity and
    resolution jitter of the image at `t`'s strengths, SAM's or, with `classifier`, the classifier's."""
    intensity, resolution = t.intensity_augment, t.resolution_augment
    if classifier:
        intensity = intensity if t.cls_intensity_augment is None else t.cls_intensity_augment
        resolution = resolution if t.cls_resolution_augment is None else t.cls_resolution_augment
    x, masks = random_affine(x, masks, generator)
    x = random_window(x, generator, t.window_augment, window)
    x = random_intensity(x, generator, intensity)
    return random_resolution(x, generator, resolution), masks
