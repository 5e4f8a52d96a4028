"""SAM-Mix: the slice classifier and the LoRA-tuned SAM joined.

The classifier gates each slice (organ present or not); its GradCAM becomes a box and a dense
mask prompt; SAM returns three candidate masks and the best-scored one is the answer.
No human prompt is needed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sammix.config import ModelConfig, PrepConfig, RunConfig, resolve_device
from sammix.errors import InputError
from sammix.models.cam import CamPrompter
from sammix.models.classifier import build_classifier
from sammix.models.inferer import SliceInferer
from sammix.runfolder import RunFolder
from sammix.models.sam import (
    base_weights_info,
    build_sam,
    load_trainable_state_dict,
    trainable_state_dict,
)

class SamMix(nn.Module):
    def __init__(self, model: ModelConfig | None = None, prep: PrepConfig | None = None):
        super().__init__()
        self.cfg = model or ModelConfig()
        self.prep = prep or PrepConfig()
        self.classifier = build_classifier(self.cfg)
        self.sam = build_sam(self.cfg)
        # the decoder before fine-tuning, for the refining decoder (kept on the CPU: 16 MB for LiteMedSAM)
        self.pretrained_decoder = {n: p.detach().cpu().clone() for n, p in self.sam.sam.mask_decoder.named_parameters()}
        self.prompter = CamPrompter(self.classifier, self.cfg.cam_layer, self.cfg.cam_threshold,
                                    mask_mode=self.cfg.mask_prompt)

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device

    @property
    def size(self) -> int:
        return int(self.prep.size)

    # -- the two branches -------------------------------------------------------------------
    def cam_prompts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """GradCAM of the classifier -> (cams (B,S,S), boxes (B,4), mask prompts (B,1,256,256)),
        for training. Prompts are inputs to SAM, not a path for its gradients: they are detached.
        With `prompt: full_box` (the SAM-PP baselines) the box is the whole image and there is no mask."""
        if self.cfg.prompt == "full_box":
            b, _, h, w = x.shape
            boxes = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0], device=x.device).repeat(b, 1)
            return torch.ones(b, h, w, device=x.device), boxes, None
        cams = self.prompter.cams(x)
        boxes, mask_prompts = self.prompter.prompts(cams)
        return cams, boxes.to(x.device), None if mask_prompts is None else mask_prompts.to(x.device)

    # -- the inference backend (`models.inferer.Backend`) ----------------------------------------
    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cams = self.prompter.compute(x.to(self.device))
        return torch.sigmoid(logits.float()).cpu(), cams.float().cpu()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sam.encode(x.to(self.device))

    @torch.no_grad()
    def decode(self, emb: torch.Tensor, boxes: torch.Tensor, mask_prompts: torch.Tensor | None,
               refine: bool = False):
        decoder = self.refining_decoder() if refine else None
        logits, scores = self.sam.decode(emb, boxes.to(emb.device), mask_prompts, size=self.size, decoder=decoder)
        return logits.float().cpu(), scores.float().cpu()

    def refining_decoder(self) -> nn.Module:
        """A copy of the mask decoder `cfg.refine_blend` of the way from its pretrained weights to
        the fine-tuned ones (WiSE-FT's interpolation), for `SliceInferer._answer`'s second
        question. Given a box that fits the organ, the pretrained decoder draws a closer outline
        than the fine-tuned one, which has learnt to reach past loose CAM boxes (docs/results.md)."""
        decoder = copy.deepcopy(self.sam.sam.mask_decoder).eval()
        with torch.no_grad():
            for n, p in decoder.named_parameters():
                p.lerp_(self.pretrained_decoder[n].to(p.device), 1.0 - float(self.cfg.refine_blend))
        return decoder

    def predict_slices(self, x: torch.Tensor, gate: bool = True,
                       boxes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Slices (B,1,S,S) in [0,1] -> masks (B,S,S) bool, probs, present, cams, boxes, scores
        (`SliceInferer.predict`, with the answers of organ-free slices filled in: empty mask,
        NaN box, score 0). Given `boxes` (B,4), SAM is prompted with them (the oracle)."""
        self.eval()
        b, _, s, _ = x.shape
        res = SliceInferer(self).predict(x, gate, boxes)
        idx = res["index"]
        out = {"probs": res["probs"], "present": res["present"],
               "cams": torch.zeros(b, s, s) if res["cams"] is None else res["cams"],
               "masks": torch.zeros(b, s, s, dtype=torch.bool), "boxes": torch.full((b, 4), float("nan")),
               "scores": torch.zeros(b)}
        out["masks"][idx] = res["logits"] > 0
        out["boxes"][idx] = res["boxes"].float()
        out["scores"][idx] = res["scores"]
        return out

    def predict(self, image: np.ndarray) -> np.ndarray:
        """One 2D slice in [0,1] (any size) -> uint8 mask of the same size."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"predict expects one 2D slice, got shape {image.shape}")
        s = self.prep.size
        x = torch.from_numpy(image)[None, None]
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        mask = self.predict_slices(x)["masks"][0].float()[None, None]
        mask = F.interpolate(mask, size=image.shape, mode="nearest")
        return mask[0, 0].numpy().astype(np.uint8)

    # -- weights ----------------------------------------------------------------------------
    def trained_state(self) -> dict:
        """What training changed: the classifier and SAM's trained parts (LoRA + decoder)."""
        return {
            "classifier": self.classifier.state_dict(),
            "sam": trainable_state_dict(self.sam),
            "base_weights": base_weights_info(self.cfg),
        }

    def load_trained_state(self, state: dict, source: Path | str = "weights") -> None:
        expected = base_weights_info(self.cfg)
        if state.get("base_weights", {}).get("sha256") != expected.get("sha256"):
            raise InputError(source, f"trained on other base weights ({state.get('base_weights')}), "
                                     f"not {expected.get('file')}")
        self.classifier.load_state_dict(state["classifier"])
        load_trainable_state_dict(self.sam, state["sam"])
        self.apply_calibration(state)

    def apply_calibration(self, chosen: dict) -> None:
        """Take what training chose on its data (`ModelConfig.calibrated`: the gate and CAM
        thresholds, the organ levels), where `chosen` (a run's saved state) holds it."""
        self.cfg = self.cfg.calibrated(chosen)
        self.prompter.threshold = self.cfg.cam_threshold

    def set_thresholds(self, cls_threshold: float | None = None, cam_threshold: float | None = None) -> None:
        """Set the gate (classifier) and CAM thresholds; None keeps the current one."""
        self.apply_calibration({"cls_threshold": cls_threshold, "cam_threshold": cam_threshold})

    @classmethod
    def load(cls, run: Path | str, device: str = "auto", weights: str = RunFolder.BEST) -> "SamMix":
        run = RunFolder(run).check(weights)
        cfg = RunConfig.load(run.config)
        state = run.load_weights(weights)
        model = cls(cfg.model, cfg.prep)
        model.load_trained_state(state.get("model", state), run / weights)
        return model.to(resolve_device(device)).eval()
