"""`sammix suggest`: which slices to label next, written out ready to paint.

Candidates are the slices where the organ is expected: in a case that slice labels cover
(--slice-labels rows, or the z-extent of slices already painted), the slices they call present;
elsewhere, the slices the run's gate passes (without a run, every slice). Slices already labelled
(painted in the data's label volumes, or listed in --annotated-slices) are never suggested; a
folder suggest wrote can be --data again, with its annotated.csv, for the next round.

With a run, SAM answers each candidate and its doubt is the mean of the self-training checks
(`training.pseudo.answer_checks`), turned round: 1 - SAM's predicted IoU, 1 - the IoU of the CAM's
box and the box of SAM's mask, and (volumes) 1 - the Dice of the mask with the masks of its
neighbouring candidates. The picks are greedy: each comes from the cases with the
fewest picks so far (so cases are covered in turn), at least `min_gap` slices from any pick or
labelled slice of its case, and maximises doubt + spread. Spread is how much nearer the pick
brings its case's slices, summed, to their nearest pick or labelled slice in the classifier's
pooled features (facility location: a typical slice first, then the parts of the case that no
pick stands for yet, rather than the odd ones out), scaled to 1 for the best allowed slice.
Without a run the doubt is 0: spread alone.

OUT (written atomically, refused if it exists and is not empty, unless overwrite):
- suggested.csv: case,slice,rank,score,doubt,spread,sam_iou,box_iou,neighbour_dice,file
  (sorted by case and slice; rank: the order of the picks; empty where not measured);
- montage.png: the suggested slices as the model sees them, with the run's mask and CAM box;
- volumes: every case as a TotalSegmentator-layout case that `sammix train` reads as it is,
  OUT/<case>/ct.nii.gz (a link to a NIfTI input, NRRD and DICOM converted; geometry kept) and
  OUT/<case>/segmentations/<organ>.nii.gz (uint8, the CT's shape and affine: the data's own
  paint, the run's mask on the suggested slices with prefill, zero elsewhere), and
  annotated.csv: case,slice,present rows for --annotated-slices, the given ones and one per
  suggested slice with present left to fill in (1: the organ is there, 0: it is not);
- 2D slice folders: OUT/images/ (copies of the suggested slices) and an empty OUT/masks/ to paint.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.distance import cdist
from tqdm import tqdm

from sammix.config import ModelConfig, PrepConfig, resolve_device
from sammix.data.io import NIFTI_SUFFIXES, _suffix, atomic_path, check_output_folder, write_mask, write_volume
from sammix.data.layouts import detect_layout, list_cases, load_case
from sammix.data.slice_labels import CaseSlices, label_cases, read_slice_rows
from sammix.errors import InputError, SammixError
from sammix.training.pseudo import CHECKS, answer_checks, answer_doubt
from sammix.training.slices import ANNOTATED, SUGGESTED, SliceSet, check_suggested, load_sources

COLUMNS = ["case", "slice", "rank", "score", "doubt", "spread", "sam_iou", "box_iou", "neighbour_dice", "file"]
BATCH = 8


def pick(case, z, features, doubt, n: int, min_gap: int, labelled=None) -> tuple[list[int], list[float]]:
    """Greedy picks among slices (case, z, features (N,F), doubt (N,)): up to n indices and the
    spread of each when picked. `labelled` (N,) bool: slices labelled already, never picked, that
    count as picks (they cover their case and keep picks `min_gap` away)."""
    case, z, doubt = np.asarray(case), np.asarray(z), np.asarray(doubt, dtype=np.float64)
    labelled = np.zeros(len(z), bool) if labelled is None else np.asarray(labelled, bool)
    f = np.asarray(features, dtype=np.float64)
    f = (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-6)
    cover = {}  # case -> its slices, their distances, each one's distance to the nearest pick
    for c in np.unique(case):
        idx = np.flatnonzero(case == c)
        dist = cdist(f[idx], f[idx])
        nearest = dist[labelled[idx]].min(axis=0) if labelled[idx].any() else np.full(len(idx), dist.max())
        cover[c] = idx, dist, nearest
    free = ~labelled
    for i in np.flatnonzero(labelled):
        free &= ~((case == case[i]) & (np.abs(z - z[i]) < min_gap))
    count = {c: 0 for c in cover}
    chosen, spread = [], []
    while len(chosen) < n and free.any():
        fewest = min(count[c] for c in case[free])
        gain = np.zeros(len(z))
        for c in {c for c in case[free] if count[c] == fewest}:
            idx, dist, nearest = cover[c]
            gain[idx] = np.clip(nearest[None] - dist, 0, None).sum(axis=1)  # how much nearer it brings its case
        allowed = free & np.isin(case, [c for c in cover if count[c] == fewest])
        scaled = gain / max(float(gain[allowed].max()), 1e-12)
        i = int(np.argmax(np.where(allowed, doubt + scaled, -np.inf)))
        chosen.append(i)
        spread.append(float(scaled[i]))
        count[case[i]] += 1
        free &= ~((case == case[i]) & (np.abs(z - z[i]) < min_gap))
        idx, dist, nearest = cover[case[i]]
        cover[case[i]] = idx, dist, np.minimum(nearest, dist[np.flatnonzero(idx == i)[0]])
    return chosen, spread


def _check_out(out: Path, data: list[Path], overwrite: bool) -> None:
    """OUT may not overlap an input, nor hold anything unless overwrite; it must be writable."""
    for root in data:
        a, b = out.resolve(), root.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise InputError(out, f"overlaps the input {root}; write the suggestions elsewhere")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(out, "exists and is not empty (painted labels there?); choose a new folder or --overwrite")
    check_output_folder(out)


class _Sources:
    """The --data folders: their slices in memory, each case's plain name and records."""

    def __init__(self, roots: list[Path], prep: PrepConfig, cache_dir):
        layouts = {detect_layout(root) for root in roots}
        if "slices" in layouts and len(layouts) > 1:
            raise SammixError("suggest takes volumes or 2D slice folders, not both at once")
        self.flat = layouts == {"slices"}
        self.slices: SliceSet = load_sources(roots, prep, cache_dir, masks=True)
        self.name = np.array([c.rpartition("/")[2] for c in self.slices.case])  # without the folder
        self.records: dict = {}  # volumes: name -> record; slices: (name, slice) -> record
        for root in roots:
            for rec in list_cases(root, prep.organ):
                key = (rec.case_id, rec.slice_index) if self.flat else rec.case_id
                if key in self.records:
                    raise InputError(root, f"case {rec.case_id} is in another --data folder too; "
                                           "suggest needs each case once")
                self.records[key] = rec
        unnumbered = [rec for key, rec in self.records.items() if self.flat and key[1] is None]
        if unnumbered:
            raise InputError(unnumbered[0].image, "no slice number in the file name (<case>_<slice>.png)")


