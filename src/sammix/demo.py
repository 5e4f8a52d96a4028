"""`sammix demo`: the whole pipeline on real CT in a few CPU minutes.

Without --data it uses LiTS volume 117, obtained through the package registry (see
data/embedded.py) and cached. It prepares the slices, trains SAM-Mix on 5 labelled slices of the
volume (the classifier sees every slice's label), segments the whole volume with no prompt,
writes the aligned mask, a preview and a JSON record, and scores the mask against the label.
Training and scoring on one volume is a demonstration, not an evaluation: docs/results.md has
the held-out numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from sammix.config import ModelConfig, PrepConfig, RunConfig, TrainConfig

DEMO_LABELED = 5
DEMO_EPOCHS = 2
DEMO_SAM_SAMPLES = 16  # SAM steps per epoch x batch: keeps the demo to minutes on a laptop CPU


def run_demo(data: Path | None = None, out: Path = Path("sammix-demo"), epochs: int | None = None) -> dict:
    from sammix.data.embedded import fetch_lits_demo
    from sammix.data.io import read_volume
    from sammix.data.layouts import list_cases, load_case
    from sammix.evaluation.metrics import volume_dice
    from sammix.inference.batch import output_stem
    from sammix.inference.predict import predict_inputs
    from sammix.training.train import train

    out = Path(out).resolve()
    if data is None:
        data = fetch_lits_demo()
        print(f"demo data: LiTS volume 117 from the package registry, cached in {data}")
    data = Path(data)
    cfg = RunConfig(prep=PrepConfig(), model=ModelConfig(),
                    train=TrainConfig(labeled=DEMO_LABELED, epochs=epochs or DEMO_EPOCHS, seed=0,
                                      sam_samples_per_epoch=DEMO_SAM_SAMPLES,
                                      self_train_rounds=0),  # its labelling of ~100 slices would double the demo's time
                    data=[str(data)])
    run = out / "run"
    train(cfg, run)

    case = list_cases(data)[0]  # the first case: segmented whole and scored against its label
    predictions = out / "predictions"
    predict_inputs(run, [case.image], predictions, preview=True, overwrite=True)
    stem = output_stem(case.image)
    summary = {"data": str(data), "case": case.case_id, "run": str(run),
               "mask": str(predictions / f"{stem}.nii.gz"), "preview": str(predictions / f"{stem}_preview.png")}
    _, label = load_case(case, cfg.prep.organ)
    if label is not None and Path(summary["mask"]).is_file():
        summary["dice3d"] = volume_dice(read_volume(summary["mask"]).data, label)
        print(f"3D Dice of the predicted mask against the label of case {case.case_id}: {summary['dice3d']:.3f} "
              f"({DEMO_LABELED} of its slices were labelled for training: a demo, not an evaluation)")
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\ndemo finished. Outputs in {out}:\n  run folder (config, split, weights, log): {run}\n"
          f"  aligned mask, preview and JSON record: {predictions}")
    return summary
