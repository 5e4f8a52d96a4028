"""GradCAM of the slice classifier -> SAM prompts (a box and a low-resolution mask).

Boxes are xyxy in inclusive pixel indices, as in `sammix.masks`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from sammix.errors import SammixError
from sammix.masks import box_iou, mask_to_box

MASK_PROMPT_SIZE = 256  # SAM's prompt encoder takes 4x its 64x64 embedding grid
# Model input (0..1) below which a 5 x 5 neighbourhood is air (or fat, under the lits-slices
# window): the organ is never there, so the CAM is not either. The tissue mask is grown by
# TISSUE_GROW pixels, so the organ's border keeps its CAM (docs/results.md).
TISSUE_LEVEL = 0.05
TISSUE_GROW = 5


def on_tissue(x: torch.Tensor) -> torch.Tensor:
    """Slices (B,1,S,S) in [0,1] -> (B,S,S) 1.0 where there is tissue nearby, 0.0 in air: outside
    the body (the table, the corners), the lungs and bowel gas."""
    local = F.avg_pool2d(x.float(), 5, stride=1, padding=2, count_include_pad=False)
    return F.max_pool2d((local > TISSUE_LEVEL).float(), 2 * TISSUE_GROW + 1, stride=1, padding=TISSUE_GROW)[:, 0]


def finish_cam(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The class-weighted activations (B,1,h,w) of slices x (B,1,S,S) -> CAMs (B,S,S) in [0,1]:
    upsampled, kept on tissue (`on_tissue`), min-max normalised (all zeros where flat)."""
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0) * on_tissue(x)
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 1e-12, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))


def _normalised(cam) -> np.ndarray | None:
    """Min-max to [0, 1]; None when the map is all NaN/inf or flat (no location in it)."""
    c = np.asarray(cam, dtype=np.float64)
    finite = np.isfinite(c)
    if not finite.any():
        return None
    lo, hi = c[finite].min(), c[finite].max()
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return None
    return np.where(finite, (c - lo) / (hi - lo), 0.0)


def main_component(cam, threshold: float = 0.4) -> np.ndarray | None:
    """The main blob of the map thresholded at `threshold` (of its min-max range), as a bool mask.

    Main = the 8-connected component with the largest CAM mass (sum of its values). Mass rather
    than area or "holds the maximum": a one-pixel spike at the peak loses to the organ-sized blob
    next to it, and a wide faint plateau loses to a compact confident blob. None for a flat or
    non-finite map.
    """
    c = _normalised(cam)
    if c is None:
        return None
    fg = c >= min(float(threshold), 1.0)  # the peak (1.0) is always in, so fg is never empty
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
    if n == 1:
        return labels == 1
    mass = ndimage.sum_labels(c, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(mass)) + 1)


def candidate_boxes(cam, thresholds=(0.2, 0.3, 0.4, 0.5), per_threshold: int = 3, min_mass: float = 0.1,
                    same_iou: float = 0.9) -> np.ndarray:
    """Several boxes a CAM could mean, for SAM to try (`SliceInferer`): at each threshold, the
    boxes of the `per_threshold` components with the largest CAM mass (those with at least
    `min_mass` of the largest one's), each kept once (boxes overlapping an earlier one with IoU
    above `same_iou` are the same). (K, 4); a flat map gives the whole slice."""
    c = _normalised(cam)
    h, w = np.asarray(cam).shape[-2:]
    if c is None:
        return np.array([[0, 0, w - 1, h - 1]], dtype=np.float32)
    boxes: list[np.ndarray] = []
    for t in thresholds:
        labels, n = ndimage.label(c >= t, structure=np.ones((3, 3), bool))
        mass = ndimage.sum_labels(c, labels, index=np.arange(1, n + 1))
        for k in np.argsort(-mass)[:per_threshold]:
            if mass[k] < min_mass * mass.max():
                break
            box = mask_to_box(labels == k + 1)
            if all(box_iou(box, b) <= same_iou for b in boxes):
                boxes.append(box)
    return np.stack(boxes).astype(np.float32)


def cam_to_box(cam, threshold: float = 0.4) -> np.ndarray:
    """The box of the CAM's main blob (see `main_component`).

    Fallback: a flat, empty or NaN map carries no location, so the whole slice is the box (SAM
    then segments the most salient object inside). No threshold lowering is needed: the map is
    min-max normalised first, so any non-flat map has its peak above every threshold <= 1.
    """
    c = np.asarray(cam)
    blob = main_component(c, threshold)
    if blob is None:
        h, w = c.shape[-2:]
        return np.array([0, 0, w - 1, h - 1], dtype=np.float32)
    return mask_to_box(blob)


