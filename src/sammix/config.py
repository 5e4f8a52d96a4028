"""Every knob of a run in one typed config; saved as config.yaml in each run folder
(`runfolder.RunFolder`). Also the choice of device (cheap to import: no model code)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sammix.errors import InputError

def resolve_device(name: str = "auto"):
    """"auto" | "cpu" | "cuda" -> torch.device ("auto": CUDA when torch sees a GPU)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda", "CUDA was asked for but torch sees no GPU")
    return torch.device(name)


PAPER_WINDOW = (40.0, 400.0)  # HU level, width of the paper's preprocessing
# Two meanings a window argument can have, each with its own name: RUN_WINDOW (evaluate and predict:
# the trained run's own window) and None (8-bit images as stored; HU volumes clipped to [0, 255]).
RUN_WINDOW = "run"


@dataclass
class PrepConfig:
    """How volumes become model-ready slices."""

    window: tuple[float, float] | None = PAPER_WINDOW  # HU level, width; None: 8-bit as stored
    size: int = 256  # model input side (image bilinear, mask nearest)
    middle_fraction: float = 1.0  # keep the middle fraction of each volume's slices (paper: 0.3)
    organ: str = "liver"


# ModelConfig settings that only steer inference in Python: they change no weights and no exported graph
INFERENCE_SETTINGS = ("cls_threshold", "cam_threshold", "propagate", "prompt_candidates", "match_level", "refine",
                      "level_check", "one_run")


@dataclass
class ModelConfig:
    backbone: str = "litemedsam"  # litemedsam | sam_vit_b | sam_vit_l | sam_vit_h
    checkpoint: str | None = None  # official SAM checkpoint for the sam_vit_* backbones
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])  # TinyViT and ViT both
    train_prompt_encoder: bool = False
    classifier: str = "efficientnet_lite0"  # efficientnet_lite0 | resnet38
    classifier_weights: str | None = None
    cam_layer: str | None = None  # None: the classifier's default layer
    cam_threshold: float = 0.4
    cls_pool_sharpness: float = 0.0  # 0: the logit map's mean is the slice logit (the paper); r > 0: its log-mean-exp (docs/results.md)
    mask_prompt: str = "none"  # CAM as SAM's dense mask prompt too: soft | blob | none (box only; see docs/results.md)
    cls_threshold: float = 0.5  # slices scored below this are organ-free (training sets it on validation)
    prompt: str = "cam"  # cam (SAM-Mix) | full_box (SAM-PP baselines: whole-image box, no gating)
    propagate: bool = True  # volumes: from the surest slice, each slice prompted with its neighbour's mask box (SliceInferer._propagate)
    prompt_candidates: bool = False  # try every box the CAM could mean, keep SAM's best answer (SliceInferer._choose)
    # the organ's intensity range in the labelled training slices (training sets it, as the thresholds)
    organ_levels: tuple[float, float] | None = None
    match_level: bool = True  # SAM sees a slice whose organ is outside organ_levels shifted into them (SliceInferer.sam_input)
    refine: bool = False  # SAM answers again, prompted with the box of its first mask, through the refining decoder (SliceInferer._answer)
    refine_blend: float = 0.75  # the refining decoder: this share of the decoder's fine-tuning on its pretrained weights
    one_run: bool = True  # a whole volume's masks: only their main run of slices is kept (inferer.keep_main_run)
    level_check: bool = True  # volumes: a mask off the organ's intensity in the volume is asked again from its neighbour, or emptied; one reaching past it is fitted (SliceInferer._check_levels)

    def calibrated(self, weights: dict):
        """This config with what training chose on its data (gate and CAM thresholds, organ levels),
        where `weights` (a run's saved state) holds it."""
        given = {k: weights.get(k) for k in ("cls_threshold", "cam_threshold")}
        chosen = {k: float(v) for k, v in given.items() if v is not None}
        if weights.get("organ_levels") is not None:
            chosen["organ_levels"] = tuple(float(v) for v in weights["organ_levels"])
        return dataclasses.replace(self, **chosen)


