"""The experiment's report folder: report.md (the paper's table), results.csv (every per-slice
score), dice_boxplot.png, qualitative.png and cam.png. Reads what the grid stored in each cell's
eval/ folder, so it can be rewritten without running any model."""

from __future__ import annotations

import csv
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from sammix.data.io import atomic_path
from sammix.evaluation.methods import METHODS

CSV_FIELDS = ["method", "k", "seed", "test_set", "domain", "case", "slice", "dice", "hd", "hd95", "nsd",
              "hd_mm", "hd95_mm", "nsd_mm", "cam_box_iou"]
TABLE_METRICS = [("dice", "Dice", 3), ("hd", "HD", 1), ("hd95", "HD95", 1)]

# Ward & Imran, ISBI 2025, per-slice Dice / HD (LiTS in-domain; 20 TotalSegmentator CTs cross-domain)
PAPER = [("U-Net (all labels)", 0.897, 13.5, 0.669, 29.6), ("nnU-Net (all labels)", 0.863, 21.4, 0.645, 38.5),
         ("SAM, no segmentation training", 0.441, 67.6, 0.334, 72.2),
         ("SAM-Mix, 5 labelled slices", 0.919, 15.1, 0.807, 17.6),
         ("SAM-Mix, 50 labelled slices", 0.948, 9.8, 0.923, 11.2)]


def _load_eval(out: Path, cell_name: str, test_name: str) -> dict | None:
    path = out / "runs" / cell_name / "eval" / f"{test_name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _load_pred(out: Path, cell_name: str, test_name: str) -> dict | None:
    path = out / "runs" / cell_name / "eval" / f"{test_name}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        shape = tuple(z["shape"])
        masks = np.unpackbits(z["masks"], axis=1, count=int(np.prod(shape[1:]))).reshape(shape).astype(bool)
        return {"masks": masks, "boxes": z["boxes"], "qual": z["qual"], "qual_cams": z["qual_cams"].astype(np.float32)}


def _groups(cells) -> list[tuple[str, int | None]]:
    """(method, k) rows in grid order."""
    return list(dict.fromkeys((c.method, c.k) for c in cells))


def _fmt(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})


def _table(spec, cells, test_sets, evals) -> tuple[list[str], list[str]]:
    """The main table: one row per (method, k), per test set Dice / HD / HD95 as mean ± sd over
    seeds of each seed's mean per-slice score. Best non-oracle value per column in bold."""

    rows = _groups(cells)
    stats: dict = {}
    for method, k in rows:
        for ts in test_sets:
            for key, _, _ in TABLE_METRICS:
                stats[(method, k, ts.name, key)] = [
                    e["summary"].get(f"{key}_mean") for c in cells if (c.method, c.k) == (method, k)
                    for e in [evals.get((c.name, ts.name))] if e is not None]
    best = {}
    for ts in test_sets:
        for key, _, _ in TABLE_METRICS:
            means = {(m, k): np.mean(v) for (m, k, t, kk), v in stats.items()
                     if t == ts.name and kk == key and v and m != "sam-oracle"}
            if means:
                pick = max if key == "dice" else min
                best[(ts.name, key)] = pick(means, key=means.get)
    header = "| method | k | seeds | " + " | ".join(f"{label} {ts.name}" for ts in test_sets
                                                       for _, label, _ in TABLE_METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + len(test_sets) * len(TABLE_METRICS))]
    for method, k in rows:
        n_seeds = max((len(stats[(method, k, ts.name, "dice")]) for ts in test_sets), default=0)
        seeds = str(n_seeds) if METHODS[method].trained else "– (untrained)"
        cells_text = []
        for ts in test_sets:
            for key, _, digits in TABLE_METRICS:
                text = _fmt(stats[(method, k, ts.name, key)], digits)
                if best.get((ts.name, key)) == (method, k) and text != "–":
                    text = f"**{text}**"
                cells_text.append(text)
        lines.append(f"| {METHODS[method].label} | {'' if k is None else k} | {seeds} | " + " | ".join(cells_text) + " |")
    return lines, [f"{ts.name}" for ts in test_sets]


def _stack_vertically(paths: list[Path], out: Path) -> None:
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images)), (17, 17, 17))
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")


