"""`sammix evaluate`: score a trained run on a dataset with MONAI metrics.

Per-slice Dice / Hausdorff / HD95 / normalised surface Dice over organ-present slices (as the
paper reports them), at the model's resolution in pixels and in mm where spacing is known;
classifier accuracy over every slice; CAM-box IoU with the ground-truth box; and a 3D Dice per
case when the data are volumes. The masks scored are those `predict` writes: cleaned up as it cleans
them (`geometry.clean_mask`) unless `cleanup` is off."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sammix.config import INFERENCE_SETTINGS, RUN_WINDOW, with_inference_overrides
from sammix.data.io import write_json
from sammix.errors import InputError
from sammix.evaluation.metrics import slice_metrics, summarize, volume_dice
from sammix.inference.geometry import clean_mask
from sammix.masks import box_iou, mask_to_box
from sammix.models.inferer import SliceInferer
from sammix.models.sammix import SamMix
from sammix.runfolder import RunFolder
from sammix.training.slices import load_sources


def select_split(cases: np.ndarray, run: Path, split: str) -> np.ndarray:
    """Indices of the slices whose case belongs to `split` of the run's own case split."""
    if split == "all":
        return np.arange(len(cases))
    parts = RunFolder(run).split()
    wanted = {c.split("/", 1)[-1] for c in parts[split]} | set(parts[split])
    idx = np.flatnonzero([c in wanted for c in cases])
    if len(idx) == 0:
        raise InputError(RunFolder(run) / RunFolder.SPLIT, f"no case of its '{split}' part is in this dataset")
    return idx


def score_predictions(slices, idx: np.ndarray, out: dict) -> dict:
    """Metrics of predictions `out` (masks, present, boxes per index of `idx`) against `slices`."""
    per_slice, ious = [], []
    labelled = slices.has_mask[idx]
    correct = (out["present"] == slices.labels[idx].astype(bool))[labelled]
    for j, i in enumerate(idx):
        if not (slices.has_mask[i] and slices.labels[i]):
            continue
        gt = slices.masks[i] > 0
        spacing = tuple(slices.spacing[i]) if np.all(np.isfinite(slices.spacing[i])) else None
        row = {"case": str(slices.case[i]), "slice": int(slices.slice_index[i]),
               **slice_metrics(out["masks"][j], gt, spacing)}
        row["cam_box_iou"] = float(box_iou(out["boxes"][j], mask_to_box(gt))) if out["present"][j] else 0.0
        ious.append(row["cam_box_iou"])
        per_slice.append(row)
    metrics = summarize(per_slice)
    metrics["cls_accuracy"] = float(correct.mean()) if len(correct) else float("nan")
    metrics["cam_box_iou_frac_ge_0.7"] = float(np.mean(np.array(ious) >= 0.7)) if ious else float("nan")
    metrics["per_slice"] = per_slice
    return metrics


def per_case_dice(slices, idx: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """3D Dice of each case, its slices stacked in order (volume data only)."""
    result = {}
    for order in case_slices(slices, idx):
        if len(order) < 2 or not slices.has_mask[idx[order]].all():
            continue
        result[str(slices.case[idx[order[0]]])] = volume_dice(masks[order], slices.masks[idx[order]] > 0)
    return result


def case_slices(slices, idx: np.ndarray) -> list[np.ndarray]:
    """The positions in `idx` of each case's slices, in order from inferior to superior."""
    cases = slices.case[idx]
    return [sel[np.argsort(slices.slice_index[idx[sel]])]
            for sel in (np.flatnonzero(cases == case) for case in dict.fromkeys(cases))]


def predict_all(model, slices, idx: np.ndarray, batch_size: int = 8, desc: str = "predict") -> dict:
    """Run `model` (a SamMix) over the slices `idx` of `slices`; numpy results per index of `idx`:
    masks, probs, present, boxes. The slices of a case are one scan, predicted as a volume
    (`SliceInferer.predict_volume`) at their slice indices: volume context works on its runs of
    adjacent slices as `predict` does on a whole volume, and the level check sees the whole scan;
    a lone slice is a volume of one."""
    n, s = len(idx), slices.images.shape[-1]
    out = {"masks": np.zeros((n, s, s), bool), "probs": np.zeros(n, np.float32), "present": np.zeros(n, bool),
           "boxes": np.full((n, 4), np.nan, np.float32)}
    inferer = SliceInferer(model.eval())
    for pos in tqdm(case_slices(slices, idx), desc=desc, unit="case", leave=False):
        x = torch.from_numpy(slices.images[idx[pos]].astype(np.float32) / 255.0).unsqueeze(1)
        res = inferer.predict_volume(x, batch_size=batch_size, positions=slices.slice_index[idx[pos]])
        out["masks"][pos] = (res["logits"] > 0).numpy()
        out["probs"][pos], out["present"][pos], out["boxes"][pos] = res["probs"], res["present"], res["boxes"]
    return out


def evaluate_run(run: Path, data: Path, out: Path, window=RUN_WINDOW, split: str = "all",
                 device: str = "auto", cache_dir: Path | None = None, diagnose: bool = False,
                 overrides=(), cleanup: bool = True) -> dict:
    """Score `run` on `data` into METRICS.json `out`; with `diagnose`, add where the Dice goes
    (`evaluation.diagnose`) and a figure of the failed slices beside `out`; `overrides`: inference
    settings (`config.with_inference_overrides`); `cleanup`: `predict`'s clean-up of the masks."""
    run, out = Path(run), Path(out)
    model = SamMix.load(run, device=device)
    model.cfg = with_inference_overrides(model.cfg, list(overrides))
    prep = model.prep if window == RUN_WINDOW else replace(model.prep, window=window)
    slices = load_sources([data], prep, cache_dir, masks=True)
    idx = select_split(slices.case, run, split)
    start = time.time()
    pred = predict_all(model, slices, idx)
    if cleanup:
        pred["masks"] = clean_mask(pred["masks"])  # predict's clean-up: holes filled, slice by slice
    seconds = time.time() - start
    metrics = score_predictions(slices, idx, pred)
    case_dice = per_case_dice(slices, idx, pred["masks"])
    if case_dice:
        metrics["dice3d_per_case"] = case_dice
        metrics["dice3d_mean"] = float(np.nanmean(list(case_dice.values())))
    if diagnose:
        from sammix.evaluation.diagnose import diagnose as diagnosis

        figure = out.with_name(out.name.removesuffix(".json") + "_failures.png")
        metrics["diagnosis"] = diagnosis(model, slices, idx, pred, figure, cleanup=cleanup)
    metrics.update({"run": str(run), "data": str(data), "split": split, "window": prep.window, "cleanup": cleanup,
                    "inference": {k: getattr(model.cfg, k) for k in INFERENCE_SETTINGS},
                    "n_slices_total": int(len(idx)), "seconds": round(seconds, 1)})
    write_json(metrics, out)  # atomic, and makes the folder
    return metrics
