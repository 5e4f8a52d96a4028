"""Which fine-tuning settings make SAM's own masks better (issue 11, item 2), seed by seed.

    .venv/bin/python benchmarks/finetune_levers.py --run RUN --out DIR [--levers a,b] [--seeds 0,1,2]
    .venv/bin/python benchmarks/finetune_levers.py --out DIR --table

On this CPU the image encoder costs 1.7 s a slice, so a study of many settings x 3 seeds with the
full trainer is out of reach. This is its proxy: SAM's decoder alone is fine-tuned (`lora_rank`
0) on image embeddings computed once, by the frozen pretrained encoder, for 3 augmented copies
(`training.augment.augment`) of each of the k labelled slices a seed draws. Prompts,
loss and the choice of mask are the trainer's own (`jittered_truth_boxes`, `SamLoss`); the
classifier is RUN's trained one, fixed, so only SAM's settings differ between levers.

Each (lever, seed) is scored on the organ slices of the test and validation cases of RUN's split
and on the liver slices of its --cls-only-data (cross-domain: those masks are used only here),
through `SliceInferer` (the one inference path): Dice with the CAM prompt (gate included) and with
the true box, against the pretrained decoder given the same true box. Embeddings and results are
kept in DIR, so a rerun only does what is missing.

With --volumes, each (lever, seed) is also scored on whole volumes (every slice, in order), slice
by slice and with volume context (`SliceInferer.predict_volume`, `propagate` off and on): per-slice
Dice on the organ slices and 3D Dice.

Self-training levers (`train.self_train_rounds`) label the slices of the training cases outside
the seed's k (their masks hidden: they only score the pseudo-labels, recorded per round) through
the same path, and train on the kept answers as on the k (one copy each, not augmented).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

AUGMENTED_COPIES = 3
LEVERS = {  # name -> --set overrides of the run's config (whose other settings are the current defaults)
    "base": ["train.cam_box_min_iou=0"],  # the paper's prompts, CAM boxes only: the default before 2026-11-28
    "truebox50": ["train.gt_box_jitter=0.5", "train.cam_box_min_iou=0"],
    "truebox100": ["train.gt_box_jitter=1.0"],
    "camgood": ["train.cam_box_min_iou=0.3"],
    "camgood_truebox50": ["train.cam_box_min_iou=0.3", "train.gt_box_jitter=0.5"],
    "camgood_anchor": ["train.cam_box_min_iou=0.3", "train.anchor_weight=0.01"],
    "camgood_closest": ["train.cam_box_min_iou=0.3", "train.mask_choice=closest"],
    # CAM boxes inside the organ stay even when small (IoU < 0.3): SAM learns to grow them to the organ
    "caminside": ["train.cam_box_min_iou=0.3", "train.cam_box_min_organ=0.7"],
    # another scanner: another contrast phase (brightness +-0.2, +-51 HU at the lits window) and 3 mm pixels
    "camgood_scanner": ["train.cam_box_min_iou=0.3", "train.intensity_augment=2.5", "train.resolution_augment=2.5"],
    "camgood_steps128": ["train.cam_box_min_iou=0.3", "train.sam_samples_per_epoch=128"],
    "closest": ["train.mask_choice=closest"],
    "anchor": ["train.anchor_weight=0.01"],
    "lr3e-5": ["train.lr_sam=3e-5"],
    "lr3e-4": ["train.lr_sam=3e-4"],
    "steps128": ["train.sam_samples_per_epoch=128"],
    "focal": ["train.seg_loss=dice_focal"],
    "intensity2.5": ["train.intensity_augment=2.5"],  # brightness +-0.2 (+-51 HU at the lits window)
    "selftrain": ["train.self_train_rounds=1"],
    "selftrain2": ["train.self_train_rounds=2"],
    "selftrain_strict": ["train.self_train_rounds=1", "train.pseudo_min_box_iou=0.8"],
}


def _key(x: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes()).hexdigest()


class CachedBackend:
    """A `Backend` whose encoder is a lookup of embeddings computed once; classify and decode
    are the model's."""

    def __init__(self, model, embeddings: dict):
        self.model, self.embeddings = model, embeddings
        # the embeddings are of the slices as stored, so SAM's input is never shifted to the organ
        # levels here (`SliceInferer.sam_input`); the proxies compare levers, all without it
        self.cfg, self.size = replace(model.cfg, match_level=False), model.size

    def classify(self, x):
        return self.model.classify(x)

    def encode(self, x):
        return torch.stack([self.embeddings[_key(xi)] for xi in x]).float()

    def decode(self, emb, boxes, mask_prompts):
        return self.model.decode(emb, boxes, mask_prompts)


