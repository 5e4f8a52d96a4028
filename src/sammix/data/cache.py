"""`sammix prepare`: a dataset folder -> an HDF5 cache of model-ready axial slices.

One file per (input files, PrepConfig), named by a hash of both, so re-running on unchanged data
reuses it. Datasets (N = slices, S = PrepConfig.size): images (N,S,S) uint8 (each slice padded to a
square field of view, then resized: `preprocess.to_square`), masks (N,S,S) uint8
0/1, labels (N,) uint8 organ present (meaningful only where has_mask), has_mask (N,) bool, case
(N,) str, slice_index (N,) int32 (axial index, slice 0 most inferior; for 2D slices the number in
the file name), depth (N,) int32 axial slices of the slice's whole volume (0 for 2D slices:
unknown), spacing (N,2) float32 mm per resized pixel (rows, cols; NaN unknown).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from sammix.config import PrepConfig
from sammix.data.io import atomic_path
from sammix.data.layouts import CaseRecord, detect_layout, list_cases, load_case
from sammix.data.preprocess import (middle_slices, resize_image, resize_mask, resized_spacing, slice_to_unit,
                                    square_shape, to_square, to_uint8, volume_to_unit)
from sammix.errors import InputError

CACHE_VERSION = 3  # bump when the cache contents change for the same inputs


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAMMIX_CACHE") or Path.home() / ".cache" / "sammix")


def _input_files(records: list[CaseRecord]) -> list[Path]:
    files = []
    for rec in records:
        for path in (rec.image, rec.label):
            if path is None:
                continue
            path = Path(path)
            files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return files


def cache_key(records: list[CaseRecord], prep: PrepConfig) -> str:
    """Hash of every input file (resolved path, size, mtime) and the preparation settings."""
    digest = hashlib.sha256(f"sammix-cache-v{CACHE_VERSION}".encode())
    digest.update(json.dumps(dataclasses.asdict(prep), sort_keys=True).encode())
    for path in _input_files(records):
        st = path.stat()
        digest.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _slices_of_volume(rec: CaseRecord, prep: PrepConfig):
    """Yield (image uint8, mask uint8 | None, slice index, depth, spacing) for one volume case."""
    volume, mask = load_case(rec, prep.organ)
    hu = volume.axial()
    mask_ax = volume.to_axial(mask) if mask is not None else None
    in_plane = volume.in_plane_spacing()
    for z in middle_slices(len(hu), prep.middle_fraction):
        image = to_uint8(resize_image(to_square(volume_to_unit(hu[z], prep.window), in_plane), prep.size))
        m = resize_mask(to_square(mask_ax[z], in_plane), prep.size) if mask_ax is not None else None
        yield image, m, z, len(hu), resized_spacing(in_plane, square_shape(hu.shape[1:], in_plane), prep.size)


def _slices_of_images(recs: list[CaseRecord], prep: PrepConfig):
    """Yield the same for the 2D slice records of one case (8-bit images used as they are)."""
    for position, rec in enumerate(recs):
        image, mask = load_case(rec, prep.organ)
        unit = slice_to_unit(image, prep.window)
        m = resize_mask(to_square(mask), prep.size) if mask is not None else None
        index = rec.slice_index if rec.slice_index is not None else position
        yield to_uint8(resize_image(to_square(unit), prep.size)), m, index, 0, (float("nan"), float("nan"))


class _Writer:
    """Appends slices to growable, per-slice-chunked HDF5 datasets."""

    def __init__(self, h5, size: int):
        import h5py

        self.n = 0
        chunk = (1, size, size)
        opts = dict(chunks=chunk, compression="lzf", shuffle=False)
        self.images = h5.create_dataset("images", (0, size, size), np.uint8, maxshape=(None, size, size), **opts)
        self.masks = h5.create_dataset("masks", (0, size, size), np.uint8, maxshape=(None, size, size), **opts)
        self.rows = {"labels": [], "has_mask": [], "case": [], "slice_index": [], "depth": [], "spacing": []}
        self.h5, self.size, self._str = h5, size, h5py.string_dtype()

    def add(self, case: str, image, mask, index: int, depth: int, spacing) -> None:
        for ds in (self.images, self.masks):
            ds.resize(self.n + 1, axis=0)
        self.images[self.n] = image
        self.masks[self.n] = mask if mask is not None else 0
        self.rows["labels"].append(bool(mask is not None and mask.any()))
        self.rows["has_mask"].append(mask is not None)
        self.rows["case"].append(case)
        self.rows["slice_index"].append(int(index))
        self.rows["depth"].append(int(depth))
        self.rows["spacing"].append(spacing)
        self.n += 1

    def finish(self) -> None:
        r = self.rows
        self.h5.create_dataset("labels", data=np.array(r["labels"], dtype=np.uint8).reshape(-1))
        self.h5.create_dataset("has_mask", data=np.array(r["has_mask"], dtype=bool).reshape(-1))
        self.h5.create_dataset("case", data=np.array(r["case"], dtype=object).reshape(-1), dtype=self._str)
        self.h5.create_dataset("slice_index", data=np.array(r["slice_index"], dtype=np.int32).reshape(-1))
        self.h5.create_dataset("depth", data=np.array(r["depth"], dtype=np.int32).reshape(-1))
        self.h5.create_dataset("spacing", data=np.array(r["spacing"], dtype=np.float32).reshape(-1, 2))


def prepare_dataset(root, prep: PrepConfig | None = None, cache_dir=None, progress: bool = True) -> "SliceCache":
    """Build (or reuse) the slice cache of a dataset folder and return it."""
    import h5py
    from tqdm import tqdm

    prep = prep or PrepConfig()
    if prep.size < 8:
        raise InputError(root, f"slice size {prep.size} is too small")
    root = Path(root)
    layout = detect_layout(root)
    records = list_cases(root, prep.organ)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{root.resolve().name or 'data'}-{layout}-{cache_key(records, prep)}.h5"
    if path.is_file():
        return SliceCache(path)

    groups: dict[str, list[CaseRecord]] = {}
    for rec in records:
        groups.setdefault(rec.case_id, []).append(rec)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
            writer = _Writer(h5, prep.size)
            bar = tqdm(groups.items(), desc=f"prepare {root.name}", unit="case", disable=not progress,
                       file=sys.stderr)
            for case, recs in bar:
                slices = _slices_of_images(recs, prep) if layout == "slices" else _slices_of_volume(recs[0], prep)
                for row in slices:
                    writer.add(case, *row)
            writer.finish()
            h5.attrs.update(source_root=str(root.resolve()), layout=layout, version=CACHE_VERSION,
                            prep=json.dumps(dataclasses.asdict(prep)), n_cases=len(groups))
    except PermissionError as exc:
        raise InputError(cache_dir, f"cannot write the slice cache here ({exc.strerror}); use --cache-dir") from None
    return SliceCache(path)


class SliceCache:
    """Lazy reader of a slice cache: per-slice arrays read on demand, small columns kept in memory."""

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as h5:
                self.labels = h5["labels"][:]
                self.has_mask = h5["has_mask"][:]
                self.case = h5["case"].asstr()[:].astype(str)
                self.slice_index = h5["slice_index"][:]
                self.depth = h5["depth"][:]
                self.spacing = h5["spacing"][:]
                self.attrs = dict(h5.attrs)
        except (OSError, KeyError) as exc:
            raise InputError(self.path, f"not a readable sammix slice cache ({exc})") from None
        self.layout = str(self.attrs.get("layout", ""))
        self.source_root = str(self.attrs.get("source_root", ""))
        self.prep = PrepConfig(**_prep_from_json(self.attrs.get("prep", "{}")))
        self._h5 = None
        self._pid = None

    def _file(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():  # h5py handles must not cross a fork
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image(i), "mask": self.mask(i), "label": int(self.labels[i]),
                "has_mask": bool(self.has_mask[i]), "case": str(self.case[i]),
                "slice_index": int(self.slice_index[i]), "spacing": self.spacing[i]}

    def load(self) -> dict[str, np.ndarray]:
        """Every dataset in memory: images, masks, labels, has_mask, case, slice_index, depth, spacing."""
        f = self._file()
        return {"images": f["images"][:], "masks": f["masks"][:], "labels": self.labels.copy(),
                "has_mask": self.has_mask.copy(), "case": self.case.copy(),
                "slice_index": self.slice_index.copy(), "depth": self.depth.copy(), "spacing": self.spacing.copy()}

    def image(self, i: int) -> np.ndarray:
        """(S, S) uint8 image of slice i (divide by 255 for the model input)."""
        return self._file()["images"][int(i)]

    def mask(self, i: int) -> np.ndarray:
        """(S, S) uint8 0/1 mask of slice i (all zero where has_mask is False)."""
        return self._file()["masks"][int(i)]

    def images(self, indices) -> np.ndarray:
        return self._batch("images", indices)

    def masks(self, indices) -> np.ndarray:
        return self._batch("masks", indices)

    def _batch(self, name: str, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices)
        unique, inverse = np.unique(indices[order], return_inverse=True)  # h5py wants increasing indices
        out = self._file()[name][unique] if len(unique) else np.zeros((0, *self._file()[name].shape[1:]), np.uint8)
        result = np.empty((len(indices), *out.shape[1:]), dtype=out.dtype)
        result[order] = out[inverse]
        return result

    def cases(self) -> list[str]:
        return sorted(set(self.case.tolist()))

    def indices_for_cases(self, cases) -> np.ndarray:
        return np.flatnonzero(np.isin(self.case, list(cases)))

    def summary(self) -> str:
        labelled = int(self.has_mask.sum())
        organ = self.prep.organ
        present = int(self.labels[self.has_mask].sum())
        mask_text = (f"{present} with {organ} and {labelled - present} without" if labelled
                     else f"no masks (unlabelled: {organ} presence unknown)")
        if 0 < labelled < len(self):
            mask_text += f"; {len(self) - labelled} unlabelled"
        n_cases = len(self.cases())
        return (f"{len(self)} slices from {n_cases} case{'s' if n_cases != 1 else ''} "
                f"({self.layout} layout at {self.source_root}): "
                f"{mask_text}; {self.prep.size}x{self.prep.size} px; cache {self.path}")

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable for DataLoader workers: reopen in the worker
        state = self.__dict__.copy()
        state["_h5"] = None
        return state


def _prep_from_json(text) -> dict:
    raw = json.loads(text)
    if raw.get("window") is not None:
        raw["window"] = tuple(raw["window"])
    return raw