def write_figures(spec, cells, test_sets, evals, out: Path) -> dict[str, str]:
    """dice_boxplot.png, qualitative.png, cam.png; returns {figure: note} for what was skipped."""
    from sammix import viz

    notes = {}
    scores: dict[str, dict[str, list[float]]] = {}
    for c in cells:
        for ts in test_sets:
            e = evals.get((c.name, ts.name))
            if e is not None:
                scores.setdefault(c.short, {}).setdefault(ts.name, []).extend(r["dice"] for r in e["per_slice"])
    if scores:
        viz.dice_boxplot(scores, out / "dice_boxplot.png", title="Per-slice Dice (all seeds pooled)")
    else:
        notes["dice_boxplot.png"] = "no cell finished"
        (out / "dice_boxplot.png").unlink(missing_ok=True)  # never leave an earlier grid's figure

    # the same slices across methods: for each (method, k) its first seed's run
    first: dict[tuple, object] = {}
    for c in cells:
        if all((c.name, ts.name) in evals for ts in test_sets):
            first.setdefault((c.method, c.k), c)
    images, gts, preds = [], [], {c.short: [] for c in first.values()}
    for ts in test_sets:
        idx = ts.idx[ts.qual]
        images += list(ts.slices.images[idx])
        gts += list(ts.slices.masks[idx] > 0)
        for c in first.values():
            pred = _load_pred(out, c.name, ts.name)
            preds[c.short] += list(pred["masks"][ts.qual])
    if preds:
        viz.qualitative_grid(images, gts, preds, out / "qualitative.png")
    else:
        notes["qualitative.png"] = "no cell finished on every test set"
        (out / "qualitative.png").unlink(missing_ok=True)

    # SAM-Mix's CAM and prompt box on those slices (its first k, first seed)
    sammix = [c for c in first.values() if c.method == "sammix"]
    if sammix:
        c = sammix[0]
        with tempfile.TemporaryDirectory() as tmp:
            parts = []
            for ts in test_sets:
                pred = _load_pred(out, c.name, ts.name)
                for j, pos in enumerate(ts.qual):
                    i = ts.idx[pos]
                    box = pred["boxes"][pos]
                    path = Path(tmp) / f"{len(parts):03d}.png"
                    viz.cam_figure(ts.slices.images[i], pred["qual_cams"][j], None if np.isnan(box).any() else box,
                                   path, gt_mask=ts.slices.masks[i] > 0, pred=pred["masks"][pos], panel_px=256)
                    parts.append(path)
            _stack_vertically(parts, out / "cam.png")
        notes["cam.png"] = f"SAM-Mix run {c.name}"
    else:
        notes["cam.png"] = "not drawn: no finished SAM-Mix cell"
        (out / "cam.png").unlink(missing_ok=True)
    return notes


