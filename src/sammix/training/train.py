"""`sammix train`: the classifier on every training slice, SAM on the k labelled ones, jointly.

A run folder holds everything needed to trust and reuse the run: config.yaml (resolved),
split.json (cases per part), labeled.json (the k slices), log.jsonl (losses and validation per
epoch), last.pt (resume point) and best.pt (best validation score, see `Trainer.validate`; with the
gate and CAM thresholds chosen on validation and the labelled slices' organ levels; what
`SamMix.load` reads). With self-training
(`TrainConfig.rounds_of_self_training`), pseudo-N.pt holds round N's kept pseudo-labels.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sammix.config import RunConfig
from sammix.data.splits import sample_labeled, split_cases
from sammix.errors import SammixError
from sammix.masks import box_iou, dice_score, mask_to_box, organ_share
from sammix.models.cam import cam_to_box
from sammix.models.classifier import classification_loss
from sammix.models.inferer import SliceInferer
from sammix.models.sam import SamBackbone
from sammix.models.sammix import SamMix
from sammix.runfolder import RunFolder
from sammix.training import distributed
from sammix.training.augment import augment
from sammix.training.loop import EpochTrainer
from sammix.training.losses import segmentation_loss
from sammix.training.pseudo import pseudo_label, score_bar
from sammix.training.slices import SliceSet, load_sources, load_training_sources

CAM_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)  # tried by `Trainer.calibrate`
GATE_MARGIN = 1.0  # logits; see gate_threshold
ORGAN_LEVEL_PERCENTILES = (5, 95)  # of the labelled slices' organ levels: the range SAM was trained on


def gate_threshold(present_probs: np.ndarray) -> float:
    """The gate (classifier threshold) that passes every organ-present validation slice, lowered
    by GATE_MARGIN logits (odds / e) so that organ slices a little less typical than any in
    validation pass too. A confident classifier gets a high gate (organ-free slices skip SAM);
    an unsure one a low gate (no organ slice is lost to it)."""
    p = float(np.clip(np.min(present_probs), 1e-6, 1 - 1e-6))
    return float(1.0 / (1.0 + np.exp(GATE_MARGIN - np.log(p / (1.0 - p)))))


def organ_levels(images: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """The range of the organ's level (median intensity in [0, 1]) over slices (N,S,S) uint8 with
    their masks, from percentile ORGAN_LEVEL_PERCENTILES[0] to [1] (`SliceInferer.sam_input`)."""
    levels = [np.median(image[mask > 0]) / 255.0 for image, mask in zip(images, masks) if (mask > 0).any()]
    return tuple(float(np.percentile(levels, q)) for q in ORGAN_LEVEL_PERCENTILES)


def _batches(indices: np.ndarray, size: int):
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


def _to_tensor(arr: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0).unsqueeze(1).to(device)


def jittered_truth_boxes(boxes: torch.Tensor, masks: torch.Tensor, share: float,
                         rng: np.random.Generator, min_iou: float = 0.0, min_organ: float = 0.0) -> torch.Tensor:
    """Replace about `share` of the boxes (B,4), and every box that overlaps the ground-truth box of
    `masks` (B,1,S,S) with IoU below `min_iou` unless at least `min_organ` (> 0) of it is organ (a
    small box inside the organ), by that ground-truth box with each side moved by -10% to +30% of
    the box's size (mostly looser, as CAM boxes are)."""
    boxes, s = boxes.clone(), masks.shape[-1]
    for j in range(len(boxes)):
        organ = masks[j, 0].cpu().numpy() > 0.5
        truth = mask_to_box(organ)
        if truth is None:
            continue
        drawn = share > 0 and rng.random() < share
        box = boxes[j].cpu().numpy()
        on_organ = box_iou(box, truth) >= min_iou or (min_organ > 0 and organ_share(box, organ) >= min_organ)
        if not drawn and on_organ:
            continue
        size = np.array([truth[2] - truth[0] + 1, truth[3] - truth[1] + 1] * 2)
        moved = truth + np.array([-1, -1, 1, 1]) * rng.uniform(-0.1, 0.3, 4) * size
        boxes[j] = torch.from_numpy(np.clip(moved, 0, s - 1).astype(np.float32)).to(boxes.device)
    return boxes