def _known(src: _Sources, rows, looked) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Per slice: what rows and paint say (1 organ, 0 none, -1 unknown) and whether it is
    labelled; and the looked-at rows by the cases' names without their folder."""
    s = src.slices
    labelled = s.has_mask & ((s.labels > 0) | (s.depth == 0))  # painted, or a 2D slice's whole mask
    cases = {}
    for name in np.unique(s.case):
        idx = s.indices_for([name])
        case = cases[name] = CaseSlices(str(name), s.slice_index[idx].tolist(), int(s.depth[idx[0]]) or None)
        for i in idx[labelled[idx]]:
            case.set(int(s.slice_index[i]), bool(s.labels[i]))
    label_cases(list(cases.values()), rows, looked)
    given = [{"case": r.case.rpartition("/")[2], "slice": r.first, "present": int(r.present)} for r in looked]
    looked_at = {(r["case"], r["slice"]) for r in given}
    verdict = [cases[c].present.get(int(z)) for c, z in zip(s.case, s.slice_index)]
    expected = np.array([-1 if v is None else int(v) for v in verdict], dtype=np.int8)
    labelled |= np.array([(c, int(z)) in looked_at for c, z in zip(src.name, s.slice_index)], dtype=bool)
    return expected, labelled, given


def _unit(images: np.ndarray) -> torch.Tensor:
    """Cached uint8 slices (B,S,S) -> model input (B,1,S,S) in [0, 1]."""
    return torch.from_numpy(images).float()[:, None] / 255.0


@torch.no_grad()
def _features(classifier, x: torch.Tensor) -> np.ndarray:
    """The classifier backbone's feature map averaged over the slice: (B, C)."""
    return classifier.features(x.to(next(classifier.parameters()).device)).mean(dim=(2, 3)).cpu().numpy()