def _images(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0).unsqueeze(1)


def _encode(model, x: torch.Tensor, desc: str) -> torch.Tensor:
    from tqdm import tqdm

    with torch.no_grad():
        return torch.cat([model.sam.encode(x[i:i + 8]).half() for i in tqdm(range(0, len(x), 8), desc=desc)])


def _cached(path: Path, make):
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        torch.save(make(), tmp)
        tmp.rename(path)
    return torch.load(path)


def _eval_sets(trainer, model, out: Path) -> dict:
    """{set name: {"x", "masks", "names"}} and the embeddings of all their slices."""
    from sammix.masks import mask_to_box

    def organ_slices(data, cases=None):
        idx = np.arange(len(data)) if cases is None else data.indices_for(cases)
        return idx[(data.labels[idx] > 0) & data.masks[idx].reshape(len(idx), -1).any(1)]

    parts = {"test": (trainer.data, organ_slices(trainer.data, trainer.split["test"])),
             "val": (trainer.data, organ_slices(trainer.data, trainer.split["val"]))}
    if trainer.cls_only is not None:
        parts["cross"] = (trainer.cls_only, organ_slices(trainer.cls_only))
    sets = {name: {"x": _images(d.images[i]), "masks": d.masks[i] > 0,
                   "boxes": torch.from_numpy(np.stack([mask_to_box(m > 0) for m in d.masks[i]])).float(),
                   "names": [f"{d.case[j]}/{d.slice_index[j]}" for j in i]} for name, (d, i) in parts.items()}
    x = torch.cat([s["x"] for s in sets.values()])
    emb = _cached(out / "eval_embeddings.pt", lambda: _encode(model, x, "encode evaluation slices"))
    return sets, {_key(xi): e for xi, e in zip(x, emb)}


def _volumes(paths: list[Path], prep, model, cache: Path) -> tuple[list[dict], dict]:
    """Each case of `paths` as a volume {"name", "x", "masks"},
    and the embeddings of all their slices."""
    from sammix.evaluation.evaluate import case_slices
    from sammix.training.slices import load_sources

    vols = []
    for path in paths:
        slices = load_sources([path], prep, None, masks=True)
        for run in case_slices(slices, np.arange(len(slices))):
            vols.append({"name": f"{path.name}/{slices.case[run[0]]}", "x": _images(slices.images[run]),
                         "masks": slices.masks[run] > 0})
    x = torch.cat([v["x"] for v in vols])
    name = hashlib.sha1(" ".join(v["name"] for v in vols).encode()).hexdigest()[:12]
    emb = _cached(cache / f"volume_embeddings_{name}.pt", lambda: _encode(model, x, "encode volume slices"))
    return vols, {_key(xi): e for xi, e in zip(x, emb)}


def _score_volumes(model, vols: list[dict], embeddings: dict) -> dict:
    """{volume: {"slices" | "propagate": {"dice" (per organ slice), "dice3d"}}}."""
    from sammix.evaluation.metrics import volume_dice
    from sammix.masks import dice_score
    from sammix.models.inferer import SliceInferer

    inferer = SliceInferer(CachedBackend(model, embeddings))
    scores = {}
    for v in vols:
        organ = v["masks"].reshape(len(v["masks"]), -1).any(1)
        scores[v["name"]] = {}
        for mode in ("slices", "propagate"):
            pred = (inferer.predict_volume(v["x"], propagate=mode == "propagate")["logits"] > 0).numpy()
            scores[v["name"]][mode] = {"dice": [dice_score(p, g) for p, g in zip(pred[organ], v["masks"][organ])],
                                       "dice3d": volume_dice(pred, v["masks"])}
    return scores


