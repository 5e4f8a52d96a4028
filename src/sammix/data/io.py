"""Reading and writing images with their geometry kept (NIfTI, NRRD, DICOM series, PNG/JPG).

A `Volume` keeps the voxels exactly as stored and the voxel -> world (RAS+, mm) affine. Models see
`Volume.axial()`, the slices in radiological display orientation; `from_axial` maps an array in
that orientation back onto the stored grid, so a mask written with `write_mask` lines up voxel for
voxel with the scan it came from.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

from sammix.errors import InputError, one_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES
IMAGE2D_SUFFIXES = (".png", ".jpg", ".jpeg")
# stored value -> Hounsfield units; a CT series without them is an error (they are mandatory for CT
# and the offset, often -1024, cannot be guessed); other modalities default to slope 1, intercept 0
RESCALE_TAGS = ("RescaleSlope", "RescaleIntercept")

# Display orientation of `Volume.axial()` as nibabel axis codes (the direction each axis runs to):
# slices inferior -> superior, rows anterior -> posterior, columns patient's right -> left.
AXIAL_CODES = ("S", "P", "L")
_AXIAL_ORNT = nio.axcodes2ornt(AXIAL_CODES)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@dataclass
class Volume:
    """A 3D scan: `data` as stored (nibabel voxel order) and its voxel -> world RAS+ affine."""

    data: np.ndarray
    affine: np.ndarray
    path: Path
    has_spacing: bool = True

    @property
    def _ornt(self) -> np.ndarray:
        return nio.io_orientation(self.affine)

    def to_axial(self, arr: np.ndarray) -> np.ndarray:
        """Any array on the stored grid (e.g. a label map) -> (Z, H, W) display orientation."""
        if arr.shape[:3] != self.data.shape[:3]:
            raise ValueError(f"array shape {arr.shape} does not match the volume {self.data.shape}")
        transform = nio.ornt_transform(self._ornt, _AXIAL_ORNT)
        return np.ascontiguousarray(nio.apply_orientation(arr, transform))

    def axial(self) -> np.ndarray:
        """(Z, H, W) float32: row 0 anterior, column 0 the patient's right, slice 0 most inferior."""
        return self.to_axial(self.data).astype(np.float32, copy=False)

    def axial_shape(self) -> tuple[int, int, int]:
        order = self._stored_axis_of_world()
        return tuple(int(self.data.shape[order[w]]) for w in (2, 1, 0))

    def from_axial(self, arr: np.ndarray) -> np.ndarray:
        """Exact inverse of `to_axial`: a display-orientation array back on the stored grid."""
        if tuple(arr.shape[:3]) != self.axial_shape():
            raise ValueError(f"array shape {arr.shape} is not the axial shape {self.axial_shape()}")
        transform = nio.ornt_transform(_AXIAL_ORNT, self._ornt)
        return np.ascontiguousarray(nio.apply_orientation(arr, transform))

    def axial_spacing(self) -> tuple[float, float, float] | None:
        """(slice, row, column) spacing in mm of `axial()`, or None when the file has none."""
        if not self.has_spacing:
            return None
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        order = self._stored_axis_of_world()
        return tuple(float(zooms[order[w]]) for w in (2, 1, 0))

    def in_plane_spacing(self) -> tuple[float, float] | None:
        """(row, column) spacing in mm of each slice of `axial()`, or None when the file has none."""
        spacing = self.axial_spacing()
        return None if spacing is None else spacing[1:]

    def with_axcodes(self, codes: tuple[str, str, str]) -> "Volume":
        """The same voxels with an explicitly assumed orientation (e.g. ("L", "P", "S")), for files
        whose affine carries no geometry; spacing stays unknown. Nothing calls this implicitly."""
        affine = nio.inv_ornt_aff(nio.axcodes2ornt(tuple(codes)), self.data.shape[:3])
        return Volume(self.data, np.linalg.inv(affine), self.path, has_spacing=False)

    def _stored_axis_of_world(self) -> dict[int, int]:
        """World axis (0=x, 1=y, 2=z) -> the stored axis that runs closest to it."""
        return {int(world): stored for stored, (world, _) in enumerate(self._ornt)}


