"""Training the U-Net / SwinUNETR baselines under SAM-Mix's rules.

Same data, same case split (split_cases with the same split_seed), the same k labelled slices for a
given seed (sample_labeled), the same augmentation, Dice + CE loss, AdamW, best checkpoint by
validation Dice on the same validation slices, and the same run folder (config.yaml, split.json,
labeled.json, log.jsonl, last.pt, best.pt). `train.labeled == 0` trains on every labelled
training slice (full supervision).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from sammix.data.io import atomic_path, write_json
from sammix.data.splits import sample_labeled, split_cases
from sammix.errors import SammixError
from sammix.models.baselines import (ALL_LABELED, NNUNET_DATASET, NNUNET_DATASET_ID,
                                     NNUNET_DONE, BaselineRunConfig, NnUNetRunConfig, SegNet, nnunet_command,
                                     nnunet_device, nnunet_env, run_logged)
from sammix.masks import dice_score
from sammix.runfolder import RunFolder
from sammix.training.augment import random_affine, random_intensity
from sammix.training.loop import EpochTrainer
from sammix.training.losses import segmentation_loss
from sammix.training.slices import load_sources


class BaselineTrainer(EpochTrainer):
    def __init__(self, cfg: BaselineRunConfig, out: Path, cache_dir: Path | None = None):
        super().__init__(cfg, out)
        self.name = cfg.net.arch
        t = cfg.train

        self.data = load_sources(cfg.data, cfg.prep, cache_dir, masks=True)
        self.split = split_cases(sorted(set(self.data.case)), t.val_fraction, t.test_fraction, seed=t.split_seed)
        train_idx = self.data.indices_for(self.split["train"])
        self.val_idx = self.data.indices_for(self.split["val"])
        if t.labeled == ALL_LABELED:
            self.labeled = train_idx[self.data.has_mask[train_idx]]
        else:
            self.labeled = np.array(sample_labeled(self.data, train_idx, t.labeled, seed=t.seed))
        if len(self.labeled) == 0:
            raise SammixError(f"{', '.join(cfg.data)}: no labelled training slice to train {cfg.net.arch} on")
        self.record_split(self.data, self.split, self.labeled)

        self.model = SegNet(cfg.net, cfg.prep).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.net.lr, weight_decay=t.weight_decay)
        self.loss = segmentation_loss()
        self.resume()

    # -- what the shared loop (`loop.EpochTrainer`) asks of a trainer ------------------------------
    def model_state(self) -> dict:
        return self.model.net.state_dict()

    def load_model_state(self, state: dict) -> None:
        self.model.net.load_state_dict(state)

    best_weights = model_state

    def optimizers(self) -> dict:
        return {"opt": self.opt}

    def score(self, losses: dict, val: dict) -> float:
        return val.get("val_dice", -losses["seg_loss"])

    def _tensor(self, idx) -> torch.Tensor:
        return torch.from_numpy(self.data.images[idx].astype(np.float32) / 255.0).unsqueeze(1).to(self.device)

    def steps_per_epoch(self) -> int:
        """As for SAM-Mix: few labelled slices are revisited (augmented) up to sam_samples_per_epoch."""
        return self.cfg.train.sam_samples(len(self.labeled), self_training=False)

    def run_epoch(self, bar) -> dict:
        n, bs = self.steps_per_epoch(), self.cfg.net.batch_size
        order = self.labeled[torch.randperm(n, generator=self.gen).numpy() % len(self.labeled)]
        losses = []
        self.model.train()
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            x = self._tensor(idx)
            m = torch.from_numpy(self.data.masks[idx]).float().unsqueeze(1).to(self.device)
            x, m = random_affine(x, m, self.gen)
            x = random_intensity(x, self.gen)
            loss = self.loss(self.model(x), m)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(loss.item())
            bar.update(len(idx))
        return {"seg_loss": float(np.mean(losses))}

    @torch.no_grad()
    def validate(self) -> dict:
        """Dice on the organ-present validation slices SAM-Mix validates on (at most val_max_slices)."""
        t = self.cfg.train
        present = [i for i in self.val_idx if self.data.labels[i] and self.data.has_mask[i]]
        keep = np.array(present[:: max(1, len(present) // t.val_max_slices)][: t.val_max_slices], dtype=int)
        if len(keep) == 0:
            return {}
        dices = []
        for start in range(0, len(keep), self.cfg.net.batch_size):
            idx = keep[start:start + self.cfg.net.batch_size]
            masks = self.model.predict_slices(self._tensor(idx))["masks"].numpy()
            dices += [dice_score(p, self.data.masks[i] > 0) for p, i in zip(masks, idx)]
        return {"val_dice": float(np.mean(dices)), "val_slices_scored": len(dices)}


def train_baseline(cfg: BaselineRunConfig, out: Path, cache_dir: Path | None = None) -> dict:
    """Train (or resume, or reuse) a baseline run folder; returns {"best_val_score"} (its validation Dice)."""
    return BaselineTrainer(cfg, Path(out), cache_dir).fit()


# --------------------------------------------------------------------------------------- nnU-Net

def nnunet_name(case: str, index: int) -> str:
    """An nnU-Net case identifier for one slice (nnU-Net sees every slice as its own 2D case)."""
    return "".join(ch if ch.isalnum() or ch in "-" else "-" for ch in str(case)) + f"_{int(index):04d}"


def write_nnunet_raw(slices, idx, dataset_dir: Path, organ: str = "liver") -> list[str]:
    """Slices `idx` (with masks) as an nnU-Net v2 raw dataset of 2D PNGs (NaturalImage2DIO):
    imagesTr/<name>_0000.png (the cached uint8 image), labelsTr/<name>.png (0/1), dataset.json."""
    from PIL import Image

    dataset_dir = Path(dataset_dir)
    (dataset_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dataset_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    names = []
    for i in idx:
        name = nnunet_name(slices.case[i], slices.slice_index[i])
        Image.fromarray(slices.images[i]).save(dataset_dir / "imagesTr" / f"{name}_0000.png")
        Image.fromarray((slices.masks[i] > 0).astype(np.uint8)).save(dataset_dir / "labelsTr" / f"{name}.png")
        names.append(name)
    if len(set(names)) != len(names):
        raise SammixError("two slices map to the same nnU-Net case name")
    (dataset_dir / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, organ: 1},
        "numTraining": len(names), "file_ending": ".png"}, indent=1))
    return names


def train_nnunet(cfg: NnUNetRunConfig, out: Path, cache_dir: Path | None = None) -> dict:
    """nnU-Net v2 (2d) on every labelled slice of the training cases, validated on the validation
    cases (our split, written as nnU-Net's splits_final.json, fold 0); predictions use the best
    checkpoint by nnU-Net's validation Dice, as the other baselines do. Reuses a finished run and
    continues an interrupted one."""
    out = Path(out)
    RunFolder(out).prepare(cfg)
    if (out / NNUNET_DONE).is_file():
        return json.loads((out / NNUNET_DONE).read_text())
    train_cmd = nnunet_command("nnUNetv2_train")
    plan_cmd = nnunet_command("nnUNetv2_plan_and_preprocess")
    t = cfg.train
    data = load_sources(cfg.data, cfg.prep, cache_dir, masks=True)
    split = split_cases(sorted(set(data.case)), t.val_fraction, t.test_fraction, seed=t.split_seed)
    tr, va = (data.indices_for(split[p]) for p in ("train", "val"))
    tr, va = tr[data.has_mask[tr]], va[data.has_mask[va]]
    RunFolder(out).write_split(split, [{"case": data.case[i], "slice": int(data.slice_index[i])} for i in tr])
    env, log = nnunet_env(out), out / "nnunet.log"
    pre = out / "nnUNet_preprocessed" / NNUNET_DATASET
    if not (pre / "nnUNetPlans.json").is_file():
        write_nnunet_raw(data, np.concatenate([tr, va]), out / "nnUNet_raw" / NNUNET_DATASET, cfg.prep.organ)
        run_logged([plan_cmd, "-d", str(NNUNET_DATASET_ID), "-c", cfg.configuration, "-np", "2",
                    "--verify_dataset_integrity"], env, log)
    write_json([{"train": [nnunet_name(data.case[i], data.slice_index[i]) for i in tr],
                 "val": [nnunet_name(data.case[i], data.slice_index[i]) for i in va]}], pre / "splits_final.json")
    fold_dir = out / "nnUNet_results" / NNUNET_DATASET / f"{cfg.trainer}__nnUNetPlans__{cfg.configuration}" / "fold_0"
    start = time.time()
    resume = ["--c"] if (fold_dir / "checkpoint_latest.pth").is_file() else []
    run_logged([train_cmd, str(NNUNET_DATASET_ID), cfg.configuration, "0", "-tr", cfg.trainer,
                "-device", nnunet_device(t.device), *resume], env, log)
    if not (fold_dir / "checkpoint_best.pth").is_file():
        raise SammixError(f"nnU-Net finished without {fold_dir / 'checkpoint_best.pth'}; see {log}")
    info = {"trainer": cfg.trainer, "configuration": cfg.configuration, "fold": 0, "checkpoint": "checkpoint_best.pth",
            "results": str(fold_dir), "seconds": round(time.time() - start, 1),
            "stamp": f"{(fold_dir / 'checkpoint_best.pth').stat().st_mtime_ns}"}
    write_json(info, out / NNUNET_DONE)
    return info