def _train_copies(trainer, model, seed: int, t, out: Path) -> dict:
    """AUGMENTED_COPIES augmented copies of the seed's k labelled slices (intensity and resolution
    jitter of `t`'s strengths): masks, CAM boxes and embeddings."""
    from sammix.training.augment import augment

    def make():
        gen = torch.Generator().manual_seed(seed)
        idx = np.tile(trainer.labeled, AUGMENTED_COPIES)
        x = _images(trainer.data.images[idx])
        m = torch.from_numpy(trainer.data.masks[idx]).float().unsqueeze(1)
        x, m = augment(x, m, gen, t)
        model.classifier.eval()
        boxes = torch.cat([model.cam_prompts(x[i:i + 16])[1] for i in range(0, len(x), 16)])
        return {"masks": m.bool(), "cam_boxes": boxes.detach(), "emb": _encode(model, x, f"encode seed {seed} copies")}

    k = len(trainer.labeled)
    name = f"train_copies_k{k}_s{seed}" + (f"_i{t.intensity_augment}" if t.intensity_augment != 1.0 else "") \
        + (f"_r{t.resolution_augment}" if t.resolution_augment != 1.0 else "") + ".pt"
    return _cached(out / name, make)


def _pool(trainer, model, cache: Path) -> dict:
    """Every slice of the training cases (the unlabelled pool: self-training labels it, suggest
    picks from it) with its embedding; its masks are hidden from training and only score the
    pseudo-labels."""
    d = trainer.data
    idx = d.indices_for(trainer.split["train"])
    idx = idx[d.known[idx] & (d.labels[idx] > 0)]
    pool = {"index": idx, "images": d.images[idx], "masks": d.masks[idx] > 0, "case": d.case[idx],
            "z": d.slice_index[idx], "depth": d.depth[idx]}
    x = _images(pool["images"])
    emb = _cached(cache / "pool_embeddings.pt", lambda: _encode(model, x, "encode the unlabelled pool"))
    pool["embeddings"] = {_key(xi): e for xi, e in zip(x, emb)}
    pool["emb"] = emb
    return pool