def _mask(found: dict, j: int) -> np.ndarray:
    """SAM's mask (S,S) bool of the j-th measured slice."""
    packed = found["masks"][j]
    return np.unpackbits(packed, axis=-1, count=packed.shape[0]).astype(bool)


def _measure(src: _Sources, wanted: np.ndarray, model, classifier) -> dict:
    """Classifier features of the candidates; with a model, SAM's answer and its three doubts."""
    from sammix.models.inferer import SliceInferer

    s = src.slices
    inferer = SliceInferer(model) if model is not None else None
    out = {"index": [], "features": [], "masks": [], "sam_iou": [], "boxes": []}
    todo = np.flatnonzero(wanted != 0)
    bar = tqdm(total=len(todo), desc="suggest", unit="slice", file=sys.stderr)
    for start in range(0, len(todo), BATCH):
        idx = todo[start:start + BATCH]
        x = _unit(s.images[idx])
        if inferer is not None:
            _, present, cams = inferer.gate(x)
            keep = (wanted[idx] == 1) | present.numpy()
            idx, x = idx[keep], x[keep]
            if len(idx):
                logits, scores, boxes = inferer.segment(x, None if cams is None else cams[keep])
                out["masks"] += list(np.packbits(logits.numpy() > 0, axis=-1))  # 1 bit a pixel: many slices
                out["sam_iou"] += scores.clamp(0, 1).tolist()
                out["boxes"] += list(boxes.numpy())
        if len(idx):
            out["features"] += list(_features(classifier, x))
            out["index"] += idx.tolist()
        bar.update(len(todo[start:start + BATCH]))
    bar.close()
    result = {k: np.array(v) for k, v in out.items()}
    result["index"] = result["index"].astype(int)
    if model is None:
        return result
    i = result["index"]
    checks = answer_checks(lambda j: _mask(result, j), result["sam_iou"], result["boxes"], s.case[i],
                           s.slice_index[i], s.depth[i])
    return {**result, **checks}


def suggest(data, out, n: int, run=None, prep: PrepConfig | None = None, slice_labels=None,
            annotated_slices=None, min_gap: int = 5, prefill: bool = False, overwrite: bool = False,
            cache_dir=None, device: str = "auto") -> list[dict]:
    """Pick up to n slices of `data` to label next and write them out in `out` (see the module
    doc); returns the rows of suggested.csv."""
    data, out = [Path(d) for d in data], Path(out)
    if n < 1:
        raise SammixError(f"-n must be at least 1, got {n}")
    if min_gap < 1:
        raise SammixError(f"--min-gap must be at least 1, got {min_gap}")
    if prefill and run is None:
        raise SammixError("--prefill needs --run (the masks to prefill come from a trained run)")
    rows = read_slice_rows(slice_labels) if slice_labels else []
    looked = read_slice_rows(annotated_slices) if annotated_slices else []
    for row in looked:
        if row.present is None:
            raise row.error("--annotated-slices lists single slices (case,slice,present), not ranges")
    _check_out(out, data, overwrite)

    model = None
    if run is not None:
        from sammix.models.sammix import SamMix

        model = SamMix.load(run, device)
        prep = model.prep
    prep = prep or PrepConfig()
    src = _Sources(data, prep, cache_dir)
    check_suggested(data, src.slices, looked if annotated_slices else None)
    if prefill and src.flat:
        raise SammixError("--prefill fills label volumes: 2D slices get an empty masks/ folder to draw in")
    expected, labelled, given = _known(src, rows, looked)
    # 1: a candidate; -1: a candidate if the run's gate passes it; 0: none
    wanted = np.where(expected == -1, -1 if model is not None else 1, expected)
    wanted[labelled] = 0
    if model is not None:
        classifier = model.classifier
    else:
        from sammix.models.classifier import build_classifier

        classifier = build_classifier(ModelConfig()).to(resolve_device(device)).eval()
    found = _measure(src, wanted, model, classifier)
    index = found["index"]
    if not len(index):
        raise SammixError(f"{', '.join(map(str, data))}: no slice to suggest (every candidate is labelled, "
                          "or the run's gate passes none and no --slice-labels say where the organ is)")
    measured = list(CHECKS) if model is not None else []
    doubt = answer_doubt(found) if measured else np.zeros(len(index))
    seen = np.flatnonzero(labelled)  # count as picks: their features too
    features = [found["features"], *(_features(classifier, _unit(src.slices.images[seen[i:i + BATCH]]))
                                     for i in range(0, len(seen), BATCH))]
    points = np.concatenate([index, seen])
    chosen, spread = pick(src.name[points], src.slices.slice_index[points], np.concatenate(features),
                          np.concatenate([doubt, np.zeros(len(seen))]), n, min_gap,
                          np.arange(len(points)) >= len(index))
    if len(chosen) < n:
        print(f"note: {len(chosen)} slice{'s' * (len(chosen) != 1)} suggested, not {n}: no other candidate is "
              f"{min_gap} slices from a pick or a labelled slice of its case (--min-gap)", file=sys.stderr)

    table = []
    for rank, (j, gap) in enumerate(zip(chosen, spread), start=1):
        i = index[j]
        name, z = str(src.name[i]), int(src.slices.slice_index[i])
        row = {"case": name, "slice": z, "rank": rank, "score": doubt[j] + gap, "doubt": doubt[j], "spread": gap,
               **{k: found[k][j] for k in measured},
               "file": f"{name}/ct.nii.gz" if not src.flat else f"images/{src.records[name, z].image.name}"}
        table.append({k: "" if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()})
    table.sort(key=lambda r: (r["case"], r["slice"]))
    picked = {(r["case"], r["slice"]): chosen[r["rank"] - 1] for r in table}
    _write_csv(out / SUGGESTED, COLUMNS, [{k: _text(r.get(k, "")) for k in COLUMNS} for r in table])
    _montage(src, found, picked, out / "montage.png", model is not None)
    if src.flat:
        _write_slices(src, table, out)
    else:
        _write_volumes(src, found, picked if prefill else {}, prep.organ, out)
        new = [{"case": r["case"], "slice": r["slice"], "present": ""} for r in table]
        _write_csv(out / ANNOTATED, ["case", "slice", "present"],
                   sorted(given + new, key=lambda r: (r["case"], r["slice"])))
    cases = len({r["case"] for r in table})
    todo = "draw their masks in masks/" if src.flat else \
        f"paint <case>/segmentations/{prep.organ}.nii.gz, fill in present in {ANNOTATED}"
    print(f"{len(table)} slices of {cases} case{'s' * (cases != 1)} to label -> {out} "
          f"({SUGGESTED}, montage.png; {todo})")
    return table


