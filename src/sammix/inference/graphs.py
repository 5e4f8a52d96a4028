"""The inference forms of a SamMix's parts, for the fast engine (`engine.Engine`) and the ONNX
export (`export.export_model`): the GradCAM in closed form, the image encoder with LoRA merged and
Conv+BN fused, and the encoder and decoder as the modules that are exported."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sammix.models.cam import finish_cam


def _layer_grad(model, x: torch.Tensor) -> torch.Tensor:
    """d(sum of logits) / d(CAM layer output), as `CamPrompter.compute` takes it (eval mode)."""
    clf, store = model.classifier, {}

    def hook(_module, _inp, out):
        store["act"] = out.detach().requires_grad_(True)
        return store["act"]

    handle = model.prompter.module.register_forward_hook(hook)
    was_training = clf.training
    try:
        clf.eval()
        with torch.inference_mode(False), torch.enable_grad():
            (grad,) = torch.autograd.grad(clf(x).sum(), store["act"])
    finally:
        handle.remove()
        clf.train(was_training)
    return grad


def linear_cam_weights(model) -> torch.Tensor | None:
    """Per-channel weights w (C,) when the logit pools a linear 1x1 map of the CAM layer's output A
    (z_ij = sum_c w_c A_cij + b) with pooling weights that sum to 1: its mean (a 1x1-conv logit
    map, or a linear head on global average pooling) or its log-mean-exp. GradCAM's weights, the
    spatial mean of d logit / dA_c, are then w_c / (h w) for every input, and the CAM is
    relu(sum_c w_c A_c) / (h w): no backward pass needed. None when they depend on the input."""
    grads = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        grads.append(_layer_grad(model, torch.rand(2, 1, 64, 64, generator=gen).to(model.device)))
    sums = torch.cat(grads).sum(dim=(2, 3))  # (B, C): w_c for every input
    weights = sums[0]
    scale = float(weights.abs().max()) or 1.0
    if not torch.allclose(sums, weights.expand_as(sums), rtol=1e-4, atol=1e-5 * scale):
        return None
    return weights.detach().float()


class ClassifierWithCam(nn.Module):
    """A SliceClassifier -> (logits (B,), GradCAM (B,S,S) normalised to [0,1]) in one forward,
    using `linear_cam_weights`; the same numbers as `CamPrompter.compute` (autograd)."""

    def __init__(self, classifier, layer: str, weights: torch.Tensor):
        super().__init__()
        self.classifier = classifier
        self.layer = layer
        self.register_buffer("weights", weights.view(1, -1, 1, 1).clone())

    def forward(self, x):
        store = {}
        module = dict(self.classifier.named_modules())[self.layer]
        handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
        try:
            logits = self.classifier(x)
        finally:
            handle.remove()
        act = store["act"]
        h, w = act.shape[-2:]
        return logits, finish_cam(F.relu((self.weights / (h * w) * act).sum(dim=1, keepdim=True)), x)


def closed_form_cam(model) -> ClassifierWithCam | None:
    """`ClassifierWithCam` for this model's classifier and CAM layer, checked against
    `CamPrompter.compute` on a small input; None where the closed form does not hold."""
    weights = linear_cam_weights(model)
    if weights is None:
        return None
    net = ClassifierWithCam(model.classifier, model.prompter.layer, weights.to(model.device)).eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2)).to(model.device)
    ref_logits, ref_cams = model.prompter.compute(x)
    with torch.no_grad():
        logits, cams = net(x)
    ok = torch.allclose(logits, ref_logits, atol=1e-4) and torch.allclose(cams, ref_cams, atol=1e-4)
    return net if ok else None


class EncoderForExport(nn.Module):
    """Slices (B,1,S,S) in [0,1] -> SAM image embeddings, preprocessing included."""

    def __init__(self, backbone, encoder):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(self.backbone.preprocess(x))


class DecoderForExport(nn.Module):
    """One slice's embedding + box + mask prompt -> SAM's three mask logits and their scores;
    `decoder`: another mask decoder in place of the backbone's own (the refining one)."""

    def __init__(self, backbone, size: int, decoder: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.size = size
        self.decoder = decoder

    def forward(self, embeddings, box, mask_prompt=None):
        return self.backbone.decode(embeddings, box, mask_prompt, multimask=True, size=self.size,
                                    decoder=self.decoder)


def fuse_conv_bn(module: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d inside an nn.Sequential into
    the convolution (in place). Returns the number of pairs fused."""
    fused = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                fused += 1
    return fused


def inference_encoder(model) -> nn.Module:
    """A copy of the SAM image encoder for inference: LoRA merged, Conv+BN fused, eval, no grad."""
    from peft.tuners.lora import LoraModel

    enc = copy.deepcopy(model.sam.sam.image_encoder).eval()
    if isinstance(enc, LoraModel):
        enc = enc.merge_and_unload()
    fuse_conv_bn(enc)
    enc.requires_grad_(False)
    return enc
