"""Dataset layouts on disk -> case records -> (image, binary organ mask).

Layouts: "lits" (volume-N / segmentation-N), "msd" (imagesTr/, labelsTr/, dataset.json),
"totalseg" (<case>/ct.nii.gz + <case>/segmentations/<organ>.nii.gz, or one such case folder),
"slices" (images/<case>_<slice>.png + optional masks/ with the same names), "pairs" (X.nii.gz +
X_label/_seg/_mask.nii.gz, or images/ + labels/; a folder of volumes without any label file is
image-only), and "dicom" (DICOM series folders, unlabelled).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sammix.data.io import (IMAGE2D_SUFFIXES, NIFTI_SUFFIXES, VOLUME_SUFFIXES, Volume, _dicom_files,
                            _suffix, read_image2d, read_volume)
from sammix.errors import InputError

LABEL_SUFFIXES = ("_label", "_labels", "_seg", "_segmentation", "_mask", "_gt")
TUMOUR_NAMES = ("tumour", "tumor", "cancer", "lesion", "metastasis")
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")


@dataclass
class CaseRecord:
    case_id: str
    image: Path
    label: Path | None
    layout: str
    slice_index: int | None = None


def _visible(paths) -> list[Path]:
    return sorted(p for p in paths if not p.name.startswith("."))


def _strip_suffix(name: str) -> str:
    suffix = _suffix(Path(name))
    return name[: len(name) - len(suffix)] if suffix else name


def _strip_channel(stem: str) -> str:
    """nnU-Net image names carry a channel suffix: case_0000 -> case."""
    return re.sub(r"_\d{4}$", "", stem)


def _files_with(folder: Path, suffixes) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in _visible(folder.iterdir()) if p.is_file() and _suffix(p) in suffixes]


def _ct_file(case: Path) -> Path | None:
    for name in ("ct.nii.gz", "ct.nii"):
        if (case / name).is_file():
            return case / name
    return None


def _is_totalseg_case(folder: Path) -> bool:
    return _ct_file(folder) is not None and (folder / "segmentations").is_dir()


def _lits_volumes(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):  # LiTS is often split into "Training Batch 1/2"
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files) if _LITS_VOLUME.match(f)]
    return found


def _is_label_name(name: str) -> bool:
    return _strip_suffix(name).lower().endswith(LABEL_SUFFIXES)


def _dicom_folders(root: Path) -> list[Path]:
    found = []
    for folder, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if _dicom_files(Path(folder)):
            found.append(Path(folder))
    return found


def detect_layout(root) -> str:
    """Which layout a dataset folder uses; a folder matching none raises a one-line InputError."""
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such folder")
    if not root.is_dir():
        raise InputError(root, "expected a dataset folder, got a file")
    if (root / "imagesTr").is_dir() and ((root / "labelsTr").is_dir() or (root / "dataset.json").is_file()):
        return "msd"
    if _is_totalseg_case(root) or any(_is_totalseg_case(d) for d in _visible(root.iterdir()) if d.is_dir()):
        return "totalseg"
    if _lits_volumes(root):
        return "lits"
    if _files_with(root / "images", IMAGE2D_SUFFIXES):
        return "slices"
    if _files_with(root / "images", VOLUME_SUFFIXES) and (root / "labels").is_dir():
        return "pairs"
    if any(_is_label_name(p.name) for p in _files_with(root, VOLUME_SUFFIXES)):
        return "pairs"
    if _dicom_folders(root):
        return "dicom"
    if _files_with(root, VOLUME_SUFFIXES):
        return "pairs"  # image-only volumes
    raise InputError(root, "no known dataset layout (LiTS volume-N/segmentation-N, MSD imagesTr/labelsTr, "
                           "TotalSegmentator <case>/ct.nii.gz, images/ + masks/ PNG slices, "
                           "NIfTI image/label pairs, or a DICOM series)")


def _lits_cases(root: Path, organ: str) -> list[CaseRecord]:
    if organ != "liver":
        raise InputError(root, f"LiTS labels only the liver (and its tumours), not {organ!r}")
    records = []
    for volume in _lits_volumes(root):
        number = _LITS_VOLUME.match(volume.name).group(1)
        label = next((volume.parent / f"segmentation-{number}{s}" for s in NIFTI_SUFFIXES
                      if (volume.parent / f"segmentation-{number}{s}").is_file()), None)
        if label is None:
            raise InputError(volume, f"volume without its label segmentation-{number}.nii[.gz]")
        records.append(CaseRecord(f"volume-{number}", volume, label, "lits"))
    return records


def _msd_label_values(root: Path, organ: str) -> list[int] | None:
    """Label values that make up `organ` (tumours merged in), from dataset.json; None: any > 0."""
    meta = root / "dataset.json"
    if not meta.is_file():
        return None
    try:
        labels = json.loads(meta.read_text()).get("labels")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(meta, f"cannot read dataset.json ({exc})") from None
    if not labels:
        return None
    pairs = []  # (value, name): MSD writes {"1": "liver"}, nnU-Net v2 writes {"liver": 1}
    for key, val in labels.items():
        if str(key).isdigit():
            pairs.append((int(key), str(val).lower()))
        elif isinstance(val, int):
            pairs.append((val, str(key).lower()))
    organ_values = [v for v, name in pairs if organ.lower() in name]
    if not organ_values:
        raise InputError(meta, f"no {organ!r} label (labels: {', '.join(n for _, n in pairs)})")
    return organ_values + [v for v, name in pairs if any(t in name for t in TUMOUR_NAMES)]


def _msd_cases(root: Path, organ: str) -> list[CaseRecord]:
    _msd_label_values(root, organ)  # fail early when dataset.json lacks the organ
    pairs: list[tuple[Path, Path | None]] = []
    meta = root / "dataset.json"
    training = None
    if meta.is_file():
        try:
            training = json.loads(meta.read_text()).get("training")
        except (OSError, ValueError, AttributeError) as exc:
            raise InputError(meta, f"cannot read dataset.json ({exc})") from None
    if training and isinstance(training[0], dict) and "image" in training[0]:
        for item in training:
            image = (root / item["image"]).resolve()
            label = (root / item["label"]).resolve() if item.get("label") else None
            if not image.is_file():  # nnU-Net layouts name images case_0000.nii.gz
                image = image.with_name(_strip_suffix(image.name) + "_0000" + _suffix(image))
            pairs.append((image, label if label and label.is_file() else None))
    else:
        for image in _files_with(root / "imagesTr", VOLUME_SUFFIXES):
            stem = _strip_channel(_strip_suffix(image.name))
            label = next((p for p in _files_with(root / "labelsTr", VOLUME_SUFFIXES)
                          if _strip_suffix(p.name) == stem), None)
            pairs.append((image, label))
    if not pairs:
        raise InputError(root / "imagesTr", "no training images")
    records = []
    for image, label in pairs:
        if label is None:
            raise InputError(image, "volume without its label in labelsTr/")
        records.append(CaseRecord(_strip_channel(_strip_suffix(image.name)), image, label, "msd"))
    return records


def _totalseg_cases(root: Path, organ: str) -> list[CaseRecord]:
    cases = [root] if _is_totalseg_case(root) else [d for d in _visible(root.iterdir())
                                                     if d.is_dir() and _is_totalseg_case(d)]
    records = []
    for case in cases:
        label = case / "segmentations" / f"{organ}.nii.gz"
        if not label.is_file():
            raise InputError(label, f"missing organ file: no {organ!r} segmentation for case {case.name}")
        records.append(CaseRecord(case.name, _ct_file(case), label, "totalseg"))
    return records


def _slice_cases(root: Path) -> list[CaseRecord]:
    masks = root / "masks"
    records = []
    for image in _files_with(root / "images", IMAGE2D_SUFFIXES):
        stem = _strip_suffix(image.name)
        case, index = slice_name(stem)
        label = None
        if masks.is_dir():
            label = next((masks / n for n in (image.name, stem + ".png") if (masks / n).is_file()), None)
            if label is None:
                raise InputError(image, f"slice without its mask in {masks}")
        records.append(CaseRecord(case, image, label, "slices", index))
    return records


def slice_name(stem: str) -> tuple[str, int | None]:
    """A 2D slice's file name without its suffix -> (case, slice index): `<case>_<slice>`; a name
    without a number after its last underscore is a case of its own, index None."""
    case, _, index = stem.rpartition("_")
    if not case:
        return stem, None
    return case, int(index) if index.isdigit() else None


def _pair_cases(root: Path) -> list[CaseRecord]:
    records = []
    if (root / "images").is_dir() and (root / "labels").is_dir():
        labels = {_strip_suffix(p.name): p for p in _files_with(root / "labels", VOLUME_SUFFIXES)}
        for image in _files_with(root / "images", VOLUME_SUFFIXES):
            stem = _strip_suffix(image.name)
            label = labels.get(stem) or labels.get(_strip_channel(stem))
            if label is None:
                raise InputError(image, "volume without its label in labels/")
            records.append(CaseRecord(_strip_channel(stem), image, label, "pairs"))
        return records
    files = _files_with(root, VOLUME_SUFFIXES)
    labels = {}
    for p in files:
        stem = _strip_suffix(p.name)
        for suffix in LABEL_SUFFIXES:
            if stem.lower().endswith(suffix):
                labels[stem[: -len(suffix)]] = p
                break
    for image in files:
        stem = _strip_suffix(image.name)
        if _is_label_name(image.name):
            continue
        if labels and stem not in labels:  # no label file at all: image-only volumes
            raise InputError(image, f"volume without its label ({stem}_label.nii.gz, {stem}_seg or {stem}_mask)")
        records.append(CaseRecord(stem, image, labels.get(stem), "pairs"))
    return records


def _dicom_cases(root: Path) -> list[CaseRecord]:
    records = []
    for folder in _dicom_folders(root):
        rel = folder.relative_to(root).as_posix()
        records.append(CaseRecord(root.name if rel == "." else rel.replace("/", "_"), folder, None, "dicom"))
    return records


def list_cases(root, organ: str = "liver") -> list[CaseRecord]:
    """Every usable record of a dataset folder (one per slice for "slices", else one per case)."""
    root = Path(root)
    layout = detect_layout(root)
    records = {"lits": lambda: _lits_cases(root, organ), "msd": lambda: _msd_cases(root, organ),
               "totalseg": lambda: _totalseg_cases(root, organ), "slices": lambda: _slice_cases(root),
               "pairs": lambda: _pair_cases(root), "dicom": lambda: _dicom_cases(root)}[layout]()
    if not records:
        raise InputError(root, f"no cases found in this {layout} dataset")
    return records


def _binary(label: np.ndarray, values: list[int] | None) -> np.ndarray:
    if values is None:
        return (label > 0).astype(np.uint8)
    return np.isin(np.rint(label).astype(np.int64), values).astype(np.uint8)


def _largest_shift(volume: Volume, affine: np.ndarray) -> float:
    """How far (mm) `affine` puts a voxel of `volume` from where the volume's own affine does (the
    largest over the grid, which is at a corner)."""
    corners = np.array([[*c, 1] for c in itertools.product(*[(0, n - 1) for n in volume.data.shape])], dtype=float)
    return float(np.linalg.norm(corners @ (affine - volume.affine)[:3].T, axis=1).max())


def load_case(record: CaseRecord, organ: str = "liver") -> tuple[Volume | np.ndarray, np.ndarray | None]:
    """(Volume, mask on its stored grid) or, for "slices", (2D image, 2D mask); mask uint8 0/1 or None."""
    if record.layout == "slices":
        image = read_image2d(record.image)
        if record.label is None:
            return image, None
        mask = read_image2d(record.label)
        if mask.shape != image.shape:
            raise InputError(record.label, f"mask shape {mask.shape} does not match image "
                                           f"{record.image.name} {image.shape}")
        return image, (mask > 0).astype(np.uint8)
    volume = read_volume(record.image)
    if record.label is None:
        return volume, None
    if record.layout == "totalseg" and not Path(record.label).is_file():
        raise InputError(record.label, f"missing organ file: no {organ!r} segmentation")
    label = read_volume(record.label)
    if label.data.shape != volume.data.shape:
        raise InputError(record.label, f"label shape {label.data.shape} does not match image "
                                       f"{Path(record.image).name} {volume.data.shape}")
    from nibabel.orientations import aff2axcodes

    if volume.has_spacing and label.has_spacing:
        if aff2axcodes(volume.affine) != aff2axcodes(label.affine):
            raise InputError(record.label, f"label orientation {''.join(aff2axcodes(label.affine))} differs from "
                                           f"image {Path(record.image).name} {''.join(aff2axcodes(volume.affine))}")
        shift = _largest_shift(volume, label.affine)
        if shift > 0.5 * min(volume.axial_spacing()):
            raise InputError(record.label, f"label geometry (affine) differs from image {Path(record.image).name}: "
                                           f"a voxel lies up to {shift:.2f} mm from its place in the image")
    values = _msd_label_values(Path(record.image).parent.parent, organ) if record.layout == "msd" else None
    return volume, _binary(label.data, values)