class SamLoss:
    """SAM's training loss for one batch: the segmentation loss of one of its three masks, the
    MSE of its IoU head against the true IoU of each mask, and (`anchor_weight`) an L2 pull of the
    decoder towards its pretrained weights (L2-SP).

    `mask_choice` picks the mask that is trained: `scored`, the one SAM's IoU head ranks first
    (what inference will pick), or `closest`, the one closest to the truth (as SAM itself was
    trained: the head then learns to rank, the masks to be right)."""

    def __init__(self, t, sam: torch.nn.Module):
        if t.mask_choice not in ("scored", "closest"):
            raise SammixError(f"train.mask_choice {t.mask_choice!r}: expected scored or closest")
        self.seg_loss, self.choice = segmentation_loss(t.seg_loss), t.mask_choice
        self.weight = t.anchor_weight
        # (parameter, its starting value) for the decoder's trained tensors, looked up once
        self.anchor = [(p, p.detach().clone()) for n, p in sam.named_parameters()
                       if p.requires_grad and ".lora_" not in n] if t.anchor_weight > 0 else []

    def __call__(self, logits: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hard = (logits > 0).float()
            iou = (hard * masks).sum((2, 3)) / ((hard + masks).clamp(max=1).sum((2, 3)) + 1e-6)
        pick = (scores if self.choice == "scored" else iou).argmax(1)
        chosen = logits[torch.arange(len(pick), device=pick.device), pick].unsqueeze(1)
        loss = self.seg_loss(chosen, masks) + F.mse_loss(scores, iou)
        if self.anchor:
            loss = loss + self.weight * sum(((p - p0) ** 2).sum() for p, p0 in self.anchor)
        return loss


class LogitMap(torch.nn.Module):
    """The classifier's logit map as a forward (what DistributedDataParallel wraps)."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.logit_map(x)


class Trainer(EpochTrainer):
    def __init__(self, cfg: RunConfig, out: Path, cache_dir: Path | None = None):
        super().__init__(cfg, out)
        t = cfg.train

        self.data, self.cls_only = load_training_sources(cfg, cache_dir)
        # cases without any mask can be neither validated nor tested: they train (the classifier) only
        masked = set(self.data.case[self.data.has_mask])
        self.split = split_cases(sorted(masked), t.val_fraction, t.test_fraction, seed=t.split_seed)
        self.split["train"] = sorted({*self.split["train"], *(set(self.data.case) - masked)})
        train_idx = self.data.indices_for(self.split["train"])
        val_idx = self.data.indices_for(self.split["val"])
        self.val_idx = val_idx[self.data.known[val_idx]]  # slices whose label is known
        self.labeled = np.array(sample_labeled(self.data, train_idx, t.labeled, seed=t.seed))
        if not len(self.labeled):
            raise SammixError(f"{', '.join(cfg.data)}: no {cfg.prep.organ} mask in the training cases to train SAM on")
        self.record_split(self.data, self.split, self.labeled)
        # what SAM trains on: the k labelled slices, joined by the kept pseudo-labels in self-training
        self.sam_images, self.sam_masks = self.data.images[self.labeled], self.data.masks[self.labeled]
        self.rounds = t.rounds_of_self_training(len(self.labeled), cfg.model.prompt)
        self.unlabeled = load_sources(cfg.unlabeled_data, cfg.prep, cache_dir, masks=False) if cfg.unlabeled_data else None
        if self.unlabeled is not None and not self.rounds and self.main:
            tqdm.write("warning: --unlabeled-data is used by self-training only, and it is off "
                       "(--set train.self_train_rounds=1 turns it on)")
        elif self.rounds and t.self_train_rounds is None and self.main:
            tqdm.write(f"self-training: {self.rounds} round after the supervised epochs, as by default with "
                       f"{len(self.labeled)} labelled slices (--set train.self_train_rounds=0 turns it off)")
        self.pseudo_round = None

        # classifier pool: every training slice of --data + all --cls-only-data whose slice label is
        # known; masks are known for the k labelled slices alone (the few-label setting)
        self.cls_pool = self.data.subset(train_idx)
        self.cls_pool.has_mask = np.isin(train_idx, self.labeled)
        if self.cls_only is not None:
            self.cls_pool = self.cls_pool.concat(self.cls_only)
        self.cls_pool = self.cls_pool.subset(self.cls_pool.known)
        self.rng = np.random.default_rng(t.seed)
        self.model = SamMix(cfg.model, cfg.prep).to(self.device)
        if len(self.labeled):  # validation, calibration and pseudo-labels see SAM's input as inference does
            self.model.apply_calibration({"organ_levels": organ_levels(self.data.images[self.labeled],
                                                                       self.data.masks[self.labeled])})
        self.opt_cls = torch.optim.AdamW(self.model.classifier.parameters(), lr=t.lr_classifier,
                                         weight_decay=t.weight_decay)
        self.opt_sam = torch.optim.AdamW([p for p in self.model.sam.parameters() if p.requires_grad],
                                         lr=t.lr_sam, weight_decay=t.weight_decay)
        self.cls_steps = -(-len(self.cls_pool) // (t.cls_batch_size * self.world))
        self.sched_cls = torch.optim.lr_scheduler.OneCycleLR(
            self.opt_cls, max_lr=t.lr_classifier, total_steps=self.cls_steps * t.epochs, pct_start=0.15)
        self.sam_loss = SamLoss(t, self.model.sam)
        self.amp = self.device.type == "cuda"
        self.trains_classifier = cfg.model.prompt == "cam"  # SAM-PP prompts with the whole image: no classifier
        # the trained modules under DistributedDataParallel when there are several ranks; SAM's two
        # unchosen mask heads get no gradient in a step, hence find_unused
        self.cls_step = distributed.wrap(LogitMap(self.model.classifier), self.device)
        self.sam_step = distributed.wrap(self.model.sam, self.device, find_unused=True)
        self.resume()

    # -- what the shared loop (`loop.EpochTrainer`) asks of a trainer ------------------------------
    def model_state(self) -> dict:
        return self.model.trained_state()

    def load_model_state(self, state: dict) -> None:
        self.model.load_trained_state(state, self.out.last)

    def best_weights(self) -> dict:
        cfg = self.model.cfg  # organ_levels None (no labelled slice) is ignored by `ModelConfig.calibrated`
        return {**self.model.trained_state(), "cls_threshold": cfg.cls_threshold, "organ_levels": cfg.organ_levels}

    def optimizers(self) -> dict:
        return {"opt_cls": self.opt_cls, "opt_sam": self.opt_sam, "sched_cls": self.sched_cls}

    def total_epochs(self) -> int:
        t = self.cfg.train
        return t.epochs + self.rounds * t.self_train_epochs

    def _self_training(self, epoch: int) -> bool:
        return epoch > self.cfg.train.epochs

    def steps_per_epoch(self) -> int:
        t = self.cfg.train
        classifier = self.trains_classifier and not self._self_training(self.epoch + 1)
        return classifier * self.cls_steps * t.cls_batch_size * self.world + self._sam_samples()

    def _sam_samples(self) -> int:
        """SAM samples in the coming epoch."""
        return self.cfg.train.sam_samples(len(self.labeled), self._self_training(self.epoch + 1))

    def run_epoch(self, bar) -> dict:
        if self._self_training(self.epoch + 1):  # the classifier (and so the prompts) stay as trained
            return {"sam_loss": self.sam_epoch(bar), "sam_slices": len(self.sam_images),
                    "sam_samples": self._sam_samples()}
        cls_loss = self.classifier_epoch(bar) if self.trains_classifier else float("nan")
        return {"cls_loss": cls_loss, "sam_loss": self.sam_epoch(bar)}

    def before_epoch(self, epoch: int) -> None:
        """At each self-training round (and on resuming inside one): the round's pseudo-labels,
        computed once by the main rank with the best weights so far and kept in the run folder."""
        t = self.cfg.train
        if not self._self_training(epoch):
            return
        r, epoch_in_round = divmod(epoch - t.epochs - 1, t.self_train_epochs)
        if r == self.pseudo_round:
            return
        if epoch_in_round == 0 and self.out.best.exists():
            # a round starts from the best weights so far (and their gate), not the last epoch's:
            # with few labelled slices, later epochs can lose on validation what earlier ones had
            self.model.load_trained_state(self.out.load_weights(RunFolder.BEST)["model"], self.out.best)
        path = self.out / f"pseudo-{r + 1}.pt"
        pool = self._unlabelled_pool()
        if self.main and not path.exists():
            self.model.eval()
            bar = score_bar(t.pseudo_min_score, self.validate().get("val_sam_iou", float("nan")))
            found = pseudo_label(SliceInferer(self.model), pool.images, pool.case, pool.slice_index, pool.depth,
                                 replace(t, pseudo_min_score=bar),
                                 desc=f"self-training round {r + 1}/{self.rounds}: label")
            keep = found["keep"]
            self.out.save({"index": found["index"][keep], "masks": np.packbits(found["masks"][keep], axis=-1),
                           "answered": len(found["index"]), "pool": len(pool), "min_score": bar}, path.name)
            self.out.append_log({"self_training_round": r + 1, "pool": len(pool), "answered": len(found["index"]),
                                 "kept": int(keep.sum()), "min_score": bar})
            tqdm.write(f"self-training round {r + 1}: {int(keep.sum())} of {len(found['index'])} answers kept "
                       f"({len(pool)} slices without a mask)")
        distributed.barrier()
        state = self.out.load_weights(path.name)
        idx, size = state["index"], self.data.images.shape[-1]
        self.sam_images = np.concatenate([self.data.images[self.labeled], pool.images[idx]])
        self.sam_masks = np.concatenate([self.data.masks[self.labeled],
                                         np.unpackbits(state["masks"], axis=-1, count=size).astype(np.uint8)])
        self.pseudo_round = r

    def _unlabelled_pool(self) -> SliceSet:
        """Training slices without a mask for SAM (those the classifier knows to be organ-free
        left out), then every --unlabeled-data slice."""
        d = self.data
        idx = d.indices_for(self.split["train"])
        idx = idx[~np.isin(idx, self.labeled) & ~(d.known[idx] & (d.labels[idx] == 0))]
        pool = d.subset(idx)
        return pool if self.unlabeled is None else pool.concat(self.unlabeled)

    def score(self, losses: dict, val: dict) -> float:
        return val.get("val_score", -losses["sam_loss"])

    def finish(self) -> None:
        self.calibrate()

    def after_validation(self, val: dict) -> None:
        if "val_gate_threshold" in val:
            self.model.set_thresholds(cls_threshold=val["val_gate_threshold"])

    # -- one epoch of each branch -----------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _crop(self, i: int, want_organ: bool):
        """A crop of labelled slice `i` (the slice zeroed outside a random rectangle, scale kept)
        that holds the organ or holds none of it; None if no such crop turns up.

        Crops of the same scans with and without the organ are the negatives that force the
        classifier to look at the organ rather than at which scanner a slice came from."""
        image, mask = self.data.images[i], self.data.masks[i] > 0
        s = mask.shape[0]
        for _ in range(60):
            area, aspect = self.rng.uniform(0.15, 0.7), np.exp(self.rng.uniform(-0.7, 0.7))
            h = int(np.clip(s * np.sqrt(area * aspect), 24, s))
            w = int(np.clip(s * np.sqrt(area / aspect), 24, s))
            y, x = self.rng.integers(0, s - h + 1), self.rng.integers(0, s - w + 1)
            keep = np.zeros_like(mask)
            keep[y:y + h, x:x + w] = True
            inside = int((mask & keep).sum())
            if (want_organ and inside >= max(80 * (s / 256) ** 2, 0.3 * mask.sum())) or (not want_organ and inside == 0):
                return image * keep, mask & keep
        return None

    def _classifier_sample(self, positive: bool, groups: dict):
        """One (image, mask or None, label) for the classifier: a crop of a labelled slice
        (`crop_fraction` of positives, half of the negatives), else a whole pool slice drawn
        evenly over sources."""
        t = self.cfg.train
        crop_share = t.crop_fraction if positive else 0.5
        if not groups[positive] or self.rng.random() < crop_share:
            crop = self._crop(int(self.rng.choice(self.labeled)), positive)
            if crop is not None:
                return crop[0], crop[1], float(positive)
        sources = groups[positive]
        if not sources:  # e.g. no organ-free slice anywhere and no crop found: take a positive
            return self._classifier_sample(True, groups)
        members = sources[int(self.rng.integers(len(sources)))]
        j = int(members[self.rng.integers(len(members))])
        pool = self.cls_pool
        return pool.images[j], (pool.masks[j] > 0 if pool.has_mask[j] else None), float(pool.labels[j])

    def classifier_epoch(self, bar) -> float:
        """Focal loss on the slice label + CAM alignment: where a mask is known, the classifier's
        logit map is pushed towards the organ's footprint (BCE against the pooled mask)."""
        pool, t = self.cls_pool, self.cfg.train
        groups = {y: [g for g in (np.flatnonzero((pool.source == s) & (pool.labels == y))
                                  for s in np.unique(pool.source)) if len(g)] for y in (True, False)}
        losses = []
        self.model.classifier.train()
        for _ in range(self.cls_steps):
            samples = [self._classifier_sample(n % 2 == 0, groups) for n in range(t.cls_batch_size * self.world)]
            x = _to_tensor(np.stack([s[0] for s in samples]), self.device)
            m = torch.from_numpy(np.stack([s[1] if s[1] is not None else np.zeros(x.shape[-2:], bool)
                                           for s in samples])).float().unsqueeze(1).to(self.device)
            known = torch.tensor([s[1] is not None for s in samples], device=self.device)
            y = torch.tensor([s[2] for s in samples], device=self.device)
            x, m = augment(x, m, self.gen, t, classifier=True, window=self.cfg.prep.window)
            x, m, known, y = (distributed.share(v, self.rank, self.world) for v in (x, m, known, y))
            with self._autocast():
                z = self.cls_step(x).float()
            loss = classification_loss(self.model.classifier.pool(z), y, gamma=t.cls_focal_gamma)
            if known.any() and t.cam_align_weight > 0:
                target = (F.adaptive_avg_pool2d(m, z.shape[-2:])[:, 0] > 0.3).float()
                loss = loss + t.cam_align_weight * F.binary_cross_entropy_with_logits(z[known], target[known])
            self.opt_cls.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_cls.step()
            self.sched_cls.step()
            losses.append(distributed.mean_over_ranks(loss.item()))
            bar.update(len(samples))
        return float(np.mean(losses))

    def sam_epoch(self, bar) -> float:
        t = self.cfg.train
        n = self._sam_samples()
        order = torch.randperm(max(n, len(self.sam_images)), generator=self.gen).numpy()[:n] % len(self.sam_images)
        losses = []
        self.model.sam.train()
        for idx in _batches(order, t.batch_size * self.world):  # a global batch; each rank trains its share
            x = _to_tensor(self.sam_images[idx], self.device)
            m = torch.from_numpy(self.sam_masks[idx]).float().unsqueeze(1).to(self.device)
            x, m = augment(x, m, self.gen, t, window=self.cfg.prep.window)
            # the classifier prompts SAM as it will at inference: in eval mode (its BatchNorm statistics
            # are neither taken from nor moved by these 4-slice batches)
            self.model.classifier.eval()
            _, boxes, mask_prompts = self.model.cam_prompts(x)
            min_iou = t.cam_box_min_iou if self.cfg.model.prompt == "cam" else 0.0  # SAM-PP keeps its whole-image box
            if t.gt_box_jitter > 0 or min_iou > 0:
                boxes = jittered_truth_boxes(boxes, m, t.gt_box_jitter, self.rng, min_iou, t.cam_box_min_organ)
            x, m, boxes = (distributed.share(v, self.rank, self.world) for v in (x, m, boxes))
            if mask_prompts is not None:
                mask_prompts = distributed.share(mask_prompts, self.rank, self.world)
            with self._autocast():
                logits, scores = self.sam_step(x, boxes, mask_prompts)
            loss = self.sam_loss(logits.float(), scores.float(), m)
            self.opt_sam.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_sam.step()
            losses.append(distributed.mean_over_ranks(loss.item()))
            bar.update(len(idx))
        return float(np.mean(losses))

    @torch.no_grad()
    def _probs(self, indices) -> np.ndarray:
        """The classifier's organ probability for each slice of self.data at `indices`."""
        self.model.classifier.eval()
        return np.concatenate([torch.sigmoid(self.model.classifier(_to_tensor(self.data.images[idx], self.device)))
                               .float().cpu().numpy() for idx in _batches(np.asarray(indices), 32)] or [np.zeros(0)])

    @torch.no_grad()
    def validate(self) -> dict:
        """Set the gate to pass every organ-present validation slice (`gate_threshold`, unless
        `calibrate_gate` is off); then, at that gate: classifier accuracy on every validation
        slice; Dice, CAM-box IoU and SAM's median predicted IoU (`val_sam_iou`, self-training's
        score bar) on (at most `val_max_slices`) organ-present validation slices;
        and, where validation cases have organ-free slices (volumes), the share of (at most
        `val_max_slices`) of them the gate rejects. `val_score`, which picks the best checkpoint,
        averages the Dice of the organ slices with 1 per rejected and 0 per passed organ-free slice (an organ-free slice scores
        Dice 1 only when the prediction is empty)."""
        t = self.cfg.train
        if len(self.val_idx) == 0:
            return {}

        def spread(items):
            return set(items[:: max(1, len(items) // t.val_max_slices)][: t.val_max_slices])

        labels = self.data.labels[self.val_idx].astype(bool)
        probs = self._probs(self.val_idx)
        gate = gate_threshold(probs[labels]) if t.calibrate_gate and labels.any() else self.cfg.model.cls_threshold
        self.model.set_thresholds(cls_threshold=gate)
        passed = probs >= gate
        called = dict(zip(self.val_idx, passed))
        dices, ious, scores = [], [], []
        labelled = [i for i in self.val_idx if self.data.has_mask[i]]
        keep = spread([i for i in labelled if self.data.labels[i]])
        rejected = [float(not called[i]) for i in spread([i for i in labelled if not self.data.labels[i]])]
        for idx in _batches(np.array(sorted(keep), dtype=int), t.batch_size * 2):
            out = self.model.predict_slices(_to_tensor(self.data.images[idx], self.device))
            for j, i in enumerate(idx):
                gt = self.data.masks[i] > 0
                dices.append(dice_score(out["masks"][j].numpy(), gt))
                ious.append(box_iou(out["boxes"][j].numpy(), mask_to_box(gt)) if out["present"][j] else 0.0)
                if out["present"][j]:
                    scores.append(float(out["scores"][j]))
        result = {"val_cls_accuracy": float(np.mean(passed == labels)), "val_gate_threshold": gate,
                  "val_dice": float(np.mean(dices)) if dices else float("nan"),
                  "val_cam_box_iou": float(np.mean(ious)) if ious else float("nan"), "val_slices_scored": len(dices),
                  "val_sam_iou": float(np.median(scores)) if scores else float("nan")}
        if rejected:
            result["val_organ_free_rejected"] = float(np.mean(rejected))
            result["val_organ_free_scored"] = len(rejected)
        result["val_score"] = float(np.mean(dices + rejected))
        return result

    @torch.no_grad()
    def calibrate(self) -> None:
        """Complete the best weights' thresholds, once, and store them with the weights (best.pt,
        which `SamMix.load` applies): the gate (`gate_threshold`) and the labelled slices' organ
        levels (`organ_levels`), for weights saved before they were stored each epoch, and the CAM
        threshold, by Dice on every organ-present validation slice (gate and organ levels
        included, as at test time; the encoder runs once per slice)."""
        t, best_path = self.cfg.train, self.out.best
        present = np.array([i for i in self.val_idx if self.data.labels[i]], dtype=int)
        if self.cfg.model.prompt != "cam" or not len(present) or not best_path.is_file():
            return
        state = self.out.load_weights()
        weights, row = state["model"], {}
        self.model.load_trained_state(weights, best_path)
        self.model.eval()
        if t.calibrate_gate and "cls_threshold" not in weights:
            weights["cls_threshold"] = row["gate_threshold"] = gate_threshold(self._probs(present))
            self.model.set_thresholds(cls_threshold=weights["cls_threshold"])
        if weights.get("organ_levels") is None and self.model.cfg.organ_levels is not None:  # weights saved before they were
            weights["organ_levels"] = row["organ_levels"] = self.model.cfg.organ_levels
        scored = present[self.data.has_mask[present]]
        if t.calibrate_cam and "cam_threshold" not in weights and len(scored):
            dices = self._dice_by_cam_threshold(scored)
            scores = {thr: float(np.mean(d)) for thr, d in dices.items()}
            chosen = max(CAM_THRESHOLDS, key=lambda thr: (round(scores[thr], 6), thr == self.cfg.model.cam_threshold))
            weights["cam_threshold"] = chosen
            self.model.set_thresholds(cam_threshold=chosen)
            row.update({"val_dice_by_cam_threshold": scores, "cam_threshold": chosen, "slices": len(scored)})
            tqdm.write(f"CAM threshold {chosen} (validation Dice {scores[chosen]:.4f}; "
                       + ", ".join(f"{k}: {v:.4f}" for k, v in scores.items()) + ")")
        if row:
            self.out.save(state, RunFolder.BEST)
            self.out.append_log({"calibration": row})

    def _dice_by_cam_threshold(self, indices: np.ndarray) -> dict[float, list[float]]:
        t = self.cfg.train
        dices = {thr: [] for thr in CAM_THRESHOLDS}
        inferer = SliceInferer(self.model)  # SAM sees the slice as at inference (the organ levels, `sam_input`)
        for idx in _batches(indices, t.batch_size * 2):
            x = _to_tensor(self.data.images[idx], self.device)
            logits, cams = self.model.prompter.compute(x)
            gate = (torch.sigmoid(logits.float()) >= self.model.cfg.cls_threshold).cpu().numpy()
            with self._autocast():
                emb = self.model.sam.encode(inferer.sam_input(x, cams.float()))
            for thr in CAM_THRESHOLDS:
                boxes = torch.from_numpy(np.stack([cam_to_box(c, thr) for c in cams.float().cpu().numpy()]))
                with self._autocast():
                    masks, scores = self.model.sam.decode(emb, boxes.to(self.device), None, size=x.shape[-1])
                best = SamBackbone.select_best(masks.float(), scores.float())[:, 0].cpu().numpy() > 0
                for j, i in enumerate(idx):
                    dices[thr].append(dice_score(best[j] & gate[j], self.data.masks[i] > 0))
        return dices


def train(cfg: RunConfig, out: Path, cache_dir: Path | None = None) -> dict:
    return Trainer(cfg, out, cache_dir).fit()
