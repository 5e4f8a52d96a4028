"""Slices held in memory for training: the prepared caches of one or more sources, joined, and
their slice labels (from masks, sparse masks and slice-label files)."""

from __future__ import annotations

import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sammix.config import PrepConfig, RunConfig
from sammix.data.cache import prepare_dataset
from sammix.data.slice_labels import CaseSlices, SliceRow, label_cases, read_slice_rows
from sammix.errors import InputError

# what `sammix suggest` writes beside its label volumes: the slices it asked for, and the
# looked-at rows to fill in (the --annotated-slices file)
SUGGESTED, ANNOTATED = "suggested.csv", "annotated.csv"


@dataclass
class SliceSet:
    images: np.ndarray  # (N,S,S) uint8
    masks: np.ndarray  # (N,S,S) uint8 0/1
    labels: np.ndarray  # (N,) uint8 organ present
    has_mask: np.ndarray  # (N,) bool
    case: np.ndarray  # (N,) str, "<source>/<case>" when several sources are joined
    slice_index: np.ndarray  # (N,) int
    source: np.ndarray  # (N,) int, which source each slice came from
    spacing: np.ndarray  # (N,2) mm of a resized pixel (rows, cols); NaN where unknown
    depth: np.ndarray  # (N,) int, slices of the slice's volume (0: unknown, 2D slices)
    known: np.ndarray  # (N,) bool, the label is known (from a mask or a slice-label row)

    def __len__(self) -> int:
        return len(self.labels)

    def indices_for(self, cases) -> np.ndarray:
        return np.flatnonzero(np.isin(self.case, list(cases)))

    def subset(self, idx) -> "SliceSet":
        return SliceSet(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def concat(self, other: "SliceSet") -> "SliceSet":
        other_source = other.source + (self.source.max() + 1 if len(self) else 0)
        parts = {f: np.concatenate([getattr(self, f), getattr(other, f)]) for f in self.__dataclass_fields__}
        parts["source"] = np.concatenate([self.source, other_source])
        return SliceSet(**parts)


def load_sources(roots, prep: PrepConfig, cache_dir: Path | None, masks: bool) -> SliceSet:
    """Prepare (or reuse) each source's slice cache and load it into memory."""
    parts = []
    for root in roots:
        cache = prepare_dataset(Path(root), prep, cache_dir=cache_dir, progress=True)
        arr = cache.load()
        prefix = f"{Path(root).name}/" if len(roots) > 1 else ""
        parts.append(SliceSet(
            images=arr["images"], masks=arr["masks"], labels=arr["labels"],
            has_mask=arr["has_mask"] & masks,
            case=np.array([prefix + str(c) for c in arr["case"]]),
            slice_index=arr["slice_index"].astype(int), source=np.zeros(len(arr["labels"]), dtype=int),
            spacing=arr["spacing"].astype(np.float32), depth=arr["depth"].astype(int), known=arr["has_mask"],
        ))
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.concat(part)
    return joined


def apply_slice_labels(parts: list[SliceSet], rows: list[SliceRow],
                       annotated: list[SliceRow] | None = None) -> list[SliceSet]:
    """The parts with the slice labels of `rows` (data/slice_labels.py) applied over their masks.

    With `annotated` (the looked-at slices, `case,slice,present` rows) the label volumes are sparse
    annotations: a painted slice, or one `annotated` finds organ-free, keeps its mask; any other
    slice has no mask and takes its label from the rows or the painted z-extent. Slices whose
    label stays unknown get `known` False, and a warning says that training leaves them out."""
    sparse = annotated is not None
    cases = {}
    for p, part in enumerate(parts):
        for name in np.unique(part.case):
            idx = part.indices_for([name])
            depth = int(part.depth[idx[0]]) or None
            case = cases[p, name] = CaseSlices(str(name), part.slice_index[idx].tolist(), depth)
            for i in idx[part.known[idx] & ((part.labels[idx] > 0) | (not sparse))]:
                case.set(int(part.slice_index[i]), bool(part.labels[i]))
    label_cases(list(cases.values()), rows, annotated or [])
    out = []
    for p, part in enumerate(parts):
        per_slice = [(cases[p, name], int(z)) for name, z in zip(part.case, part.slice_index)]
        verdict = [case.present.get(z) for case, z in per_slice]
        looked = np.array([z in case.looked_empty for case, z in per_slice], dtype=bool)
        painted = part.known & (part.labels > 0)
        out.append(dataclasses.replace(
            part, labels=np.array([bool(v) for v in verdict], dtype=np.uint8),
            known=np.array([v is not None for v in verdict], dtype=bool),
            has_mask=part.has_mask & (painted | looked) if sparse else part.has_mask))
    unknown = np.concatenate([part.case[~part.known] for part in out])
    if len(unknown):
        n_cases = len(set(unknown))
        print(f"warning: {len(unknown)} slices of {n_cases} case{'s' * (n_cases != 1)} have no mask and no slice "
              "label (--slice-labels): only self-training (train.self_train_rounds) uses them", file=sys.stderr)
    return out


def load_training_sources(cfg: RunConfig, cache_dir: Path | None) -> tuple[SliceSet, SliceSet | None]:
    """A run's --data and --cls-only-data (None when it has none) with its slice labels applied."""
    parts = [load_sources(cfg.data, cfg.prep, cache_dir, masks=True)]
    if cfg.cls_only_data:
        parts.append(load_sources(cfg.cls_only_data, cfg.prep, cache_dir, masks=False))
    rows = read_slice_rows(cfg.slice_labels) if cfg.slice_labels else []
    annotated = read_slice_rows(cfg.annotated_slices) if cfg.annotated_slices else None
    check_suggested(cfg.data, parts[0], annotated)
    data, *cls_only = apply_slice_labels(parts, rows, annotated)
    return data, (cls_only[0] if cls_only else None)


def check_suggested(roots, data: SliceSet, annotated: list[SliceRow] | None) -> None:
    """Folders `sammix suggest` wrote hold label volumes painted on some slices only: they need
    --annotated-slices (to train, and to suggest again). Painted slices it did not suggest, and no
    looked-at row lists, are labelled slices too; a note says which."""
    looked = {(r.case.rpartition("/")[2], r.first) for r in annotated or []}
    for s, root in enumerate(roots):
        path = Path(root) / SUGGESTED
        if not path.is_file() or not (Path(root) / ANNOTATED).is_file():
            continue
        if annotated is None:
            raise InputError(root, "its label volumes are painted on the suggested slices only: give "
                                   f"--annotated-slices {Path(root) / ANNOTATED}")
        with open(path, newline="", encoding="utf-8") as fh:
            asked = {(row["case"], int(row["slice"])) for row in csv.DictReader(fh)}
        idx = np.flatnonzero((data.source == s) & data.has_mask & (data.labels > 0))
        painted = {(str(c).rpartition("/")[2], int(z)) for c, z in zip(data.case[idx], data.slice_index[idx])}
        extra = sorted(painted - asked - looked)
        if extra:
            shown = ", ".join(f"{c} {z}" for c, z in extra[:5]) + (", ..." if len(extra) > 5 else "")
            print(f"note: {root}: {len(extra)} painted slice{'s' * (len(extra) != 1)} that suggest did not ask for "
                  f"({shown}): labelled slices too", file=sys.stderr)