def cam_to_mask_prompt(cam, threshold: float = 0.4, scale: float = 16.0, mode: str = "soft") -> torch.Tensor:
    """A (1, 256, 256) logit map for SAM's dense mask prompt from a CAM.

    "soft": the normalised CAM mapped piecewise-linearly, threshold -> 0, 1 -> +scale, 0 -> -scale,
    and -scale outside the main blob; "blob": +scale on the main blob, -scale elsewhere.
    A flat / NaN map gives all zeros (no information either way).

    Scale: SAM's own low-res logits for a liver span about -50..+15. With pretrained LiteMedSAM
    (10 LiTS slices, oracle CAMs) scales 4 and 8 did worse than 16, and 16, 32, 64 did the same.
    Note that the pretrained LiteMedSAM gains nothing from any mask prompt, even the true mask
    (MedSAM was trained on boxes only): the mask path is only worth it once fine-tuned.
    """
    c = _normalised(cam)
    if c is None:
        return torch.zeros(1, MASK_PROMPT_SIZE, MASK_PROMPT_SIZE)
    blob = main_component(c, threshold)
    t = min(max(float(threshold), 1e-3), 1 - 1e-3)
    if mode == "blob":
        logits = np.where(blob, scale, -scale)
    elif mode == "soft":
        logits = np.where(c >= t, (c - t) / (1 - t), (c - t) / t) * scale
        logits = np.where(blob, logits, -scale)
    else:
        raise ValueError(f"mask prompt mode must be 'soft' or 'blob', got {mode!r}")
    m = torch.as_tensor(logits, dtype=torch.float32)[None, None]
    if m.shape[-2:] != (MASK_PROMPT_SIZE, MASK_PROMPT_SIZE):
        m = F.interpolate(m, size=(MASK_PROMPT_SIZE, MASK_PROMPT_SIZE), mode="bilinear", align_corners=False)
    return m[0]


class CamPrompts:
    """SAM prompts from normalised CAMs: a box around the main blob above `threshold`, and a mask
    prompt (`mask_mode` "soft", "blob", or "none": box only)."""

    def __init__(self, threshold: float = 0.4, mask_scale: float = 16.0, mask_mode: str = "soft"):
        if mask_mode not in ("soft", "blob", "none"):
            raise SammixError(f"mask prompt mode must be soft, blob or none, got {mask_mode!r}")
        self.threshold = threshold
        self.mask_scale = mask_scale
        self.mask_mode = mask_mode

    def prompts(self, cams, present=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Boxes (B, 4) float xyxy in slice pixels and mask prompts (B, 1, 256, 256) logits.

        Slices marked not present (present[i] false) get the whole-slice box and an all-negative
        mask prompt ("nothing here"); callers should still blank their output. With
        mask_mode "none" the mask prompts are None (box only; SAM's no-mask embedding).
        """
        cams = cams.detach().cpu().numpy() if isinstance(cams, torch.Tensor) else np.asarray(cams)
        if cams.ndim == 2:
            cams = cams[None]
        b, h, w = cams.shape
        with_masks = self.mask_mode != "none"
        present = np.ones(b, bool) if present is None else np.asarray(torch.as_tensor(present).cpu()).reshape(-1) > 0
        boxes, masks = [], []
        for i in range(b):
            if present[i]:
                boxes.append(cam_to_box(cams[i], self.threshold))
                if with_masks:
                    masks.append(cam_to_mask_prompt(cams[i], self.threshold, self.mask_scale, self.mask_mode))
            else:
                boxes.append(np.array([0, 0, w - 1, h - 1], dtype=np.float32))
                if with_masks:
                    masks.append(torch.full((1, MASK_PROMPT_SIZE, MASK_PROMPT_SIZE), -float(self.mask_scale)))
        boxes = torch.as_tensor(np.stack(boxes), dtype=torch.float32)
        return boxes, (torch.stack(masks) if with_masks else None)


class CamPrompter(CamPrompts):
    """GradCAM of a SliceClassifier's "organ present" logit, and the SAM prompts made from it.

    A small hook implementation rather than monai.visualize.GradCAM: MONAI's keeps its hooks on
    the model for good, calls model.zero_grad() (which would wipe the gradients of a training step
    that asks for prompts), expects (B, C) logits and normalises through numpy. Here the hooked
    activation is detached and differentiated with torch.autograd.grad, so parameter gradients are
    never touched and a frozen classifier works too.
    """

    def __init__(
        self,
        classifier: nn.Module,
        layer: str | None = None,
        threshold: float = 0.4,
        mask_scale: float = 16.0,
        mask_mode: str = "soft",
    ):
        super().__init__(threshold, mask_scale, mask_mode)
        self.classifier = classifier
        self.layer = layer or classifier.default_cam_layer
        modules = dict(classifier.named_modules())
        if self.layer not in modules:
            raise SammixError(
                f"CAM layer {self.layer!r} is not a module of the {getattr(classifier, 'name', 'classifier')} "
                f"classifier (its default is {getattr(classifier, 'default_cam_layer', None)!r})"
            )
        self.module = modules[self.layer]

    def compute(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One eval-mode forward: logits (B,) and CAMs (B, H, W) in [0, 1], both detached."""
        store = {}

        def hook(_module, _inp, out):
            store["act"] = out.detach().requires_grad_(True)
            return store["act"]

        was_training = self.classifier.training
        handle = self.module.register_forward_hook(hook)
        try:
            self.classifier.eval()
            # GradCAM needs autograd even when the caller runs under no_grad or inference_mode
            with torch.inference_mode(False), torch.enable_grad():
                logits = self.classifier(x.clone() if x.is_inference() else x)
                act = store["act"]
                (grad,) = torch.autograd.grad(logits.sum(), act)
        finally:
            handle.remove()
            self.classifier.train(was_training)
        with torch.no_grad():
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = finish_cam(F.relu((weights * act).sum(dim=1, keepdim=True)), x)
        return logits.detach(), cam

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x)[1]

