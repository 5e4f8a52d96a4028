"""Baseline segmenters for the paper's comparison: a 2D U-Net and a 2D SwinUNETR (MONAI).

They take the same slices as SAM-Mix ((B,1,S,S) in [0,1]) and answer through the same
`predict_slices` interface, so the same evaluation code scores them. A baseline run folder looks
like a SAM-Mix one (config.yaml, split.json, labeled.json, log.jsonl, last.pt, best.pt); its
config.yaml says `kind: baseline` and holds a `net` section instead of `model`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sammix.config import PrepConfig, TrainConfig, YamlConfig, resolve_device
from sammix.errors import InputError, SammixError
from sammix.masks import mask_to_box
from sammix.runfolder import RunFolder

ARCHS = ("unet", "swinunetr")
ALL_LABELED = 0  # train.labeled == 0: every labelled training slice (full supervision)


@dataclass
class NetConfig:
    arch: str = "unet"  # unet | swinunetr
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # U-Net levels
    num_res_units: int = 2  # U-Net residual units per level
    feature_size: int = 24  # SwinUNETR embedding width
    lr: float = 1e-3
    batch_size: int = 8
    threshold: float = 0.5  # foreground probability


def default_net(arch: str) -> NetConfig:
    """The settings each baseline is run with (MONAI's usual ones)."""
    if arch == "unet":
        return NetConfig(arch="unet")
    if arch == "swinunetr":
        return NetConfig(arch="swinunetr", lr=2e-4, batch_size=4)
    raise SammixError(f"unknown baseline network {arch!r}; choose one of {', '.join(ARCHS)}")


@dataclass
class BaselineRunConfig(YamlConfig):
    prep: PrepConfig = field(default_factory=PrepConfig)
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # labeled 0 = all labelled slices
    data: list[str] = field(default_factory=list)
    kind: str = "baseline"

    @classmethod
    def load(cls, path: Path) -> "BaselineRunConfig":
        raw, prep = cls.read_yaml(path)
        if raw.get("kind") != "baseline":
            raise InputError(path, "is not a baseline run config (no 'kind: baseline')")
        return cls(prep=prep, net=NetConfig(**raw.get("net", {})),
                   train=TrainConfig(**raw.get("train", {})), data=raw.get("data", []))


def build_net(cfg: NetConfig, size: int) -> nn.Module:
    """A 2D network from one grey channel to one foreground logit channel."""
    from monai.networks.nets import SwinUNETR, UNet

    if cfg.arch == "unet":
        depth = len(cfg.channels) - 1
        if size % (2 ** depth):
            raise SammixError(f"U-Net with {depth} downsamplings needs a slice size divisible by {2 ** depth}, got {size}")
        return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(cfg.channels),
                    strides=(2,) * depth, num_res_units=cfg.num_res_units)
    if cfg.arch == "swinunetr":
        if size % 32:
            raise SammixError(f"SwinUNETR needs a slice size divisible by 32, got {size}")
        try:
            import einops  # noqa: F401  (MONAI's Swin transformer needs it)
        except ImportError:
            raise SammixError("the SwinUNETR baseline needs the 'einops' package: pip install einops") from None
        return SwinUNETR(in_channels=1, out_channels=1, feature_size=cfg.feature_size, spatial_dims=2)
    raise SammixError(f"unknown baseline network {cfg.arch!r}; choose one of {', '.join(ARCHS)}")


class SegNet(nn.Module):
    """A baseline network behind SamMix's prediction interface."""

    def __init__(self, net: NetConfig | None = None, prep: PrepConfig | None = None):
        super().__init__()
        self.cfg = net or NetConfig()
        self.prep = prep or PrepConfig()
        self.net = build_net(self.cfg, self.prep.size)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,1,S,S) in [0,1] -> foreground logits (B,1,S,S)."""
        return self.net(x)

    @torch.no_grad()
    def predict_slices(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Slices (B,1,S,S) -> the keys SamMix.predict_slices returns. `present` is "the mask is
        not empty", `probs` the highest foreground probability, `boxes` the mask's box."""
        self.eval()
        prob = torch.sigmoid(self(x.to(self.device)).float())[:, 0].cpu()
        masks = prob >= self.cfg.threshold
        present = masks.flatten(1).any(1)
        boxes = torch.full((len(x), 4), float("nan"))
        for i in present.nonzero().flatten().tolist():
            boxes[i] = torch.from_numpy(mask_to_box(masks[i].numpy()))
        return {"probs": prob.flatten(1).amax(1), "present": present, "masks": masks,
                "cams": torch.zeros_like(prob), "boxes": boxes, "scores": prob.flatten(1).amax(1)}

    def predict(self, image: np.ndarray) -> np.ndarray:
        """One 2D slice in [0,1] of the model's size -> uint8 mask."""
        x = torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None]
        return self.predict_slices(x)["masks"][0].numpy().astype(np.uint8)

    @classmethod
    def load(cls, run: Path | str, device: str = "auto", weights: str = RunFolder.BEST) -> "SegNet":
        run = RunFolder(run).check(weights)
        cfg = BaselineRunConfig.load(run.config)
        model = cls(cfg.net, cfg.prep)
        state = run.load_weights(weights)
        model.net.load_state_dict(state["model"])
        return model.to(resolve_device(device)).eval()


