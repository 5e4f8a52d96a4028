"""The methods an experiment grid can run (`sammix experiment --methods`), shared by the grid
(`experiment`) and its report (`report`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # as given to --methods and used in cell names
    short: str  # figure label
    label: str  # report label
    uses_k: bool  # trained on the k labelled slices (one cell per k)
    trained: bool  # trained; untrained methods run once
    family: str  # "sam" (SamMix), "net" (baselines.SegNet) or "nnunet" (nnU-Net v2 commands)
    per_seed: bool | None = None  # one cell per seed (default: when trained)
    in_all: bool = True  # part of --methods all

    @property
    def seeded(self) -> bool:
        return self.trained if self.per_seed is None else self.per_seed


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("unet", "U-Net", "U-Net, k labelled slices", True, True, "net"),
    Method("unet-full", "U-Net all", "U-Net, all labels (full supervision)", False, True, "net"),
    Method("swinunetr-full", "SwinUNETR all", "SwinUNETR, all labels (full supervision)", False, True, "net"),
    Method("sam-zeroshot", "SAM-PP-0", "SAM-PP-0: SAM, whole-image box, no training", False, False, "sam"),
    Method("sam-pp", "SAM-PP", "SAM-PP-k: SAM + LoRA on k slices, whole-image box", True, True, "sam"),
    Method("sam-oracle", "SAM GT box", "SAM + ground-truth box (oracle: an upper bound no user has)", False, False, "sam"),
    Method("sammix", "SAM-Mix", "SAM-Mix (CAM prompts, LoRA on k slices)", True, True, "sam"),
    # needs nnunetv2 installed (docs/results.md); nnU-Net seeds nothing, so it runs once; not in 'all'
    Method("nnunet-full", "nnU-Net all", "nnU-Net v2 2d, all labels (full supervision)", False, True, "nnunet",
           per_seed=False, in_all=False),
]}