_NO_GEOMETRY_WARNED: set[Path] = set()  # each file is warned about once per process


def _checked_volume(data: np.ndarray, affine: np.ndarray, path: Path, has_spacing: bool) -> Volume:
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) is still a 3D volume
        data = data[..., 0]
    if data.ndim == 2:
        raise InputError(path, f"a 2D image (shape {data.shape}), not a 3D volume")
    if data.ndim != 3:
        raise InputError(path, f"{data.ndim}D data (shape {data.shape}), expected a 3D volume")
    if not np.isfinite(data).all():
        raise InputError(path, f"contains {int(np.count_nonzero(~np.isfinite(data)))} NaN or infinite voxels")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "invalid voxel-to-world affine (singular or not finite)")
    if np.allclose(affine, np.eye(4)):
        has_spacing = False  # an identity affine means "no geometry" (e.g. resampled crops), not 1 mm
        if path not in _NO_GEOMETRY_WARNED:
            _NO_GEOMETRY_WARNED.add(path)
            print(f"warning: {path}: no geometry in the header (identity affine); read as stored (RAS, no "
                  "spacing). If the preview shows the scan turned or mirrored, write its true orientation "
                  "into the header: the classifier knows only upright anatomy", file=sys.stderr)
    # no reordering copy (NIfTI arrays come in Fortran order): axial() makes its own contiguous copy
    return Volume(np.asarray(data, dtype=np.float32), affine, path, has_spacing)


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = img.affine
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI ({one_line(exc)})") from None
    return _checked_volume(data, affine, path, has_spacing=True)


