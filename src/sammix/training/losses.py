"""The segmentation loss (the classifier's focal loss lives with the classifier)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss


def segmentation_loss() -> torch.nn.Module:
    """Dice + binary cross-entropy on SAM's mask logits (B,1,S,S) against 0/1 masks."""
    return DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
