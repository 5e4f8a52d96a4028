"""Which classifier settings put the CAM box on the organ (issue 11: localisation), seed by seed.

    .venv/bin/python benchmarks/classifier_levers.py --run RUN --out DIR --cache CACHE [--levers a,b] [--seeds 0,1,2] \
        [--volumes ../shared/data/lits-117 ../shared/data/totalseg-example]
    .venv/bin/python benchmarks/classifier_levers.py --out DIR --table

The companion of `finetune_levers.py`, which fixes the classifier and varies SAM: here SAM is
fixed and the classifier varies. For each (lever, seed), the classifier alone is trained from its
ImageNet start with the trainer's own `classifier_epoch` (RUN's config, this seed's k labelled
slices, the lever's --set) for the run's epochs, and its last epoch is kept. As the trainer does,
the gate is then set to pass every organ slice of validation and the CAM threshold chosen by
validation Dice. SAM is the decoder `finetune_levers.py` trains for its default lever on seed 0
(on the pretrained encoder's embeddings, which CACHE holds; trained once and kept there).

Scored through `SliceInferer` on the organ slices of the test and validation cases and on the
liver slices of --cls-only-data (cross): the CAM box's IoU with the true box, CAM-prompted Dice
and slices below 0.5. The gate: the classifier's organ probability on each slice of the test
cases and of the --volumes, and its AUROC there. With --volumes, per-slice and 3D Dice slice by
slice and with volume context (whose stop rule reads the classifier's probabilities). Each
(lever, seed) keeps its classifier's weights beside its results (`<lever>-s<seed>.classifier.pt`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import finetune_levers as fl  # noqa: E402

LEVERS = {  # name -> --set overrides of the run's config
    "mean": ["model.cls_pool_sharpness=0"],  # the logit map's mean: global average pooling, as in the paper
    "lse1": ["model.cls_pool_sharpness=1"],
    "lse4": ["model.cls_pool_sharpness=4"],
    "bce": ["train.cls_focal_gamma=0"],  # plain binary cross-entropy instead of the focal loss
}
SAM_LEVER, SAM_SEED = "camgood", 0


def _fixed_decoder(run: Path, base, cache: Path) -> dict:
    """The SAM decoder every lever is scored with: `finetune_levers.py`'s, trained on seed 0's
    k slices with RUN's classifier prompting (once; kept in the cache)."""
    from sammix.config import apply_overrides
    from sammix.models.sammix import SamMix
    from sammix.training.train import Trainer

    def make():
        cfg = apply_overrides(base, [f"train.seed={SAM_SEED}", "model.lora_rank=0"] + fl.LEVERS[SAM_LEVER])
        with tempfile.TemporaryDirectory(prefix="cls-levers-") as scaffold:
            trainer = Trainer(cfg, Path(scaffold))
        model = trainer.model.eval()
        model.classifier.load_state_dict(SamMix.load(run, device="cpu").classifier.state_dict())
        copies = fl._train_copies(trainer, model, SAM_SEED, cfg.train, cache)
        torch.manual_seed(SAM_SEED)
        fl._finetune(model, copies, cfg.train, SAM_SEED)
        return {n: p.detach().clone() for n, p in model.sam.named_parameters() if p.requires_grad}

    return fl._cached(cache / f"decoder_{SAM_LEVER}_s{SAM_SEED}_k{base.train.labeled}.pt", make)


def _probs(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(model.classifier(x[i:i + 32])).numpy() for i in range(0, len(x), 32)])


def _cam_dice(model, s: dict, embeddings: dict) -> tuple[list[float], list[float]]:
    """CAM-prompted Dice (gate included) and the CAM box's IoU with the true box, per slice."""
    from sammix.masks import box_iou, dice_score
    from sammix.models.inferer import SliceInferer

    inferer = SliceInferer(fl.CachedBackend(model, embeddings))
    dice, iou = [], []
    for i in range(0, len(s["x"]), 16):
        x = s["x"][i:i + 16]
        pred = inferer.predict_masks(x)
        _, boxes, _ = model.cam_prompts(x)
        dice += [dice_score(p, g) for p, g in zip(pred, s["masks"][i:i + 16])]
        iou += [box_iou(b.numpy(), t.numpy()) for b, t in zip(boxes, s["boxes"][i:i + 16])]
    return dice, iou


def _calibrate(model, sets: dict, embeddings: dict) -> dict:
    """The trainer's thresholds: the gate passes every validation organ slice; the CAM threshold
    is the one of `CAM_THRESHOLDS` with the best validation Dice."""
    from sammix.training.train import CAM_THRESHOLDS, gate_threshold

    gate = gate_threshold(_probs(model, sets["val"]["x"]))
    model.set_thresholds(cls_threshold=gate)
    by_threshold = {}
    for thr in CAM_THRESHOLDS:
        model.set_thresholds(cam_threshold=thr)
        by_threshold[thr] = float(np.mean(_cam_dice(model, sets["val"], embeddings)[0]))
    chosen = max(by_threshold, key=by_threshold.get)
    model.set_thresholds(cam_threshold=chosen)
    return {"gate": gate, "cam_threshold": chosen, "val_dice_by_cam_threshold": by_threshold}