def _text(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            writer.writerows(rows)


def _montage(src: _Sources, found: dict, picked: dict, path: Path, with_run: bool) -> None:
    from sammix.viz import overlay_montage

    order = list(picked.values())
    rows = found["index"][order]
    titles = [f"{case} z{z}" for case, z in picked]
    masks = [_mask(found, j) for j in order] if with_run else None
    boxes = found["boxes"][order] if with_run else None
    overlay_montage(src.slices.images[rows], None, path, pred=masks, titles=titles, max_panels=len(rows),
                    panel_px=192, columns=min(len(rows), 6), boxes=boxes)


def _write_slices(src: _Sources, table: list[dict], out: Path) -> None:
    (out / "masks").mkdir(exist_ok=True)
    for row in table:
        with atomic_path(out / row["file"]) as tmp:
            shutil.copyfile(src.records[row["case"], row["slice"]].image, tmp)


def _write_volumes(src: _Sources, found: dict, prefill: dict, organ: str, out: Path) -> None:
    from sammix.inference.geometry import logits_to_native

    for name in tqdm(sorted(set(src.name)), desc="write", unit="case", file=sys.stderr):
        record = src.records[name]
        volume, mask = load_case(record, organ)
        case = out / name
        image = Path(record.image)
        if image.is_file() and _suffix(image) in NIFTI_SUFFIXES:  # the input itself, linked
            with atomic_path(case / f"ct{_suffix(image)}") as tmp:
                tmp.symlink_to(image.resolve())
        else:
            write_volume(volume, case / "ct.nii.gz")
        axial = volume.to_axial(mask) if mask is not None else np.zeros(volume.axial_shape(), np.uint8)
        for (c, z), j in prefill.items():
            if c == name:
                soft = torch.from_numpy(_mask(found, j) * 2.0 - 1.0).float()[None]  # resized smoothly
                axial[z] = logits_to_native(soft, axial.shape[1:], volume.in_plane_spacing())[0]
        write_mask(volume.from_axial(axial), volume, case / "segmentations" / f"{organ}.nii.gz")