# Measured (docs/results.md): one round raised SAM-Mix-5's test Dice on 3 of 3 seeds in the full trainer;
# with 50 labelled slices it lowered it on 3 of 3 in the decoder proxy
SELF_TRAIN_MAX_LABELED = 10


@dataclass
class TrainConfig:
    labeled: int = 50  # 0: every labelled training slice
    seed: int = 0
    epochs: int = 10
    batch_size: int = 4  # SAM slices per step
    cls_batch_size: int = 16
    sam_samples_per_epoch: int = 32  # labelled slices are revisited (augmented) when k is smaller
    lr_sam: float = 1e-4
    lr_classifier: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0  # the case split stays fixed across seeds; seeds vary the k slices and init
    val_max_slices: int = 32  # organ-present validation slices scored per epoch (CPU time)
    gt_box_jitter: float = 0.0  # share of SAM samples prompted with a jittered ground-truth box
    # SAM is never taught to find the organ from a box on another one: CAM boxes overlapping the true box
    # less than this become jittered true boxes (0: CAM boxes only, as in the paper; docs/results.md)
    cam_box_min_iou: float = 0.3
    cam_box_min_organ: float = 0.0  # > 0: a CAM box at least this share organ stays too (a small box inside the organ)
    seg_loss: str = "dice_ce"  # SAM's mask loss: dice_ce | dice_focal
    mask_choice: str = "scored"  # which of SAM's 3 masks is trained: scored (ranked first) | closest (to the truth)
    anchor_weight: float = 0.0  # L2 pull of SAM's decoder towards its pretrained weights (L2-SP)
    intensity_augment: float = 1.0  # strength of the contrast / brightness / gamma jitter (0: none)
    resolution_augment: float = 1.0  # slices seen up to this factor coarser, as thick-pixel scans look (1: none)
    # the classifier's own strengths of the two above; None: the same as SAM's
    cls_intensity_augment: float | None = None
    cls_resolution_augment: float | None = None
    # share of slices seen as another HU window shows them (training/augment.random_window; 0: none):
    # built for 8-bit slices exported at another window (docs/results.md), not yet measured
    window_augment: float = 0.0
    # self-training (training/pseudo.py): after the supervised epochs, each round labels the training
    # slices without a mask and --unlabeled-data, keeps the answers the checks vouch for, and trains
    # SAM on them and the labelled slices for self_train_epochs more epochs
    self_train_rounds: int | None = None  # None: as `rounds_of_self_training` decides
    self_train_epochs: int = 3
    self_train_samples_per_epoch: int = 0  # SAM samples a self-training epoch draws (0: sam_samples_per_epoch)
    pseudo_min_score: float = 0.9  # SAM's predicted IoU (its median on validation where lower: pseudo.score_bar)
    pseudo_min_box_iou: float = 0.7  # the CAM's box against the mask's box
    pseudo_min_neighbour_dice: float = 0.8  # volumes: against the answers on the adjacent slices
    cam_align_weight: float = 1.0  # CAM-alignment loss on slices whose mask is known (the k, and crops)
    # the classifier's focal loss exponent (0: plain binary cross-entropy); focal loss stops pushing
    # slices it already calls right, so organ-free slices of another scanner can sit near 0.5
    cls_focal_gamma: float = 2.0
    crop_fraction: float = 0.3  # share of classifier samples that are crops of the k labelled slices
    calibrate_cam: bool = True  # after training, pick the CAM threshold by validation Dice
    calibrate_gate: bool = True  # each epoch, set the gate to pass every organ-present validation slice
    device: str = "auto"

    def sam_samples(self, labeled: int, self_training: bool) -> int:
        """SAM samples an epoch draws (the labelled slices are revisited, augmented, when fewer)."""
        if self_training and self.self_train_samples_per_epoch:
            return self.self_train_samples_per_epoch
        return max(labeled, self.sam_samples_per_epoch)

    def rounds_of_self_training(self, labeled: int, prompt: str) -> int:
        """The self-training rounds of a run with `labeled` slices for SAM: as set, or by default
        one round for SAM-Mix (CAM prompts) with at most SELF_TRAIN_MAX_LABELED slices, else none."""
        if self.self_train_rounds is not None:
            return self.self_train_rounds
        return int(prompt == "cam" and labeled <= SELF_TRAIN_MAX_LABELED)