def _sam_epochs(model, samples: dict, t, epochs: int, per_epoch: int, gen, rng) -> None:
    """`epochs` of SAM-decoder training on samples {"emb", "masks", "cam_boxes"}, as the trainer's
    `sam_epoch` (its prompt rule and loss)."""
    from sammix.training.train import SamLoss, jittered_truth_boxes

    sam = model.sam.train()
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=t.lr_sam, weight_decay=t.weight_decay)
    loss_fn = SamLoss(t, sam)
    n = len(samples["emb"])
    for _ in range(epochs):
        order = torch.randperm(max(n, per_epoch), generator=gen)[:per_epoch] % n
        for i in range(0, per_epoch, t.batch_size):
            idx = order[i:i + t.batch_size]
            m = samples["masks"][idx].float()
            boxes = samples["cam_boxes"][idx]
            if t.gt_box_jitter > 0 or t.cam_box_min_iou > 0:
                boxes = jittered_truth_boxes(boxes, m, t.gt_box_jitter, rng, t.cam_box_min_iou, t.cam_box_min_organ)
            logits, scores = sam.decode(samples["emb"][idx].float(), boxes, None, size=m.shape[-1])
            loss = loss_fn(logits, scores, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sam.eval()


def _finetune(model, copies: dict, t, seed: int, pool: dict | None = None, labeled=()) -> list[dict]:
    """The supervised epochs, then the run's rounds of self-training on the pool's
    slices outside `labeled`; returns each round's pseudo-label statistics."""
    from sammix.masks import dice_score
    from sammix.models.inferer import SliceInferer
    from sammix.training.pseudo import pseudo_label

    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    k = len(copies["emb"]) // AUGMENTED_COPIES
    _sam_epochs(model, copies, t, t.epochs, t.sam_samples(k, self_training=False), gen, rng)
    rounds = []
    n_rounds = t.rounds_of_self_training(k, "cam")
    if not n_rounds:
        return rounds
    free = np.flatnonzero(~np.isin(pool["index"], labeled))
    inferer = SliceInferer(CachedBackend(model, pool["embeddings"]))
    for _ in range(n_rounds):
        with torch.no_grad():
            found = pseudo_label(inferer, pool["images"][free], pool["case"][free], pool["z"][free],
                                 pool["depth"][free], t)
        at = free[found["index"]]
        truth = [dice_score(m, g) for m, g in zip(found["masks"], pool["masks"][at])]
        keep = found["keep"]
        rounds.append({"pool": len(free), "answered": len(at), "kept": int(keep.sum()),
                       "dice_kept": float(np.mean(np.array(truth)[keep])) if keep.any() else None,
                       "dice_dropped": float(np.mean(np.array(truth)[~keep])) if (~keep).any() else None,
                       "checks": {c: found[c].tolist() for c in ("sam_iou", "box_iou")}, "truth": truth})
        kept = at[keep]
        samples = {"emb": torch.cat([copies["emb"], pool["emb"][kept]]),
                   "masks": torch.cat([copies["masks"], torch.from_numpy(found["masks"][keep])[:, None]]),
                   "cam_boxes": torch.cat([copies["cam_boxes"], torch.from_numpy(found["boxes"][keep]).float()])}
        # as the trainer: a self-training epoch draws from the k and the kept answers
        _sam_epochs(model, samples, t, t.self_train_epochs, t.sam_samples(k, self_training=True), gen, rng)
    return rounds


def _score(model, sets: dict, embeddings: dict, with_cam: bool) -> dict:
    from sammix.masks import dice_score
    from sammix.models.inferer import SliceInferer

    inferer = SliceInferer(CachedBackend(model, embeddings))
    scores = {}
    for name, s in sets.items():
        row = {"slices": s["names"]}
        for kind in ("truebox", "cam") if with_cam else ("truebox",):
            pred = np.concatenate([inferer.predict_masks(s["x"][i:i + 16], boxes=s["boxes"][i:i + 16] if kind == "truebox" else None)
                                   for i in range(0, len(s["x"]), 16)])
            row[kind] = [dice_score(p, g) for p, g in zip(pred, s["masks"])]
        scores[name] = row
    return scores


def run(args) -> None:
    from sammix.config import RunConfig, apply_overrides
    from sammix.models.sammix import SamMix
    from sammix.training.train import Trainer

    base = RunConfig.load(args.run / "config.yaml")
    fixed = SamMix.load(args.run, device="cpu")
    done = {p.stem for p in args.out.glob("*-s*.json")}
    for seed in (int(s) for s in args.seeds.split(",")):
        todo = [lever for lever in args.levers.split(",") if f"{lever}-s{seed}" not in done]
        if not todo:
            continue
        cfg = apply_overrides(base, [f"train.seed={seed}", "model.lora_rank=0"]
                              + ([f"train.labeled={args.labeled}"] if args.labeled is not None else []))
        with tempfile.TemporaryDirectory(prefix="levers-") as scaffold:  # written by the trainer's set-up only
            trainer = Trainer(cfg, Path(scaffold))  # the run's data, split and this seed's k slices
        model = trainer.model.eval()
        model.classifier.load_state_dict(fixed.classifier.state_dict())
        model.set_thresholds(fixed.cfg.cls_threshold, fixed.cfg.cam_threshold)
        start = {n: p.detach().clone() for n, p in model.sam.named_parameters() if p.requires_grad}
        sets, embeddings = _eval_sets(trainer, model, args.cache)
        k = len(trainer.labeled)
        self_training = any(apply_overrides(cfg, LEVERS[lever]).train.rounds_of_self_training(k, "cam") for lever in todo)
        pool = _pool(trainer, model, args.cache) if self_training else None  # 319 encodings: only when used
        vols, vol_embeddings = _volumes(args.volumes, cfg.prep, model, args.cache) if args.volumes else ([], {})
        pretrained = args.cache / "pretrained.json"
        if not pretrained.exists():
            pretrained.write_text(json.dumps(_score(model, sets, embeddings, with_cam=True)))
        for lever in todo:
            t = apply_overrides(cfg, LEVERS[lever]).train
            copies = _train_copies(trainer, model, seed, t, args.cache)
            with torch.no_grad():
                for n, p in model.sam.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            torch.manual_seed(seed)
            rounds = _finetune(model, copies, t, seed, pool, trainer.labeled)
            with torch.no_grad():
                result = {"lever": lever, "seed": seed, "labeled": len(trainer.labeled), "set": LEVERS[lever],
                          "self_training": rounds, **_score(model, sets, embeddings, True)}
                if vols:
                    result["volumes"] = _score_volumes(model, vols, vol_embeddings)
            (args.out / f"{lever}-s{seed}.json").write_text(json.dumps(result))
            print(f"{lever} seed {seed}: " + ", ".join(
                f"{k} {name} {np.mean(v[k]):.3f}" for name, v in result.items() if name in sets
                for k in ("truebox", "cam")), flush=True)


def _summary(d) -> str:
    d = np.asarray(d)
    return f"{d.mean():.3f}({(d < 0.5).sum()})"


def table(out: Path, cache: Path) -> None:
    pre = json.loads((cache / "pretrained.json").read_text())
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*-s*.json"))]
    sets = [s for s in pre if isinstance(pre[s], dict)]
    print("mean Dice (slices below 0.5), seeds in order; pretrained decoder: "
          + "; ".join(f"{s} true box {_summary(pre[s]['truebox'])}, CAM {_summary(pre[s]['cam'])}" for s in sets))
    print(f"{'lever':<11}" + "".join(f"{s + ' ' + k:>34}" for s in sets for k in ("truebox", "cam")) + "   broken")
    for lever in [lv for lv in LEVERS if any(r["lever"] == lv for r in results)]:
        rows = sorted((r for r in results if r["lever"] == lever), key=lambda r: r["seed"])
        cells = [" ".join(_summary(r[s][k]) for r in rows) for s in sets for k in ("truebox", "cam")]
        # slices the pretrained decoder gets right from the true box (> 0.8) and the tuned one loses (< 0.5)
        broken = [sum(t < 0.5 and p > 0.8 for s in sets for t, p in zip(r[s]["truebox"], pre[s]["truebox"])) for r in rows]
        print(f"{lever:<11}" + "".join(f"{c:>34}" for c in cells) + f"   {broken}")
    with_volumes = [r for r in results if "volumes" in r]
    if with_volumes:
        print("volumes: per-slice Dice (slices below 0.5) / 3D Dice, seeds in order, slice by slice -> volume context")
    for lever in [lv for lv in LEVERS if any(r["lever"] == lv for r in with_volumes)]:
        rows = sorted((r for r in with_volumes if r["lever"] == lever), key=lambda r: r["seed"])
        for vol in rows[0]["volumes"]:
            modes = [" ".join(f"{_summary(r['volumes'][vol][m]['dice'])}/{r['volumes'][vol][m]['dice3d']:.3f}" for r in rows)
                     for m in ("slices", "propagate")]
            print(f"{lever:<11} {vol:<32} {modes[0]} -> {modes[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="trained SAM-Mix run: its classifier, data and split")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma list of {', '.join(LEVERS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--labeled", type=int, default=None, help="k labelled slices (default: the run's)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="where embeddings and the pretrained scores are kept (default --out), to share between --out folders")
    ap.add_argument("--volumes", type=Path, nargs="*", default=[],
                    help="volume datasets (e.g. ../shared/data/lits-117) also scored slice by slice and with volume context")
    ap.add_argument("--table", action="store_true", help="only print the comparison of what --out holds")
    args = ap.parse_args()
    if not args.table and args.run is None:
        ap.error("--run is needed, except with --table")
    unknown = [lv for lv in args.levers.split(",") if lv not in LEVERS]
    if unknown:
        sys.exit(f"--levers: unknown {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache = args.cache or args.out
    if not args.table:
        run(args)
    table(args.out, args.cache)


if __name__ == "__main__":
    main()