def _read_nrrd(path: Path) -> Volume:
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:
        raise InputError(path, f"cannot read NRRD ({one_line(exc)})") from None
    data = np.asarray(data)
    if data.ndim != 3:
        return _checked_volume(data, np.eye(4), path, has_spacing=False)  # raises with the shape
    directions = header.get("space directions")
    if directions is None:
        spacings = header.get("spacings")
        if spacings is None:
            return _checked_volume(data, np.eye(4), path, has_spacing=False)
        affine = np.diag([*np.asarray(spacings, dtype=float), 1.0])
        return _checked_volume(data, affine, path, has_spacing=True)
    space = str(header.get("space", "right-anterior-superior")).lower()
    codes = {"ras": "right-anterior-superior", "lps": "left-posterior-superior",
             "las": "left-anterior-superior"}.get(space, space).split("-")
    if len(codes) != 3 or codes[0] not in ("left", "right") or codes[1] not in ("anterior", "posterior") \
            or codes[2] not in ("superior", "inferior"):
        raise InputError(path, f"unsupported NRRD space {header.get('space')!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions, dtype=float).T  # row j of 'space directions' is axis j
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    to_ras = np.diag([-1.0 if codes[0] == "left" else 1.0, -1.0 if codes[1] == "posterior" else 1.0,
                      -1.0 if codes[2] == "inferior" else 1.0, 1.0])
    return _checked_volume(data, to_ras @ affine, path, has_spacing=True)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (the 'DICM' marker after the 128-byte preamble) or a .dcm file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def _read_dicom_series(folder: Path) -> Volume:
    import pydicom

    if not any(folder.iterdir()):
        raise InputError(folder, "empty folder")
    files = _dicom_files(folder)
    if not files:
        raise InputError(folder, "no DICOM files and not a readable volume")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except Exception as exc:
            raise InputError(f, f"cannot read DICOM ({one_line(exc)})") from None
        if "PixelData" in ds:
            slices.append((f, ds))
    if not slices:
        raise InputError(folder, "no DICOM images (files without pixel data)")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if len(series) > 1:
        raise InputError(folder, f"{len(series)} DICOM series in one folder ({', '.join(series[:3])}"
                                 f"{', ...' if len(series) > 3 else ''}); put each series in its own folder")
    first_file, first = slices[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(first_file, "multi-frame DICOM is not supported; convert it to NIfTI first")
    if len(slices) < 2:
        raise InputError(folder, "a single DICOM slice, not a 3D volume")
    try:
        iop = np.array(first.ImageOrientationPatient, dtype=float)
        rows, cols = int(first.Rows), int(first.Columns)
        row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(folder, f"DICOM geometry missing ({one_line(exc)})") from None
    for f, ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols) or \
                not np.allclose(np.array(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise InputError(f, "slice size or orientation differs from the rest of the series")
        spacing = [float(v) for v in ds.get("PixelSpacing") or []]
        if len(spacing) != 2 or not np.allclose(spacing, (row_spacing, col_spacing), atol=1e-4):
            raise InputError(f, f"PixelSpacing {spacing or 'missing'} differs from the rest of the series "
                                f"({[row_spacing, col_spacing]}); resample it or convert it to NIfTI first")
        missing = [tag for tag in RESCALE_TAGS if ds.get(tag) in (None, "")]
        if missing and str(ds.get("Modality", "")).upper() == "CT":
            raise InputError(f, f"CT slice without {' and '.join(missing)} (mandatory for CT): its stored "
                                "values cannot be turned into Hounsfield units; add the tags or convert the "
                                "series to NIfTI in HU")
    row_dir, col_dir = iop[:3], iop[3:]  # IOP: direction along a row (columns grow), then down a column
    normal = np.cross(row_dir, col_dir)
    order = np.argsort(positions @ normal, kind="stable")
    gaps = np.diff((positions @ normal)[order])
    if gaps.min() < 1e-3:
        raise InputError(folder, "duplicate slice positions (two acquisitions in one series?)")
    if gaps.max() - gaps.min() > 0.1 * np.median(gaps):
        raise InputError(folder, f"non-uniform slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm); "
                                 "missing slices? resample or convert it to NIfTI first")

    planes = []
    for i in order:
        f, ds = slices[i]
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise InputError(f, f"cannot decode DICOM pixel data ({one_line(exc)})") from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(pixels * slope + intercept)
    # Stored as (column, row, slice) like dcm2niix, so voxel (i, j, k) sits at IPP_k + i*dc*row_dir + j*dr*col_dir.
    data = np.stack(planes, axis=-1).transpose(1, 0, 2)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    lps[:3, 3] = positions[order[0]]
    return _checked_volume(data, _LPS_TO_RAS @ lps, folder, has_spacing=True)


def read_volume(path) -> Volume:
    """Read a NIfTI/NRRD file or a DICOM series folder; bad input raises a one-line InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    if suffix in NRRD_SUFFIXES:
        return _read_nrrd(path)
    if suffix in IMAGE2D_SUFFIXES:
        raise InputError(path, "a 2D image, not a 3D volume")
    if is_dicom_file(path):
        raise InputError(path, "a single DICOM file; pass the folder holding the whole series")
    raise InputError(path, f"unknown file type {suffix or '(no extension)'!r}; "
                           "expected .nii, .nii.gz, .nrrd, .nhdr or a DICOM folder")


def read_image2d(path) -> np.ndarray:
    """A PNG/JPG as (H, W) grayscale: uint8 for 8-bit images (RGB converted), float32 otherwise."""
    from PIL import Image

    path = Path(path)
    if _suffix(path) not in IMAGE2D_SUFFIXES:
        raise InputError(path, f"not a PNG/JPG image ({_suffix(path) or 'no extension'})")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return np.asarray(img, dtype=np.float32)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except Exception as exc:
        raise InputError(path, f"cannot read image ({one_line(exc)})") from None


def _temp_name(name: str, tag: str) -> str:
    return f".tmp-{tag}-{name}"  # same ending: writers pick formats by it


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_temp_name(path.name, uuid.uuid4().hex[:8]))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(obj, path) -> Path:
    """`obj` as indented JSON at `path`, atomically (numpy scalars, paths and the like as strings)."""
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))
    return Path(path)


def remove_stale_temps(path) -> None:
    """Delete the temporary files of `atomic_path(path)` that a killed process left behind (call it
    only where no other process is writing `path`)."""
    path = Path(path)
    for tmp in path.parent.glob(_temp_name(glob.escape(path.name), "?" * 8)):
        tmp.unlink(missing_ok=True)


def check_output_folder(folder) -> Path:
    """Create `folder` and write a probe file in it, so that a bad output location fails in one line
    before any work (a file on the way, no permission, a read-only disk)."""
    folder = Path(folder)
    on_the_way = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if on_the_way is not None:
        raise InputError(folder, "is a file, not a folder" if on_the_way == folder
                         else f"cannot be a folder: {on_the_way} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(folder, f"cannot write to this folder ({exc.strerror or one_line(exc)})") from None
    return folder


def _input_files(volume: Volume) -> set[Path]:
    src = Path(volume.path)
    files = set(src.iterdir()) if src.is_dir() else {src}
    return {p.resolve() for p in files}


def write_mask(mask: np.ndarray, like: Volume, path) -> Path:
    """Write a mask on `like`'s stored grid as uint8 NIfTI with `like`'s affine (atomically)."""
    mask = np.asarray(mask)
    if mask.shape != like.data.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's stored shape {like.data.shape}; "
                         "map display-orientation masks with Volume.from_axial first")
    return _write_nifti(mask.astype(np.uint8), like, path)


def write_volume(volume: Volume, path) -> Path:
    """Write a volume as NIfTI with its affine (atomically): int16 where its values are whole
    numbers in int16's range (HU), float32 otherwise."""
    data = volume.data
    whole = np.array_equal(data, np.round(data)) and data.min() >= -32768 and data.max() <= 32767
    return _write_nifti(data.astype(np.int16 if whole else np.float32), volume, path)


def _write_nifti(data: np.ndarray, like: Volume, path) -> Path:
    import nibabel as nib

    path = Path(path)
    if _suffix(path) not in NIFTI_SUFFIXES:
        raise InputError(path, "NIfTI output must end in .nii or .nii.gz")
    if path.resolve() in _input_files(like):
        raise InputError(path, "refusing to overwrite an input file")
    img = nib.Nifti1Image(data, like.affine)
    img.set_qform(like.affine, code=1)  # both forms, so every reader finds the same geometry
    img.set_sform(like.affine, code=1)
    img.header.set_data_dtype(data.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def is_volume_path(path) -> bool:
    """A NIfTI/NRRD file, or a folder holding DICOM files."""
    path = Path(path)
    if path.is_dir():
        return bool(_dicom_files(path))
    return path.is_file() and _suffix(path) in VOLUME_SUFFIXES


def find_inputs(paths: Iterable) -> list[Path]:
    """Expand files and folders into readable inputs: volumes, 2D images, DICOM series folders.

    A folder holding DICOM files is one input; other folders are searched recursively.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        if path.is_file():
            if _suffix(path) not in VOLUME_SUFFIXES + IMAGE2D_SUFFIXES:
                raise InputError(path, f"unknown file type {_suffix(path) or '(no extension)'!r}; expected "
                                       "NIfTI, NRRD, PNG/JPG or a DICOM folder")
            found.append(path)
            continue
        before = len(found)
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            folder = Path(folder)
            names = sorted(f for f in files if not f.startswith("."))
            if any(is_dicom_file(folder / f) for f in names):
                found.append(folder)
                continue
            found += [folder / f for f in names if _suffix(Path(f)) in VOLUME_SUFFIXES + IMAGE2D_SUFFIXES]
        if len(found) == before:
            raise InputError(path, "no readable inputs (NIfTI, NRRD, PNG/JPG or DICOM) in this folder")
    unique = list(dict.fromkeys(found))
    return unique
