"""A SamMix prepared for fast inference: the backend `predict` gives `models.inferer.SliceInferer`,
with the same stages as the SamMix (classify + CAM, encode, decode) and less work:

* the GradCAM comes in closed form, without a backward pass (`graphs.closed_form_cam`), wherever
  the classifier's logit pools a linear map of the CAM layer (both built-in
  classifiers; checked against autograd when the engine is made, autograd otherwise);
* the image encoder is a private copy with the LoRA matrices merged into its weights and every
  Conv2d + BatchNorm2d pair folded into one convolution (exact up to float rounding), in
  channels-last layout, under `torch.inference_mode`, several slices per call;
* `precision="bf16"`: the encoder under bf16 autocast (prompt encoder and decoder stay fp32);
  faster than fp32 PyTorch here but not exact, so not the default (docs/performance.md);
* `backend="onnx"`: classifier + CAM, encoder and decoder through ONNX Runtime, from
  `export.export_model`: fp32, the same numbers, and the fastest exact engine on a CPU; with
  `precision="int8"` the encoder's linear layers run in int8 (`export.quantize_encoder`): 1.5x
  faster here, at the same Dice on the data measured (docs/performance.md), not exact.

The model passed in is not modified.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from sammix.inference.graphs import closed_form_cam, inference_encoder
from sammix.inference.sessions import FILES, onnx_session

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BACKENDS = ("torch", "onnx")


class Engine:
    """A fast `models.inferer.Backend`: the stages of a SamMix with less work per slice.

    backend "torch": PyTorch, `precision` "fp32" (the reference), "bf16" (encoder under bf16
    autocast) or "auto" (fp32: see docs/performance.md for why bf16 is not the default);
    backend "onnx": ONNX Runtime on the CPU with the graphs in folder `onnx_dir` (export.py),
    `precision` "fp32" or "int8" (the encoder's linear layers)."""

    def __init__(self, model, precision: str = "auto", backend: str = "torch", onnx_dir: Path | None = None,
                 channels_last: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model.eval()
        self.device = model.device
        self.cfg = model.cfg
        self.size = int(model.prep.size)
        self.precision = "fp32" if precision == "auto" else precision
        self.backend = backend
        self.times: dict[str, float] = defaultdict(float)  # seconds per stage, summed over calls
        full_box = model.cfg.prompt == "full_box"  # SAM-PP baselines: no classifier
        if backend == "onnx":

            if self.device.type != "cpu" or self.precision not in ("fp32", "int8"):
                raise ValueError("the ONNX Runtime backend runs fp32 or int8 on the CPU")
            if onnx_dir is None:
                raise ValueError("backend 'onnx' needs onnx_dir (a folder written by export_model)")
            self.onnx_dir = Path(onnx_dir)
            files = {**FILES, "encoder": FILES["encoder_int8" if self.precision == "int8" else "encoder"]}
            self.sessions = {k: onnx_session(self.onnx_dir / files[k])
                             for k in ("classifier", "encoder", "decoder", "decoder_refine")}
            self.decoder_inputs = [i.name for i in self.sessions["decoder"].get_inputs()]
        elif self.precision == "int8":
            raise ValueError("int8 runs through ONNX Runtime (backend 'onnx')")
        else:
            self.cam_net = None if full_box else closed_form_cam(model)
            self.channels_last = channels_last
            self.refiner = None  # the refining decoder, made when first asked for (ModelConfig.refine)
            self.encoder = inference_encoder(model).to(self.device)
            if channels_last:
                self.encoder = self.encoder.to(memory_format=torch.channels_last)

    def describe(self) -> str:
        if self.backend == "onnx":
            return f"onnxruntime (classifier with closed-form CAM fp32, encoder {self.precision}, decoder fp32)"
        cam = "whole-image box" if self.cfg.prompt == "full_box" else (
            "closed-form GradCAM" if self.cam_net is not None else "autograd GradCAM")
        return f"torch {self.precision} encoder on {self.device.type}, {cam}"

    # -- stages ---------------------------------------------------------------------------------
    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices (B,1,S,S) -> organ probabilities (B,) and normalised CAMs (B,S,S), one pass."""
        start = time.perf_counter()
        if self.backend == "onnx":
            logits, cams = (torch.from_numpy(a) for a in self.sessions["classifier"].run(None, {"slices": x.numpy()}))
        elif self.cam_net is not None:
            with torch.inference_mode():
                logits, cams = self.cam_net(x.to(self.device))
        else:
            logits, cams = self.model.prompter.compute(x.to(self.device))
        self.times["classify_cam"] += time.perf_counter() - start
        return torch.sigmoid(logits.float()).cpu(), cams.float().cpu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B,1,S,S) in [0,1] -> SAM image embeddings (B,256,64,64) fp32."""
        start = time.perf_counter()
        if self.backend == "onnx":
            session, arr = self.sessions["encoder"], x.contiguous().numpy()
            emb = torch.from_numpy(np.concatenate([session.run(None, {"slices": arr[i:i + 1]})[0]
                                                   for i in range(len(arr))]))
        else:
            with torch.inference_mode():
                inp = self.model.sam.preprocess(x.to(self.device))
                if self.channels_last:
                    inp = inp.contiguous(memory_format=torch.channels_last)
                if self.precision == "bf16":
                    with torch.autocast(self.device.type, dtype=torch.bfloat16):
                        emb = self.encoder(inp)
                else:
                    emb = self.encoder(inp)
                emb = emb.float().contiguous()
        self.times["sam_encoder"] += time.perf_counter() - start
        return emb

    def decode(self, emb: torch.Tensor, boxes: torch.Tensor, mask_prompts: torch.Tensor | None,
               refine: bool = False):
        """Embeddings + prompts -> SAM's three masks: logits (B,3,S,S) fp32, predicted IoUs (B,3);
        `refine`: through the refining decoder (`SamMix.refining_decoder`)."""
        start = time.perf_counter()
        if self.backend == "onnx":
            session, parts = self.sessions["decoder_refine" if refine else "decoder"], []
            if not refine and (mask_prompts is not None) != ("mask_prompt" in self.decoder_inputs):
                raise ValueError(f"the ONNX decoder in {self.onnx_dir} takes {self.decoder_inputs}")
            for i in range(len(emb)):
                feeds = {"embeddings": emb[i:i + 1].numpy(), "box": boxes[i:i + 1].float().numpy()}
                if mask_prompts is not None:
                    feeds["mask_prompt"] = mask_prompts[i:i + 1].float().numpy()
                parts.append(session.run(None, feeds))
            logits = torch.from_numpy(np.concatenate([p[0] for p in parts]))
            scores = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        else:
            with torch.inference_mode():
                prompts = None if mask_prompts is None else mask_prompts.to(self.device)
                if refine and self.refiner is None:
                    self.refiner = self.model.refining_decoder()
                logits, scores = self.model.sam.decode(emb.to(self.device), boxes.to(self.device), prompts,
                                                       multimask=True, size=self.size,
                                                       decoder=self.refiner if refine else None)
        self.times["sam_decoder"] += time.perf_counter() - start
        return logits.float().cpu(), scores.float().cpu()