def _gate_sets(trainer, vols: list[dict]) -> dict:
    """{name: (x, organ present per slice)}: every known slice of the test cases, and each volume."""
    d = trainer.data
    idx = d.indices_for(trainer.split["test"])
    idx = idx[d.known[idx]]
    sets = {"test": (fl._images(d.images[idx]), d.labels[idx] > 0)}
    for v in vols:
        sets[v["name"]] = (v["x"], v["masks"].reshape(len(v["masks"]), -1).any(1))
    return sets


def _auroc(probs: np.ndarray, present: np.ndarray) -> float | None:
    from monai.metrics import compute_roc_auc

    if present.all() or not present.any():
        return None
    return float(compute_roc_auc(torch.from_numpy(probs), torch.from_numpy(present.astype(np.float32))))


def run(args) -> None:
    from sammix.config import RunConfig, apply_overrides
    from sammix.training.train import Trainer

    base = RunConfig.load(args.run / "config.yaml")
    done = {p.stem for p in args.out.glob("*-s*.json")}
    decoder = _fixed_decoder(args.run, base, args.cache)
    for seed in (int(s) for s in args.seeds.split(",")):
        for lever in [lever for lever in args.levers.split(",") if f"{lever}-s{seed}" not in done]:
            cfg = apply_overrides(base, [f"train.seed={seed}", "model.lora_rank=0"] + LEVERS[lever])
            torch.manual_seed(seed)
            with tempfile.TemporaryDirectory(prefix="cls-levers-") as scaffold:
                trainer = Trainer(cfg, Path(scaffold))
            model = trainer.model
            sets, embeddings = fl._eval_sets(trainer, model, args.cache)
            vols, vol_embeddings = fl._volumes(args.volumes, cfg.prep, model, args.cache) if args.volumes else ([], {})
            with torch.no_grad():
                for n, p in model.sam.named_parameters():
                    if n in decoder:
                        p.copy_(decoder[n])
            t = cfg.train
            with tqdm(total=t.epochs * trainer.cls_steps * t.cls_batch_size, desc=f"{lever} seed {seed}: classifier",
                      unit="slice") as bar:
                losses = [trainer.classifier_epoch(bar) for _ in range(t.epochs)]
            model.eval()
            result = {"lever": lever, "seed": seed, "set": LEVERS[lever], "cls_loss": losses,
                      **_calibrate(model, sets, embeddings)}
            for name, s in sets.items():
                dice, iou = _cam_dice(model, s, embeddings)
                result[name] = {"slices": s["names"], "cam": dice, "box_iou": iou}
            result["gate_sets"] = {}
            for name, (x, present) in _gate_sets(trainer, vols).items():
                p = _probs(model, x)
                result["gate_sets"][name] = {"probs": p.tolist(), "present": present.tolist(), "auroc": _auroc(p, present)}
            if vols:
                result["volumes"] = fl._score_volumes(model, vols, vol_embeddings)
            torch.save(model.classifier.state_dict(), args.out / f"{lever}-s{seed}.classifier.pt")
            (args.out / f"{lever}-s{seed}.json").write_text(json.dumps(result))
            print(_row(result), flush=True)


def _row(r: dict) -> str:
    parts = [f"{r['lever']} seed {r['seed']}: cam threshold {r['cam_threshold']}, gate {r['gate']:.3f}"]
    for name in ("test", "val", "cross"):
        if name in r:
            d = np.asarray(r[name]["cam"])
            parts.append(f"{name} Dice {d.mean():.3f}({(d < 0.5).sum()}) box IoU {np.mean(r[name]['box_iou']):.3f}")
    parts += [f"{n} AUROC {g['auroc']:.3f}" for n, g in r["gate_sets"].items() if g["auroc"] is not None]
    for name, v in r.get("volumes", {}).items():
        parts.append(f"{name} 3D {v['slices']['dice3d']:.3f} -> context {v['propagate']['dice3d']:.3f}")
    return "; ".join(parts)


def table(out: Path) -> None:
    for path in sorted(out.glob("*-s*.json")):
        print(_row(json.loads(path.read_text())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="trained SAM-Mix run: its config, data and split")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, help="finetune_levers.py's cache (embeddings), shared")
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma list of {', '.join(LEVERS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--volumes", type=Path, nargs="*", default=[], help="labelled volumes scored whole")
    ap.add_argument("--table", action="store_true", help="only print what --out holds")
    args = ap.parse_args()
    if args.table:
        table(args.out)
        return
    if args.run is None or args.cache is None:
        ap.error("--run and --cache are needed, except with --table")
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
