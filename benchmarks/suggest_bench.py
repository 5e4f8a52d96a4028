"""Does labelling the slices `sammix suggest` picks beat labelling random ones (issue 12)?

    .venv/bin/python benchmarks/suggest_bench.py --run RUN --cache DIR --out DIR [--seeds 0,1,2]

On the training cases of RUN's split every mask is hidden; an arm reveals the masks of the k
slices it picks, SAM is fine-tuned on those, and the test cases are scored (mean per-slice Dice
with the CAM prompt, the gate included). The arms:

- random-10, random-20: k slices drawn at random (seeded);
- suggest-10, suggest-20: `suggest.pick` without a run (spread over cases and along the organ in
  the features of the ImageNet classifier, as `sammix suggest` does with no --run);
- suggest-10+10: a second round. The model trained on suggest-10 answers every pool slice; its
  doubt (`training.pseudo.answer_checks`, turned round, as `sammix suggest --run`) and the run's
  classifier features pick 10 more, and SAM is trained again from the pretrained decoder on all 20.

Training is `finetune_levers.py`'s proxy: SAM's decoder alone, on embeddings computed once by the
frozen encoder (one copy of each slice, not augmented), with RUN's classifier fixed, so arms differ
only in which slices are labelled. Embeddings are shared with finetune_levers through --cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from finetune_levers import CachedBackend, _eval_sets, _images, _pool, _sam_epochs, _score  # noqa: E402

ARMS = ("random-10", "random-20", "suggest-10", "suggest-20", "suggest-10+10")
MIN_GAP = 5


@torch.no_grad()
def _features(classifier, images: np.ndarray) -> np.ndarray:
    x = _images(images)
    return np.concatenate([classifier.features(x[i:i + 16]).mean(dim=(2, 3)).numpy() for i in range(0, len(x), 16)])


def _doubt(model, pool: dict, t) -> np.ndarray:
    """The model's doubt on every pool slice, as `sammix suggest --run` ranks it (1 where the gate
    calls a slice organ-free: the model does not see the organ there)."""
    from sammix.models.inferer import SliceInferer
    from sammix.training.pseudo import answer_doubt, pseudo_label

    found = pseudo_label(SliceInferer(CachedBackend(model, pool["embeddings"])), pool["images"], pool["case"],
                         pool["z"], pool["depth"], t)
    result = np.ones(len(pool["images"]))
    result[found["index"]] = answer_doubt(found)
    return result


def _train(model, start: dict, pool: dict, chosen, t, seed: int) -> None:
    """SAM's decoder from the pretrained weights, trained on the chosen pool slices with their
    (revealed) masks and the fixed classifier's CAM boxes."""
    with torch.no_grad():
        for n, p in model.sam.named_parameters():
            if n in start:
                p.copy_(start[n])
    chosen = np.asarray(chosen)
    model.classifier.eval()
    x = _images(pool["images"][chosen])
    boxes = torch.cat([model.cam_prompts(x[i:i + 16])[1] for i in range(0, len(x), 16)]).detach()
    samples = {"emb": pool["emb"][chosen], "masks": torch.from_numpy(pool["masks"][chosen])[:, None], "cam_boxes": boxes}
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    _sam_epochs(model, samples, t, t.epochs, t.sam_samples(len(chosen), self_training=False), gen, rng)


def run(args) -> None:
    from sammix.config import ModelConfig, RunConfig, apply_overrides
    from sammix.models.classifier import build_classifier
    from sammix.models.sammix import SamMix
    from sammix.suggest import pick
    from sammix.training.train import Trainer

    base = RunConfig.load(args.run / "config.yaml")
    fixed = SamMix.load(args.run, device="cpu")
    imagenet = build_classifier(ModelConfig()).eval()
    for seed in (int(s) for s in args.seeds.split(",")):
        todo = [a for a in ARMS if not (args.out / f"{a}-s{seed}.json").exists()]
        if not todo:
            continue
        cfg = apply_overrides(base, [f"train.seed={seed}", "model.lora_rank=0"])
        with tempfile.TemporaryDirectory(prefix="suggest-") as scaffold:
            trainer = Trainer(cfg, Path(scaffold))
        model = trainer.model.eval()
        model.classifier.load_state_dict(fixed.classifier.state_dict())
        model.set_thresholds(fixed.cfg.cls_threshold, fixed.cfg.cam_threshold)
        start = {n: p.detach().clone() for n, p in model.sam.named_parameters() if p.requires_grad}
        sets, embeddings = _eval_sets(trainer, model, args.cache)
        sets = {k: v for k, v in sets.items() if k in ("test", "cross")}
        pool = _pool(trainer, model, args.cache)
        case, z, n = pool["case"], pool["z"], len(pool["images"])
        rng = np.random.default_rng(seed)
        spread = _features(imagenet, pool["images"])
        picks = {"random-10": rng.choice(n, 10, replace=False), "random-20": rng.choice(n, 20, replace=False),
                 "suggest-10": pick(case, z, spread, np.zeros(n), 10, MIN_GAP)[0],
                 "suggest-20": pick(case, z, spread, np.zeros(n), 20, MIN_GAP)[0]}
        for arm in todo:
            if arm == "suggest-10+10":
                _train(model, start, pool, picks["suggest-10"], cfg.train, seed)
                first = np.isin(np.arange(n), picks["suggest-10"])
                more = pick(case, z, _features(model.classifier, pool["images"]), _doubt(model, pool, cfg.train), 10, MIN_GAP,
                            labelled=first)[0]
                picks[arm] = np.concatenate([picks["suggest-10"], more])
            _train(model, start, pool, picks[arm], cfg.train, seed)
            with torch.no_grad():
                scores = _score(model, sets, embeddings, with_cam=True)
            chosen = [f"{case[i]}/{z[i]}" for i in picks[arm]]
            (args.out / f"{arm}-s{seed}.json").write_text(json.dumps({"arm": arm, "seed": seed, "slices": chosen,
                                                                      **scores}))
            print(f"{arm} seed {seed}: " + ", ".join(f"{s} CAM {np.mean(scores[s]['cam']):.3f}" for s in sets),
                  flush=True)


def table(out: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*-s*.json"))]
    print("mean per-slice Dice with the CAM prompt (slices below 0.5), seeds in order")
    for arm in ARMS:
        rows = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if rows:
            cells = [f"{s} " + " ".join(f"{np.mean(r[s]['cam']):.3f}({int((np.asarray(r[s]['cam']) < 0.5).sum())})"
                                        for r in rows) for s in ("test", "cross")]
            cases = [len({c.rpartition('/')[0] for c in r["slices"]}) for r in rows]
            print(f"{arm:<14} " + "   ".join(cells) + f"   cases {cases}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="trained SAM-Mix run: its classifier, data and split")
    ap.add_argument("--cache", type=Path, help="finetune_levers.py's embeddings folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--table", action="store_true", help="only print the comparison of what --out holds")
    args = ap.parse_args()
    if not args.table and (args.run is None or args.cache is None):
        ap.error("--run and --cache are needed, except with --table")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        run(args)
    table(args.out)


if __name__ == "__main__":
    main()
