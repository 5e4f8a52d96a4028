"""Slices held in memory for training: the prepared caches of one or more sources, joined."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sammix.config import PrepConfig
from sammix.data.cache import prepare_dataset


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
            spacing=arr["spacing"].astype(np.float32),
        ))
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.concat(part)
    return joined
