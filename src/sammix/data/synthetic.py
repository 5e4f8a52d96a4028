"""Small synthetic abdominal CTs with a liver mask, in every dataset layout, for tests and CI.

The phantom is built on a RAS+ grid (first axis towards the patient's right, second anterior,
third superior): air, a body ellipse (fat rim, muscle wall, soft tissue), spine, aorta, kidneys,
spleen on the left, a liver on the right spanning the middle-upper slices only (so lower and top
slices have no liver), a tumour inside it, bowel gas, and noise. A 64x64x48 case takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

LAYOUT_CHOICES = ("lits", "msd", "totalseg", "pairs", "slices", "dicom")


def _ellipsoid(u, v, w, centre, radii) -> np.ndarray:
    return ((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2 + \
        ((w - centre[2]) / radii[2]) ** 2 <= 1.0


def synthetic_ct(shape=(64, 64, 48), spacing=(1.5, 1.5, 3.0), seed: int = 0, with_tumour: bool = False):
    """(hu float32, liver mask uint8, RAS affine) on a RAS+ grid of `shape`; with_tumour: the mask
    labels the tumour 2 (LiTS style), otherwise it is a binary liver mask (tumour included)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    # u: -1 (patient's left) .. 1 (right); v: -1 (posterior) .. 1 (anterior); w: 0 (inferior) .. 1 (superior)
    u = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    v = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    w = np.linspace(0, 1, nz, dtype=np.float32)[None, None, :]
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731

    a, b = 0.86 + jitter(0.06), 0.66 + jitter(0.06)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 0 * w
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r <= 1.0] = -100.0  # subcutaneous fat
    hu[r <= 0.9] = 50.0  # muscle wall
    hu[r <= 0.84] = 25.0 + jitter(8)  # abdominal soft tissue
    body = r <= 0.84

    kidneys = _ellipsoid(u, v, w, (0.38, -0.3, 0.33), (0.12, 0.16, 0.16)) | \
        _ellipsoid(u, v, w, (-0.38, -0.3, 0.3), (0.12, 0.16, 0.16))
    hu[kidneys & body] = 150.0 + jitter(20)
    spleen = _ellipsoid(u, v, w, (-0.5 + jitter(0.05), -0.15, 0.62), (0.16, 0.22, 0.18))
    hu[spleen & body] = 48.0 + jitter(8)

    centre = (0.36 + jitter(0.05), 0.08 + jitter(0.05), 0.64 + jitter(0.04))
    radii = (0.42 + jitter(0.05), 0.42 + jitter(0.05), 0.24 + jitter(0.03))
    taper = np.clip((u + 0.25) / 0.6, 0.35, 1.0)  # thick on the right, thin left lobe
    liver = ((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / (radii[1] * taper)) ** 2 + \
        ((w - centre[2]) / radii[2]) ** 2 <= 1.0
    liver &= r <= 0.8
    hu[liver] = 62.0 + jitter(15)
    tumour = _ellipsoid(u, v, w, (centre[0] + 0.08, centre[1], centre[2]), (0.1, 0.1, 0.1)) & liver
    hu[tumour] = 25.0

    gas = np.zeros(shape, dtype=bool)
    for _ in range(4):
        gas |= _ellipsoid(u, v, w, (jitter(0.3) - 0.1, 0.3 + jitter(0.15), 0.2 + jitter(0.15)), (0.08, 0.06, 0.06))
    hu[gas & body & ~liver] = -900.0
    hu[np.broadcast_to(np.sqrt(u ** 2 + (v + 0.2) ** 2) <= 0.07, shape) & ~liver] = 160.0  # aorta
    spine = np.broadcast_to(np.sqrt(u ** 2 + (v + 0.5) ** 2) <= 0.13, shape)
    hu[spine] = 700.0
    hu[np.broadcast_to(np.sqrt(u ** 2 + (v + 0.5) ** 2) <= 0.08, shape)] = 250.0  # cancellous bone

    hu += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    mask = liver.astype(np.uint8)
    if with_tumour:
        mask[tumour] = 2
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) - 1) / 2.0  # centred on the world origin
    return hu, mask, affine


def reorient(data: np.ndarray, affine: np.ndarray, axcodes) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with other axis codes (like nibabel's as_reoriented)."""
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(axcodes)))
    new = np.ascontiguousarray(nio.apply_orientation(data, transform))
    return new, affine @ nio.inv_ornt_aff(transform, data.shape)


