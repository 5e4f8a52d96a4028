"""`sammix predict`: CT volumes (NIfTI, NRRD, DICOM series) or 2D images in, aligned masks out.

Per input: read it with its geometry -> axial slices in display orientation -> window + resize to
the model's S x S -> classifier gate + GradCAM prompts -> SAM (`models.inferer.SliceInferer` over an
`engine.Engine`) ->
best-mask logits resized back to the slice's native size and thresholded -> optional 3D clean-up
(holes filled slice by slice) -> `Volume.from_axial` back onto the
stored voxel grid -> `<name>.nii.gz` (uint8, the input's shape and affine), `<name>.json` (a record
of the run) and, with preview, `<name>_preview.png`. 2D images give `<name>.png` (0/255); those of one
folder named `<case>_<slice>` are slices of one scan, predicted together (`predict_scan`), as
`evaluate` predicts a case of a slice folder.

Many inputs (`predict_inputs`; which, named how, in which part, done or not: `batch`): one bad
input costs one line on stderr and does not stop the others; the summary lists every failure.
"""

from __future__ import annotations

import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sammix import __version__
from sammix.config import RUN_WINDOW, with_inference_overrides
from sammix.data import io
from sammix.data.preprocess import slice_to_unit, volume_to_unit
from sammix.errors import SammixError, one_line
from sammix.inference import batch
from sammix.inference.engine import Engine
from sammix.inference.geometry import clean_mask, logits_to_native, mask_to_stored, to_model_input
from sammix.models.inferer import SliceInferer



# ---------------------------------------------------------------------------------------------
# prediction on arrays


def _inferer(model, **options) -> SliceInferer:
    """A SliceInferer over `model`: an inferer as it is, an Engine, or a SamMix / ExportedRun
    (an engine is made for it: `make_engine(model, **options)`)."""
    if isinstance(model, SliceInferer):
        return model
    return SliceInferer(model if isinstance(model, Engine) else make_engine(model, **options))


def _resolve_window(inferer: SliceInferer, window):
    return inferer.backend.model.prep.window if window == RUN_WINDOW else window


def _clear_times(inferer: SliceInferer) -> None:
    inferer.times.clear()
    getattr(inferer.backend, "times", {}).clear()


def _stage_times(inferer: SliceInferer) -> dict[str, float]:
    return {**getattr(inferer.backend, "times", {}), **inferer.times}


