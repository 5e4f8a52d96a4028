"""What `sammix predict --slice-step N` and volume context save and cost: SAM slices and 3D Dice.

    .venv/bin/python benchmarks/slice_step_bench.py --run RUN [--steps 1,2,3,4] [--precision int8] \
        [--volumes chaos,totalseg,lits117,synthetic512]

On the CHAOS DICOM series, the TotalSegmentator example and LiTS volume 117 (../shared/data) and
a generated 512x512x200 CT (2 mm slices), with one engine for all: per step, how many slices SAM
saw, seconds, and the 3D Dice of the cleaned mask against the every-slice mask (step 1) and
against the liver labels where there are some. Then the same steps with volume context
(`model.propagate`, which walks from the surest slice and stops at the organ's ends, so SAM sees
only the slices it walks through; the step is how far it jumps), against its own step 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _dice(a, b) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _volumes(tmp: Path) -> dict:
    from predict_bench import _make_synthetic

    synthetic = (tmp / "synthetic512.nii.gz", tmp / "synthetic512_liver.nii.gz")
    _make_synthetic(*synthetic)
    return {"chaos": (SHARED / "chaos-ct3" / "dicom", None),
            "totalseg": (SHARED / "totalseg-example" / "ct.nii.gz",
                         SHARED / "totalseg-example" / "segmentations" / "liver.nii.gz"),
            "lits117": (SHARED / "lits-117" / "volume-117.nii.gz", SHARED / "lits-117" / "segmentation-117.nii.gz"),
            "synthetic512": synthetic}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--steps", default="1,2,3,4")
    p.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    p.add_argument("--volumes", default="chaos,totalseg,lits117,synthetic512", help="which of them, comma-separated")
    args = p.parse_args()

    from sammix.data.io import read_volume
    from sammix.inference.geometry import mask_to_stored
    from sammix.inference.predict import load_for_inference, make_engine, predict_axial
    from sammix.models.inferer import SliceInferer

    engine = make_engine(*load_for_inference(args.run, "cpu", args.precision), precision=args.precision)
    inferer = SliceInferer(engine)
    steps = [int(s) for s in args.steps.split(",")]
    if steps[0] != 1:
        raise SystemExit("--steps must start with 1 (the reference)")
    print("| volume | step | slices to SAM | s | Dice vs step 1 (the same mode) | Dice vs labels |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ct, labels) in _volumes(Path(tmp)).items():
            if name not in args.volumes.split(","):
                continue
            volume = read_volume(ct)
            axial = volume.axial()
            gt = None if labels is None else read_volume(labels).axial() > 0
            for context in (False, True):
                reference = None
                for step in steps:
                    start = time.perf_counter()
                    mask, facts = predict_axial(inferer, axial, engine.model.prep.window, slice_step=step,
                                                propagate=context, spacing_rc=volume.in_plane_spacing())
                    _, mask = mask_to_stored(volume, mask)  # the 3D clean-up, as `sammix predict`
                    seconds = time.perf_counter() - start
                    reference = mask if reference is None else reference
                    vs_gt = "-" if gt is None else f"{_dice(mask, gt):.3f}"
                    print(f"| {name} | {'context, ' * context}{step} | {int(facts['segmented'].sum())} of "
                          f"{int(facts['present'].sum())} present ({len(axial)}) | {seconds:.1f} | "
                          f"{_dice(mask, reference):.4f} | {vs_gt} |", flush=True)


if __name__ == "__main__":
    main()