def _diagnosis_table(cells, test_sets, evals) -> list[str]:
    """"Where the Dice goes" for the SAM-Mix cells (`evaluation.diagnose`)."""
    rows = []
    for c in cells:
        for ts in test_sets:
            d = evals.get((c.name, ts.name), {}).get("diagnosis")
            if not d or not d.get("n_slices"):
                continue
            causes = ", ".join(f"{k} {v}" for k, v in d["failures_by_cause"].items() if v) or "none"
            rows.append(f"| {c.name} | {ts.name} | {d['dice_cam_mean']:.3f} | {d['dice_true_box_mean']:.3f} | "
                        f"{d['dice_true_box_pretrained_mean']:.3f} | {len(d['failures'])} of {d['n_slices']}: "
                        f"{causes} | {d['failures_where_true_box_above_0.8']} |")
    if not rows:
        return []
    return ["## Where the Dice goes (SAM-Mix)", "",
            "Per-slice Dice with the CAM prompt (as run), with each slice's true box given to the same "
            "fine-tuned model, and with the true box given to the pretrained backbone; the slices below "
            "Dice 0.5 by cause (box on wrong structure: IoU with the true box < 0.3); the last column counts "
            "those where the true box gives above 0.8. Figures: runs/<cell>/eval/<test set>_failures.png.", "",
            "| cell | test set | CAM prompt | true box | pretrained + true box | below 0.5 | of them, true box > 0.8 |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def write_report(spec, cells, statuses, test_sets, out: Path, wall_seconds: float) -> Path:

    out = Path(out)
    domain_of = {ts.name: ts.domain for ts in test_sets}
    evals, rows = {}, []
    for c in cells:
        for ts in test_sets:
            e = _load_eval(out, c.name, ts.name)
            status = next((s for s in statuses if s["cell"] == c.name), {})
            if e is None or status.get("status") != "done":
                continue
            evals[(c.name, ts.name)] = e
            for r in e["per_slice"]:
                rows.append({"method": c.method, "k": c.k, "seed": c.seed, "test_set": ts.name,
                             "domain": domain_of[ts.name], **r})
    write_csv(rows, out / "results.csv")
    notes = write_figures(spec, cells, test_sets, evals, out)

    table, _ = _table(spec, cells, test_sets, evals)
    by_name = {s["cell"]: s for s in statuses}
    failed = [s for s in statuses if s["status"] != "done"]
    train_total = sum(s.get("train_seconds", 0.0) or 0.0 for s in statuses)
    eval_total = sum(sum((s.get("eval_seconds") or {}).values()) for s in statuses)
    import torch

    device = "cuda (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() and \
        spec.train.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
    lines = [
        "# SAM-Mix experiment",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')}. Command (rerun it to complete or reuse the grid):",
        "",
        "```",
        spec.command or "(called from Python: see experiment.json)",
        "```",
        "",
        f"Wall time of this invocation: {_minutes(wall_seconds)} on {device}. Compute recorded over the "
        f"grid's cells (including earlier invocations): training {_minutes(train_total)}, evaluation "
        f"{_minutes(eval_total)}. {len(cells) - len(failed)} of {len(cells)} cells finished"
        + (f", **{len(failed)} failed** (below)." if failed else "."),
        "",
        "Test sets: " + "; ".join(
            f"**{ts.name}** ({ts.domain}: {int(ts.present().sum())} slices with the organ scored, from "
            f"{_n(len(set(ts.slices.case[ts.idx])), 'case')}"
            + (", the held-out test cases of the case split" if ts.domain == "in-domain" else "") + ")"
            for ts in test_sets) + ".",
        "",
        "## Per-slice Dice and Hausdorff distance",
        "",
        "Each value is the mean over seeds of a run's mean per-slice score, ± the standard deviation "
        "over seeds (no ± with one seed). Scores are over organ-present slices, as in the paper; an empty "
        "prediction scores Dice 0 and HD the image diagonal. HD and HD95 are in pixels of the "
        f"{spec.prep.size}x{spec.prep.size} slices (mm versions, where spacing is known, are in results.csv). "
        "Bold: the best value per column, the oracle excluded.",
        "",
        *table,
        "",
        "The oracle row prompts SAM with each slice's ground-truth box: a ceiling for prompt quality, "
        "not a method anyone can run. SAM-PP rows prompt with the whole image."
        + ("" if "nnunet-full" in spec.methods else
           " nnU-Net is not part of this grid (add `--methods ...,nnunet-full`; see docs/results.md)."),
        "",
        "![per-slice Dice](dice_boxplot.png)",
        "",
        "Qualitative: the same test slices (rows) across methods (first seed), ground truth green, "
        "prediction red, Dice in the corner.",
        "",
        "![qualitative](qualitative.png)",
        "",
    ]
    if (out / "cam.png").is_file() and "not drawn" not in notes.get("cam.png", ""):
        lines += [f"SAM-Mix's GradCAM and the prompt box it makes, on those slices ({notes['cam.png']}).", "",
                  "![CAM](cam.png)", ""]
    else:
        lines += [f"cam.png {notes.get('cam.png', 'not drawn')}.", ""]
    lines += _diagnosis_table(cells, test_sets, evals)
    if failed:
        lines += ["## Failed cells", "", "| cell | error |", "|---|---|"]
        for s in failed:
            err = str(s.get("error", "")).replace("|", "\\|")
            lines.append(f"| {s['cell']} | {err} (traceback: runs/{s['cell']}/error.txt) |")
        lines.append("")
    lines += ["## Time per cell", "", "| cell | training | train s | " +
              " | ".join(f"eval s {ts.name}" for ts in test_sets) + " |",
              "|---|---|---|" + "---|" * len(test_sets)]
    for c in cells:
        s = by_name.get(c.name, {})
        ev = s.get("eval_seconds") or {}
        lines.append(f"| {c.name} | {s.get('training', s.get('status', ''))} | "
                     f"{s.get('train_seconds', 0) or 0:.0f} | " +
                     " | ".join(f"{ev[ts.name]:.0f}" if ts.name in ev else "–" for ts in test_sets) + " |")
    lines += ["", "Reused cells show the training time recorded when they were trained.", "",
              "## The paper's numbers, for reference", "",
              "Ward & Imran, ISBI 2025 (LiTS in-domain; 20 TotalSegmentator CTs cross-domain), per-slice:", "",
              "| model | Dice LiTS | HD LiTS | Dice TotalSeg | HD TotalSeg |", "|---|---|---|---|---|",
              *[f"| {m} | {a} | {b} | {c} | {d} |" for m, a, b, c, d in PAPER], "",
              f"Methods of this grid: " + "; ".join(f"`{m}` = {METHODS[m].label}" for m in spec.methods) + ".", ""]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return path