def predict_axial(inferer: SliceInferer, axial: np.ndarray, window, batch_size: int = 8, gate: bool = True,
                  progress: tqdm | None = None, times: dict | None = None,
                  slice_step: int = 1, propagate: bool | None = None,
                  spacing_rc: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """(Z,H,W) HU (or 8-bit values) in display orientation -> bool mask (Z,H,W) at native size,
    and the facts {"probs", "present", "segmented", "level_check", "one_run"} (`SliceInferer.predict_volume`, whose
    `propagate` default is the run's). `spacing_rc`: the in-plane (row, column) mm, None for
    square pixels."""
    if slice_step < 1:
        raise ValueError(f"slice_step must be >= 1, got {slice_step}")
    inferer = _inferer(inferer)
    z, h, w = axial.shape
    times = {} if times is None else times
    t0 = time.perf_counter()
    x = torch.empty(z, 1, inferer.size, inferer.size)
    for start in range(0, z, batch_size):
        x[start:start + batch_size] = to_model_input(volume_to_unit(axial[start:start + batch_size], window),
                                                      inferer.size, spacing_rc)
    times["preprocess"] = times.get("preprocess", 0.0) + time.perf_counter() - t0
    out = inferer.predict_volume(x, gate, slice_step, batch_size, progress, propagate)

    t0 = time.perf_counter()
    mask = np.zeros((z, h, w), dtype=bool)
    # volume context also walks into slices the gate rejected: every slice with logits counts
    index = np.flatnonzero(out["present"] | out["segmented"])
    for i in range(0, len(index), batch_size):
        chunk = index[i:i + batch_size]
        mask[chunk] = logits_to_native(out["logits"][chunk], (h, w), spacing_rc)
    times["resize_back"] = times.get("resize_back", 0.0) + time.perf_counter() - t0
    return mask, {k: out[k] for k in ("probs", "present", "segmented", "level_check", "one_run")}


def _model_info(inferer: SliceInferer, run) -> dict:
    engine, cfg = inferer.backend, inferer.cfg
    return {"run": None if run is None else str(run), "backbone": cfg.backbone, "classifier": cfg.classifier,
            "cls_threshold": cfg.cls_threshold, "cam_threshold": cfg.cam_threshold,
            "organ_levels": inferer.levels,
            "engine": engine.describe(), "precision": engine.precision, "backend": engine.backend}


def _environment(inferer: SliceInferer) -> dict:
    return {"sammix_version": __version__, "torch_version": torch.__version__,
            "device": str(inferer.backend.device),
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def predict_volume(model, volume: io.Volume, window=RUN_WINDOW, batch_size: int = 8, cleanup: bool = True,
                   gate: bool = True, progress: tqdm | None = None, run=None, slice_step: int = 1,
                   **engine_options):
    """A read `Volume` -> (uint8 mask on the volume's stored grid, record dict).

    `model`: a SamMix (an engine is made for it: `make_engine(model, **engine_options)`), an
    `Engine` (made once, reused across volumes) or a `SliceInferer`.
    `window`: (level, width) or None (HU clipped to [0, 255]); default the run's own.
    `slice_step`: see `predict_axial` (1: SAM sees every organ slice)."""
    inferer = _inferer(model, **engine_options)
    window = _resolve_window(inferer, window)
    _clear_times(inferer)
    times: dict[str, float] = {}
    start = time.perf_counter()
    axial = volume.axial()
    times["reorient"] = time.perf_counter() - start
    spacing = volume.axial_spacing()
    mask, facts = predict_axial(inferer, axial, window, batch_size, gate, progress, times, slice_step,
                                spacing_rc=volume.in_plane_spacing())
    stored, mask = mask_to_stored(volume, mask, cleanup, times)
    times.update(_stage_times(inferer))
    times["predict_total"] = time.perf_counter() - start

    voxels = int(mask.sum())
    with_organ = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    record = {
        "kind": "volume",
        "shape": list(volume.data.shape),
        "axial_shape": list(axial.shape),
        "affine": np.round(volume.affine, 6).tolist(),
        "spacing_mm": None if spacing is None else [round(s, 6) for s in spacing],
        "window": None if window is None else list(window),
        "organ": inferer.backend.model.prep.organ,
        "organ_voxels": voxels,
        "organ_volume_ml": None if spacing is None else round(voxels * float(np.prod(spacing)) / 1000.0, 3),
        "slices": int(len(axial)),
        "slices_classified_present": int(facts["present"].sum()),
        "slices_segmented": int(facts["segmented"].sum()),
        "slice_step": int(slice_step),
        "level_check": facts["level_check"],  # masks fitted to the organ's intensity, found again, emptied
        "one_run": facts["one_run"],  # runs of slices apart from the organ's main run, dropped; slices they emptied
        "slices_with_organ": int(len(with_organ)),
        "organ_slice_range": None if not len(with_organ) else [int(with_organ[0]), int(with_organ[-1])],
        "slice_order": "axial, index 0 the most inferior slice",
        "cleanup": bool(cleanup),
        "gate": bool(gate),
        "batch_size": int(batch_size),
        "model": _model_info(inferer, run),
        "timings_s": {k: round(v, 3) for k, v in times.items()},
        "slices_per_s": round(len(axial) / max(times["predict_total"], 1e-9), 3),
        **_environment(inferer),
    }
    return stored, record


def predict_scan(model, images, positions, window=RUN_WINDOW, cleanup: bool = True, gate: bool = True,
                 run=None, batch_size: int = 8, **engine_options) -> list[tuple[np.ndarray, dict]]:
    """2D images as read by `read_image2d` (8-bit: /255; otherwise HU through the window), the
    slices `positions` (ascending) of one scan -> (uint8 0/1 mask of each image's size, its record).
    They are predicted as that sampled scan (`SliceInferer.predict_volume`), as `evaluate` predicts
    a case of a slice folder: the level check sees them together."""
    inferer = _inferer(model, **engine_options)
    window = _resolve_window(inferer, window)
    _clear_times(inferer)
    start = time.perf_counter()
    images = [np.asarray(image) for image in images]
    flat = next((image.shape for image in images if image.ndim != 2), None)
    if flat is not None:
        raise ValueError(f"predict_scan expects 2D images, got shape {flat}")
    times = {}
    t0 = time.perf_counter()
    x = torch.cat([to_model_input(slice_to_unit(image, window)[None], inferer.size) for image in images])
    times["preprocess"] = time.perf_counter() - t0
    out = inferer.predict_volume(x, gate, batch_size=batch_size, positions=positions)
    times.update(_stage_times(inferer))
    times["predict_total"] = time.perf_counter() - start
    results = []
    for j, image in enumerate(images):
        mask = np.zeros(image.shape, dtype=bool)
        if out["present"][j] or out["segmented"][j]:
            mask = logits_to_native(out["logits"][j:j + 1], image.shape)[0]
        if cleanup:
            mask = clean_mask(mask)
        record = {
            "kind": "image",
            "shape": list(image.shape),
            "window": "8-bit /255" if image.dtype == np.uint8 else (None if window is None else list(window)),
            "organ": inferer.backend.model.prep.organ,
            "organ_pixels": int(mask.sum()),
            "organ_volume_ml": None,
            "probability": float(out["probs"][j]),
            "slices_classified_present": int(out["present"][j]),
            "slices_with_organ": int(mask.any()),
            "level_check": out["level_check"],  # the scan's (None alone, or with too few masks)
            "cleanup": bool(cleanup),
            "gate": bool(gate),
            "model": _model_info(inferer, run),
            "timings_s": {k: round(v, 3) for k, v in times.items()},  # the scan's
            **_environment(inferer),
        }
        results.append((mask.astype(np.uint8), record))
    return results


# ---------------------------------------------------------------------------------------------
# files


def _preview_image(volume: io.Volume, window) -> np.ndarray:
    """The axial slices through the window as uint8 (a quarter of float32's memory)."""
    axial = volume.axial()
    out = np.empty(axial.shape, dtype=np.uint8)
    for start in range(0, len(axial), 16):
        unit = volume_to_unit(axial[start:start + 16], None if window is None else tuple(window))
        out[start:start + 16] = np.round(unit * 255.0)
    return out


def _write_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    with io.atomic_path(path) as tmp:
        Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(tmp)


def _finish(job: batch.Job, record: dict, out: Path, args: dict, t_read: float, t0: float) -> dict:
    """The job's record, completed and written last (the mark `batch.is_done` trusts)."""
    targets = job.targets(out)
    record["timings_s"]["read"] = round(t_read, 3)
    record["timings_s"]["write"] = round(time.perf_counter() - t0, 3)
    record["timings_s"]["total"] = round(sum(record["timings_s"][k] for k in ("read", "predict_total", "write")), 3)
    record = {"input": str(job.input.resolve()), "output": str(targets["mask"].resolve()),
              "preview": str(targets["preview"].resolve()) if args["preview"] and not job.is_image else None,
              "run_key": args["run_key"], **record}
    if job.is_image and args["preview"]:
        record["preview_note"] = "no preview for 2D images (the mask PNG is the picture)"
    io.write_json(record, targets["record"])
    return record


def _process_volume(engine: Engine, job: batch.Job, out: Path, args: dict, bar) -> dict:
    """Segment one volume into its files."""
    targets = job.targets(out)
    targets["record"].unlink(missing_ok=True)  # outputs are about to change: no longer done
    t0 = time.perf_counter()
    volume = io.read_volume(job.input)
    t_read = time.perf_counter() - t0
    slices = tqdm(total=volume.axial_shape()[0], desc=job.name, unit="slice", leave=False, disable=bar.disable)
    try:
        mask, record = predict_volume(engine, volume, args["window"], args["batch_size"], args["cleanup"],
                                      progress=slices, run=args["run"], slice_step=args["slice_step"])
    finally:
        slices.close()
    t0 = time.perf_counter()
    io.write_mask(mask, volume, targets["mask"])
    if args["preview"]:
        from sammix.viz import volume_preview

        volume_preview(_preview_image(volume, record["window"]), volume.to_axial(mask), targets["preview"])
    return _finish(job, record, out, args, t_read, t0)


def _process_images(engine: Engine, jobs: list[batch.Job], out: Path, args: dict, fail) -> list[tuple[batch.Job, dict]]:
    """Segment 2D images, one scan's slices together (`batch.scans`; a lone image is a scan of
    one), into their files; an image that cannot be read is failed alone."""
    read = []
    t0 = time.perf_counter()
    for job in jobs:
        job.targets(out)["record"].unlink(missing_ok=True)
        try:
            read.append((job, io.read_image2d(job.input)))
        except SammixError as exc:
            fail(job, str(exc))
    if not read:
        return []
    t_read = time.perf_counter() - t0
    positions = [job.scan[2] for job, _ in read] if len(read) > 1 else [0]
    found = predict_scan(engine, [image for _, image in read], positions, args["window"], args["cleanup"],
                         run=args["run"], batch_size=args["batch_size"])
    done = []
    for (job, _), (mask, record) in zip(read, found):
        t0 = time.perf_counter()
        _write_png(mask, job.targets(out)["mask"])
        if len(read) > 1:
            record["scan"] = {"case": job.scan[1], "slices": positions}
        done.append((job, _finish(job, record, out, args, t_read, t0)))
    return done


def load_for_inference(run, device: str = "auto", precision: str = "auto", backend: str = "auto"):
    """A run folder (or an already built SamMix) -> (model, run path or None).

    Where the engine will be ONNX Runtime on the CPU and the run's export already exists, the
    model is an `export.ExportedRun`: the graphs and settings, no PyTorch model built (nor its
    libraries imported)."""
    from sammix.config import resolve_device
    from sammix.inference.export import load_exported

    if not isinstance(run, (str, Path)):
        return run.eval(), None
    if backend in ("auto", "onnx") and precision in ("auto", "fp32", "int8") and resolve_device(device).type == "cpu":
        exported = load_exported(run)
        if exported is not None:
            return exported, Path(run)
    from sammix.models.sammix import SamMix

    return SamMix.load(run, device=device), Path(run)


def make_engine(model, run: Path | None = None, precision: str = "auto", backend: str = "auto") -> Engine:
    """The engine for `precision`: on a CPU, ONNX Runtime (fp32, exact and the default; or int8);
    on a GPU, PyTorch (fp32 or bf16)."""
    from sammix.inference.export import ExportedRun, cached_export

    if isinstance(model, ExportedRun):
        return Engine(model, precision, "onnx", onnx_dir=model.onnx_dir)
    if precision == "int8" and model.device.type != "cpu":
        raise SammixError("--precision int8 runs on the CPU (ONNX Runtime); on a GPU use fp32 or bf16")
    if backend == "auto":
        backend = "onnx" if model.device.type == "cpu" and precision in ("auto", "fp32", "int8") else "torch"
    if backend == "onnx":
        def notify(folder):
            tqdm.write(f"sammix predict: preparing ONNX Runtime graphs for this model in {folder} "
                       "(once, a minute or less; reused by later runs)", file=sys.stderr)

        try:
            return Engine(model, precision, "onnx", onnx_dir=cached_export(model, run, notify=notify))
        except Exception as exc:  # noqa: BLE001  any export trouble: PyTorch gives the same answers, slower
            first = (str(exc).strip().splitlines() or [""])[0]
            if precision == "int8":
                raise SammixError(f"--precision int8 needs ONNX Runtime, which failed ({type(exc).__name__}: {first})")
            tqdm.write(f"sammix predict: ONNX Runtime unavailable ({type(exc).__name__}: {first}); "
                       "using PyTorch", file=sys.stderr)
    return Engine(model, precision, "torch")


def predict_inputs(run, inputs, out, preview: bool = False, overwrite: bool = False, cleanup: bool = True,
                   batch_size: int = 8, window=RUN_WINDOW, device: str = "auto", precision: str = "auto",
                   backend: str = "auto", slice_step: int = 1, manifests=(), num_parts: int = 1,
                   part_id: int = 0, overrides=()) -> dict:
    """Segment every input (paths, folders, rows of manifest CSVs) into `out`, skipping those done
    by the same run and settings (`batch.is_done`) unless `overwrite`; the jobs of part `part_id`
    of `num_parts` only (`batch.select_part`). Returns the summary, also written to
    OUT/`batch.summary_name`: every job's input, predicted, skipped (done) or failed with its
    one-line reason.

    run: a run folder or a SamMix; window: (level, width), None (8-bit as stored) or RUN_WINDOW
    (the run's own); `overrides`: inference
    settings (`config.with_inference_overrides`). backend "auto": ONNX Runtime
    on a CPU (the run's export, made once and cached: `export.cached_export`), PyTorch on a GPU.
    The output folder, the inputs and the run's files are checked before any model work."""
    if batch_size < 1:
        raise SammixError(f"--batch-size must be at least 1, got {batch_size}")
    if slice_step < 1:
        raise SammixError(f"--slice-step must be at least 1, got {slice_step}")
    out = io.check_output_folder(out)
    scans = batch.select_part(batch.plan_jobs(inputs, manifests, out, num_parts), num_parts, part_id)
    jobs = [job for scan in scans for job in scan]
    args = {"window": window, "cleanup": cleanup, "batch_size": batch_size,
            "preview": preview, "slice_step": slice_step,
            "run_key": batch.run_key(run, {"window": window, "cleanup": cleanup, "slice_step": slice_step,
                                           "precision": precision, "overrides": sorted(overrides)})}
    summary = {"run": str(run), "run_key": args["run_key"], "out": str(out.resolve()), "part": [part_id, num_parts],
               "inputs": len(jobs), "predicted": [], "skipped": [], "failed": []}

    def fail(job: batch.Job, message: str) -> None:
        tqdm.write(f"sammix predict: error: {message}", file=sys.stderr)
        summary["failed"].append({"input": str(job.input), "error": message})

    todo = []
    for scan in scans:
        good = []
        for job in scan:
            if job.error is not None:
                fail(job, job.error)
                continue
            for target in job.targets(out).values():
                io.remove_stale_temps(target)  # this part alone writes this job's files
            good.append(job)
        if overwrite or not all(batch.is_done(job, out, args["run_key"], preview) for job in good):
            todo.append(good)  # a scan's slices are predicted together: all of them, if one is not done
        else:
            summary["skipped"] += [str(job.input) for job in good]
    todo = [scan for scan in todo if scan]
    if summary["skipped"]:
        tqdm.write(f"sammix predict: {len(summary['skipped'])} of {len(jobs)} inputs already done by this run "
                   "and settings, skipped (--overwrite redoes them)", file=sys.stderr)
    if todo:
        model, args["run"] = load_for_inference(run, device, precision, backend)
        model.cfg = with_inference_overrides(model.cfg, list(overrides))
        engine = make_engine(model, args["run"], precision, backend)
        bar = tqdm(total=sum(map(len, todo)), desc="predict", unit="input", disable=None)
        for scan in todo:
            bar.set_postfix_str(scan[0].name)
            try:
                if scan[0].is_image:
                    done = _process_images(engine, scan, out, args, fail)
                else:
                    done = [(scan[0], _process_volume(engine, scan[0], out, args, bar))]
            except Exception as exc:  # one broken input must not stop the others
                message = str(exc) if isinstance(exc, SammixError) else None
                failed = {f["input"] for f in summary["failed"]}
                for job in scan:
                    if str(job.input) not in failed:
                        fail(job, message or f"{job.input}: {one_line(exc)}")
                done = []
            for job, record in done:
                summary["predicted"].append(str(job.input))
                vol = record["organ_volume_ml"]
                tqdm.write(f"{job.input} -> {record['output']}: {record['slices_with_organ']}/{record.get('slices', 1)} "
                           f"slices{'' if vol is None else f', {vol:.0f} mL'} in {record['timings_s']['total']:.1f} s")
            bar.update(len(scan))
        bar.close()
    summary_path = out / batch.summary_name(num_parts, part_id)
    io.write_json(summary, summary_path)
    if summary["failed"]:
        lines = "".join(f"\n  {f['error']}" for f in summary["failed"])
        tqdm.write(f"sammix predict: {len(summary['failed'])} of {len(jobs)} inputs failed "
                   f"(listed in {summary_path}):{lines}", file=sys.stderr)
    return summary
