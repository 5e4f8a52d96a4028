"""The segmentation loss (the classifier's focal loss lives with the classifier)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceFocalLoss

from sammix.errors import SammixError


def segmentation_loss(name: str = "dice_ce") -> torch.nn.Module:
    """Dice + binary cross-entropy (dice_ce) or Dice + focal (dice_focal) on SAM's mask logits
    (B,1,S,S) against 0/1 masks."""
    if name == "dice_ce":
        return DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    if name == "dice_focal":
        return DiceFocalLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    raise SammixError(f"train.seg_loss {name!r}: expected dice_ce or dice_focal")