def _rotate_z(affine: np.ndarray, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ affine


def _save_nifti(data, affine, path: Path, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_dicom_series(folder, hu: np.ndarray, affine: np.ndarray, series_uid: str | None = None,
                       shuffle_names: bool = True, seed: int = 0) -> Path:
    """Write a 3D HU volume (stored grid + RAS affine) as a CT DICOM series, one file per slice.

    File names are shuffled so readers must order slices by position, as with real exports."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = np.concatenate([lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing])
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    nz = hu.shape[2]
    names = np.random.default_rng(seed).permutation(nz) if shuffle_names else np.arange(nz)
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "CT"
        ds.PatientID = "SYNTHETIC"
        ds.InstanceNumber = int(names[k]) + 1
        ds.ImagePositionPatient = [float(x) for x in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(x) for x in iop]
        ds.PixelSpacing = [float(row_spacing), float(col_spacing)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        stored = np.clip(np.rint(hu[:, :, k].T + 1024), 0, 65535).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        pydicom.dcmwrite(str(folder / f"IM{int(names[k]):04d}.dcm"), ds, enforce_file_format=True)
    return folder


def write_synthetic_dataset(root, layout: str, n_cases: int = 3, shape=(64, 64, 48),
                            spacing=(1.5, 1.5, 3.0), axcodes=("R", "A", "S"), oblique_deg: float = 0.0,
                            identity_affine: bool = False, slice_step: int = 4, seed: int = 0) -> Path:
    """Write `n_cases` synthetic CTs under `root` in `layout` (see LAYOUT_CHOICES) and return root.

    axcodes / oblique_deg store the volumes with permuted or flipped axes and a rotated affine;
    identity_affine drops the geometry (like lits-117). "slices" writes every `slice_step`-th axial
    slice as 8-bit PNG (HU clipped to [0, 255], the lits-slices convention) with 0/255 masks.
    """
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"layout must be one of {LAYOUT_CHOICES}, got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        hu, mask, affine = synthetic_ct(shape, spacing, seed=seed + i, with_tumour=True)
        hu, _ = reorient(hu, affine, axcodes)
        mask, affine = reorient(mask, affine, axcodes)
        affine = np.eye(4) if identity_affine else _rotate_z(affine, oblique_deg)
        binary = (mask > 0).astype(np.uint8)
        if layout == "lits":
            _save_nifti(hu, affine, root / f"volume-{i}.nii.gz", np.int16)
            _save_nifti(mask, affine, root / f"segmentation-{i}.nii.gz", np.uint8)
        elif layout == "msd":
            (root / "imagesTr").mkdir(exist_ok=True)
            (root / "labelsTr").mkdir(exist_ok=True)
            _save_nifti(hu, affine, root / "imagesTr" / f"liver_{i:03d}.nii.gz", np.int16)
            _save_nifti(mask, affine, root / "labelsTr" / f"liver_{i:03d}.nii.gz", np.uint8)
        elif layout == "totalseg":
            case = root / f"s{i:04d}"
            (case / "segmentations").mkdir(parents=True, exist_ok=True)
            _save_nifti(hu, affine, case / "ct.nii.gz", np.int16)
            _save_nifti(binary, affine, case / "segmentations" / "liver.nii.gz", np.uint8)
        elif layout == "pairs":
            _save_nifti(hu, affine, root / f"case{i:03d}.nii.gz", np.int16)
            _save_nifti(binary, affine, root / f"case{i:03d}_label.nii.gz", np.uint8)
        elif layout == "dicom":
            write_dicom_series(root / f"case{i:03d}", hu, affine, seed=seed + i)
        else:
            _write_slices(root, f"synth{i:03d}", hu, binary, affine, slice_step)
    if layout == "msd":
        meta = {"name": "SyntheticLiver", "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "liver", "2": "cancer"}, "numTraining": n_cases,
                "training": [{"image": f"./imagesTr/liver_{i:03d}.nii.gz", "label": f"./labelsTr/liver_{i:03d}.nii.gz"}
                             for i in range(n_cases)]}
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def _write_slices(root: Path, case: str, hu, mask, affine, slice_step: int) -> None:
    from PIL import Image

    from sammix.data.io import Volume

    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    vol = Volume(hu.astype(np.float32), affine, root / case)
    images = np.clip(vol.axial(), 0, 255).astype(np.uint8)  # the lits-slices convention
    masks = vol.to_axial(mask) * 255
    for z in range(0, len(images), slice_step):
        Image.fromarray(images[z]).save(root / "images" / f"{case}_{z:03d}.png")
        Image.fromarray(masks[z].astype(np.uint8)).save(root / "masks" / f"{case}_{z:03d}.png")