# --------------------------------------------------------------------------------------- nnU-Net
# nnU-Net v2 runs as its own commands (often from its own venv): a run folder holds nnUNet_raw,
# nnUNet_preprocessed and nnUNet_results for one dataset of 2D PNG slices, one nnU-Net "case" per slice.

NNUNET_DATASET_ID = 501
NNUNET_DATASET = f"Dataset{NNUNET_DATASET_ID:03d}_SammixLiver"
NNUNET_DONE = "nnunet.json"


@dataclass
class NnUNetRunConfig(YamlConfig):
    prep: PrepConfig = field(default_factory=PrepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # the case split; nnU-Net has its own schedule
    data: list[str] = field(default_factory=list)
    trainer: str = "nnUNetTrainer"  # nnU-Net's default: 1000 epochs of 250 steps; nnUNetTrainer_5epochs etc. exist
    configuration: str = "2d"
    kind: str = "nnunet"

    @classmethod
    def load(cls, path: Path) -> "NnUNetRunConfig":
        raw, prep = cls.read_yaml(path)
        if raw.get("kind") != "nnunet":
            raise InputError(path, "is not an nnU-Net run config (no 'kind: nnunet')")
        return cls(prep=prep, train=TrainConfig(**raw.get("train", {})), data=raw.get("data", []),
                   trainer=raw.get("trainer", "nnUNetTrainer"), configuration=raw.get("configuration", "2d"))


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net v2 command: from $SAMMIX_NNUNET_BIN (a venv's bin folder) or PATH."""
    folder = os.environ.get("SAMMIX_NNUNET_BIN")
    found = shutil.which(name, path=folder) if folder else shutil.which(name)
    if not found:
        raise SammixError(f"{name} not found: install nnU-Net v2 (pip install nnunetv2, a separate venv is fine) "
                          "and put its bin folder on PATH or in SAMMIX_NNUNET_BIN")
    return found


def nnunet_env(run: Path) -> dict:
    run = Path(run).resolve()
    return dict(os.environ, nnUNet_raw=str(run / "nnUNet_raw"), nnUNet_preprocessed=str(run / "nnUNet_preprocessed"),
                nnUNet_results=str(run / "nnUNet_results"))


def run_logged(cmd: list[str], env: dict, log: Path) -> None:
    """Run a command with its output appended to `log`; SammixError naming the log if it fails."""
    import shlex

    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code:
        raise SammixError(f"{Path(cmd[0]).name} failed (exit {code}); its output is in {log}")


def nnunet_device(name: str) -> str:
    return "cuda" if resolve_device(name).type == "cuda" else "cpu"


class NnUNetModel:
    """A trained nnU-Net run behind the predict_slices interface (one nnUNetv2_predict call per batch)."""

    def __init__(self, run: Path | str, device: str = "auto"):
        self.run = Path(run)
        if not (self.run / NNUNET_DONE).is_file():
            raise InputError(self.run, f"no finished nnU-Net training ({NNUNET_DONE} missing)")
        self.info = json.loads((self.run / NNUNET_DONE).read_text())
        self.device = nnunet_device(device)

    def predict_slices(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from PIL import Image

        images = np.round(x[:, 0].cpu().numpy().clip(0, 1) * 255).astype(np.uint8)
        with tempfile.TemporaryDirectory(prefix="sammix-nnunet-") as tmp:
            src, dst = Path(tmp) / "in", Path(tmp) / "out"
            src.mkdir()
            for i, im in enumerate(images):
                Image.fromarray(im).save(src / f"s{i:05d}_0000.png")
            run_logged([nnunet_command("nnUNetv2_predict"), "-i", str(src), "-o", str(dst), "-d", str(NNUNET_DATASET_ID),
                        "-c", self.info["configuration"], "-tr", self.info["trainer"], "-f", str(self.info["fold"]),
                        "-chk", self.info["checkpoint"], "-device", self.device, "-npp", "1", "-nps", "1",
                        "--disable_progress_bar"], nnunet_env(self.run), self.run / "nnunet.log")
            masks = torch.from_numpy(np.stack([np.asarray(Image.open(dst / f"s{i:05d}.png")) > 0
                                               for i in range(len(images))]))
        present = masks.flatten(1).any(1)
        boxes = torch.full((len(masks), 4), float("nan"))
        for i in present.nonzero().flatten().tolist():
            boxes[i] = torch.from_numpy(mask_to_box(masks[i].numpy()))
        return {"probs": present.float(), "present": present, "masks": masks,
                "cams": torch.zeros(masks.shape), "boxes": boxes, "scores": present.float()}