class YamlConfig:
    """Run configs saved as config.yaml; `read_yaml` gives subclasses the raw sections and the
    PrepConfig (its window back to a tuple)."""

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    @staticmethod
    def read_yaml(path: Path) -> tuple[dict, PrepConfig]:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        prep = dict(raw.get("prep", {}))
        if prep.get("window") is not None:
            prep["window"] = tuple(prep["window"])
        return raw, PrepConfig(**prep)


@dataclass
class RunConfig(YamlConfig):
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: list[str] = field(default_factory=list)
    cls_only_data: list[str] = field(default_factory=list)
    slice_labels: str | None = None  # CSV of slice labels without masks (data/slice_labels.py)
    annotated_slices: str | None = None  # CSV of looked-at slices: the label volumes are sparse annotations
    unlabeled_data: list[str] = field(default_factory=list)  # images only: self-training's extra slices

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        raw, prep = cls.read_yaml(path)
        return cls(
            prep=prep,
            model=ModelConfig(**raw.get("model", {})),
            train=TrainConfig(**raw.get("train", {})),
            data=raw.get("data", []),
            cls_only_data=raw.get("cls_only_data", []),
            slice_labels=raw.get("slice_labels"),
            annotated_slices=raw.get("annotated_slices"),
            unlabeled_data=raw.get("unlabeled_data", []),
        )


def parse_window(text: str) -> tuple[float, float] | None:
    """'40,400' -> (40.0, 400.0); 'none' -> None (8-bit images as stored); 'run' -> RUN_WINDOW."""
    if text.strip().lower() in {"none", "off"}:
        return None
    if text.strip().lower() == RUN_WINDOW:
        return RUN_WINDOW
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--window expects LEVEL,WIDTH (e.g. 40,400), got {text!r}") from None
    if width <= 0:
        raise ValueError(f"--window width must be positive, got {width}")
    return level, width


def apply_overrides(cfg, items: list[str]):
    """`--set section.field=value` (value read as YAML: 128, 0.3, true, [a, b]) on a config of
    dataclass sections, e.g. "train.sam_samples_per_epoch=128". Returns the changed copy."""
    from sammix.errors import SammixError

    for item in items:
        key, sep, text = item.partition("=")
        section, _, name = key.strip().partition(".")
        part = getattr(cfg, section, None)
        if not sep or not dataclasses.is_dataclass(part) or name not in {f.name for f in dataclasses.fields(part)}:
            sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
            raise SammixError(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of "
                              f"{', '.join(sections)} and FIELD one of its settings")
        value = yaml.safe_load(text)
        old = getattr(part, name)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and value is not None and type(value) is not type(old) and not (
                isinstance(old, (tuple, list)) and isinstance(value, (tuple, list))):
            raise SammixError(f"--set {item!r}: {key} takes a {type(old).__name__}, got {value!r}")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(part, **{name: value})})
    return cfg


def with_inference_overrides(model: ModelConfig, items: list[str]) -> ModelConfig:
    """`--set model.FIELD=VALUE` for `evaluate` and `predict`: a trained run's ModelConfig with
    inference settings (`INFERENCE_SETTINGS`) changed; anything else would not match the weights."""
    from sammix.errors import SammixError

    for item in items:
        if item.partition("=")[0].strip() not in {f"model.{name}" for name in INFERENCE_SETTINGS}:
            raise SammixError(f"--set {item!r}: a trained run takes only inference settings here: "
                              + ", ".join(f"model.{name}" for name in INFERENCE_SETTINGS))
    return apply_overrides(RunConfig(model=model), items).model
