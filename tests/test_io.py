"""Readers and writers keep geometry: display orientation, mask round trips, DICOM, NRRD, bad input."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from sammix.data.io import (Volume, atomic_path, find_inputs, is_volume_path, read_image2d, read_volume,
                            write_mask)
from sammix.data.layouts import list_cases, load_case
from sammix.data.synthetic import reorient, synthetic_ct, write_dicom_series
from sammix.errors import InputError

ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "I"), ("P", "S", "R"), ("I", "L", "A")]


def _world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def _sorted_rows(points: np.ndarray) -> np.ndarray:
    return points[np.lexsort(points.T[::-1])]


def _save(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


# --- display orientation -------------------------------------------------------------------------

@pytest.mark.parametrize("codes", ORIENTATIONS)
@pytest.mark.parametrize("oblique", [0.0, 25.0])
def test_axial_is_the_same_display_for_any_storage(codes, oblique):
    hu, mask, affine = synthetic_ct(spacing=(1.0, 2.0, 3.0))
    reference = Volume(hu, affine, "ras")
    data, aff = reorient(hu, affine, codes)
    mdata, _ = reorient(mask, affine, codes)
    t = np.deg2rad(oblique)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    vol = Volume(data, rot @ aff, "x")

    axial, mask_ax = vol.axial(), vol.to_axial(mdata)
    assert axial.dtype == np.float32
    np.testing.assert_array_equal(axial, reference.axial())
    assert vol.axial_spacing() == pytest.approx((3.0, 2.0, 1.0))  # (slice, row, col) whatever the storage
    z, h, w = axial.shape
    rows, cols = np.nonzero(mask_ax.any(axis=0))
    assert cols.mean() < w / 2, "liver (patient's right) must be on the image's left"
    spine_rows, _ = np.nonzero((axial > 500).any(axis=0))
    assert spine_rows.mean() > h / 2, "spine (posterior) must be at the bottom, anterior at the top"
    liver_slices = np.flatnonzero(mask_ax.any(axis=(1, 2)))
    assert liver_slices.mean() > z / 2 and liver_slices.min() > 0, "slice 0 is inferior; liver is upper"


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_from_axial_inverts_axial_for_any_dtype(codes):
    hu, mask, affine = synthetic_ct(shape=(20, 24, 12))
    data, aff = reorient(hu, affine, codes)
    vol = Volume(data, aff, "x")
    np.testing.assert_array_equal(vol.from_axial(vol.axial()), data)
    labels = np.arange(data.size, dtype=np.int32).reshape(data.shape)
    back = vol.from_axial(vol.to_axial(labels))
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, labels)
    with pytest.raises(ValueError):
        vol.from_axial(np.zeros((3, 3, 3)))


# --- mask round trips through files ----------------------------------------------------------------

def test_written_mask_lines_up_in_world_space_for_a_non_identity_lits_volume(synthetic_root, tmp_path):
    codes = ("P", "I", "L")  # permuted and flipped
    root = synthetic_root("lits", n_cases=1, spacing=(0.8, 1.6, 4.0), axcodes=codes, oblique_deg=15.0)
    record = list_cases(root)[0]
    volume, mask = load_case(record)
    assert nib.aff2axcodes(volume.affine) == codes

    # what a model sees and predicts is in display orientation; map it back and write it
    predicted = volume.to_axial(mask)
    out = write_mask(volume.from_axial(predicted), volume, tmp_path / "pred.nii.gz")

    written = nib.load(str(out))
    source = nib.load(str(record.label))
    assert written.shape == source.shape
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    got = _world(written.affine, np.argwhere(np.asarray(written.dataobj) > 0))
    want = _world(source.affine, np.argwhere(np.asarray(source.dataobj) > 0))
    np.testing.assert_allclose(_sorted_rows(got), _sorted_rows(want), atol=1e-3)

    # and the same liver, in world space, as the phantom before it was stored reoriented
    _, ras_mask, ras_affine = synthetic_ct(spacing=(0.8, 1.6, 4.0), seed=0)
    t = np.deg2rad(15.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    ras_world = _world(rot @ ras_affine, np.argwhere(ras_mask > 0))
    np.testing.assert_allclose(_sorted_rows(got), _sorted_rows(ras_world), atol=1e-3)


def test_write_mask_refuses_inputs_and_wrong_shapes(tmp_path):
    hu, mask, affine = synthetic_ct(shape=(16, 16, 8))
    src = _save(tmp_path / "ct.nii.gz", hu.astype(np.int16), affine)
    vol = read_volume(src)
    with pytest.raises(InputError, match="overwrite"):
        write_mask(mask, vol, src)
    with pytest.raises(ValueError, match="from_axial"):
        write_mask(vol.to_axial(mask)[:, :, :-1], vol, tmp_path / "m.nii.gz")
    with pytest.raises(InputError, match=r"\.nii"):
        write_mask(mask, vol, tmp_path / "m.png")
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]


def test_atomic_path_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("out.txt") and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


# --- DICOM --------------------------------------------------------------------------------------

def _dicom_slices(folder):
    import pydicom

    slices = [pydicom.dcmread(str(p)) for p in sorted(folder.iterdir())]
    normal = np.cross(*np.reshape(np.array(slices[0].ImageOrientationPatient, dtype=float), (2, 3)))
    return sorted(slices, key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))


def _check_against_dicom(volume: Volume, slices) -> None:
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    first, last = slices[0], slices[-1]
    n = len(slices)
    assert volume.data.shape == (int(first.Columns), int(first.Rows), n)
    np.testing.assert_allclose(volume.affine[:3, 3], lps_to_ras * np.array(first.ImagePositionPatient, float),
                               atol=1e-4)
    np.testing.assert_allclose((volume.affine @ [0, 0, n - 1, 1])[:3],
                               lps_to_ras * np.array(last.ImagePositionPatient, float), atol=1e-4)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    assert np.linalg.norm(volume.affine[:3, 0]) == pytest.approx(col_spacing)
    assert np.linalg.norm(volume.affine[:3, 1]) == pytest.approx(row_spacing)
    # pixel (row r, column c) of slice k sits at IPP_k + c*dc*row_dir + r*dr*col_dir (LPS)
    iop = np.array(first.ImageOrientationPatient, float)
    k, r, c = n // 2, 7, 11
    ds = slices[k]
    lps = np.array(ds.ImagePositionPatient, float) + c * col_spacing * iop[:3] + r * row_spacing * iop[3:]
    np.testing.assert_allclose((volume.affine @ [c, r, k, 1])[:3], lps_to_ras * lps, atol=1e-3)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.data[:, :, k], hu.T)


def test_real_dicom_series_geometry_and_mask_affine(shared_data, tmp_path):
    folder = shared_data / "chaos-ct3" / "dicom"
    volume = read_volume(folder)
    slices = _dicom_slices(folder)
    _check_against_dicom(volume, slices)
    assert volume.axial_spacing() == pytest.approx((2.0, 0.7265625, 0.7265625))

    mask = np.zeros(volume.data.shape, np.uint8)
    mask[100:120, 200:230, 5] = 1
    out = write_mask(mask, volume, tmp_path / "chaos_mask.nii.gz")
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-3)
    lps = np.array(slices[0].ImagePositionPatient, float)
    np.testing.assert_allclose(written.affine[:3, 3], [-lps[0], -lps[1], lps[2]], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("L", "P", "I"), ("R", "A", "S")])
def test_synthetic_dicom_series_is_ordered_by_position_not_name(tmp_path, codes):
    hu, mask, affine = synthetic_ct(shape=(32, 28, 12), spacing=(0.7, 0.9, 2.5))  # rows != columns
    data, aff = reorient(np.rint(np.maximum(hu, -1024)), affine, codes)  # the writer stores HU + 1024
    folder = write_dicom_series(tmp_path / "series", data, aff, shuffle_names=True)
    volume = read_volume(folder)
    _check_against_dicom(volume, _dicom_slices(folder))
    # the reader always stores slices along +normal, yet the image in world space is unchanged
    np.testing.assert_array_equal(volume.axial(), Volume(data, aff, "x").axial())
    assert nib.aff2axcodes(volume.affine)[:2] == codes[:2]


def _series(tmp_path, name="series", **kwargs):
    hu, _, affine = synthetic_ct(shape=(16, 16, 6))
    data, aff = reorient(hu, affine, ("L", "P", "S"))
    return write_dicom_series(tmp_path / name, data, aff, **kwargs)


def test_dicom_folder_with_two_series_is_rejected(tmp_path):
    folder = _series(tmp_path, series_uid="1.2.3.4")
    other = _series(tmp_path, name="other", series_uid="1.2.3.5")
    shutil.copy(next(other.iterdir()), folder / "extra.dcm")
    with pytest.raises(InputError) as err:
        read_volume(folder)
    assert str(folder) in str(err.value) and "2 DICOM series" in str(err.value)
    assert "\n" not in str(err.value)


def test_dicom_series_with_a_missing_slice_is_rejected(tmp_path):
    import pydicom

    folder = _series(tmp_path, shuffle_names=False)
    middle = sorted(folder.iterdir())[3]
    assert pydicom.dcmread(str(middle)).InstanceNumber == 4
    middle.unlink()
    with pytest.raises(InputError, match="non-uniform slice spacing") as err:
        read_volume(folder)
    assert str(folder) in str(err.value)


# --- other formats ---------------------------------------------------------------------------------

def test_nrrd_space_directions_become_a_ras_affine(tmp_path):
    import nrrd

    hu, _, _ = synthetic_ct(shape=(12, 10, 8))
    directions = np.array([[0.0, -2.0, 0.0], [1.5, 0.0, 0.0], [0.0, 0.0, 3.0]])  # rows: axis vectors, LPS
    origin = np.array([10.0, -20.0, 30.0])
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), hu, {"space": "left-posterior-superior", "space directions": directions,
                               "space origin": origin})
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.data, hu)
    voxel = np.array([3, 4, 5])
    lps = origin + voxel @ directions
    np.testing.assert_allclose((vol.affine @ [*voxel, 1])[:3], [-lps[0], -lps[1], lps[2]])
    # axis 0 runs anterior-posterior (rows), axis 1 left-right (columns)
    assert vol.has_spacing and vol.axial_spacing() == pytest.approx((3.0, 2.0, 1.5))


def test_identity_affine_means_no_spacing_and_warns_that_the_orientation_is_unknown(tmp_path, capsys):
    hu, _, _ = synthetic_ct(shape=(8, 8, 4))
    path = _save(tmp_path / "x.nii", hu.astype(np.int16))
    vol = read_volume(path)
    assert not vol.has_spacing and vol.axial_spacing() is None
    assert vol.axial().shape == (4, 8, 8)
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and str(path) in warning and "identity affine" in warning
    read_volume(path)
    assert capsys.readouterr().err == ""  # once per file


def test_read_image2d_converts_rgb_and_keeps_16_bit(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    grey = read_image2d(tmp_path / "rgb.png")
    assert grey.shape == (5, 7) and grey.dtype == np.uint8 and grey.max() > 0
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(tmp_path / "deep.png")
    deep = read_image2d(tmp_path / "deep.png")
    assert deep.dtype == np.float32 and deep.max() == 1000


def test_find_inputs_expands_folders_and_counts_a_dicom_series_once(tmp_path):
    _series(tmp_path / "in", name="dicomseries")
    _save(tmp_path / "in" / "a.nii.gz", np.zeros((4, 4, 4), np.int16))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    found = find_inputs([tmp_path / "in"])
    assert [p.relative_to(tmp_path / "in").as_posix() for p in found] == ["a.nii.gz", "b.png", "dicomseries"]
    assert is_volume_path(tmp_path / "in" / "dicomseries") and is_volume_path(tmp_path / "in" / "a.nii.gz")
    assert not is_volume_path(tmp_path / "in" / "b.png")
    with pytest.raises(InputError, match="unknown file type"):
        find_inputs([tmp_path / "in" / "notes.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no readable inputs"):
        find_inputs([tmp_path / "empty"])


# --- bad input: one line naming the file -----------------------------------------------------------

def _bad_inputs(tmp_path):
    yield "4D", _save(tmp_path / "four.nii.gz", np.zeros((4, 4, 4, 3), np.float32)), "4D data"
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    yield "nan", _save(tmp_path / "nan.nii.gz", nan), "NaN"
    yield "2d nifti", _save(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32)), "2D image"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "slice.png")
    yield "png", tmp_path / "slice.png", "2D image"
    (tmp_path / "scan.mha").write_bytes(b"whatever")
    yield "extension", tmp_path / "scan.mha", "unknown file type"
    good = _save(tmp_path / "good.nii.gz", np.zeros((16, 16, 16), np.int16))
    (tmp_path / "truncated.nii.gz").write_bytes(good.read_bytes()[:60])
    yield "truncated", tmp_path / "truncated.nii.gz", "cannot read NIfTI"
    (tmp_path / "garbage.nii").write_bytes(gzip.compress(b"not a nifti at all" * 30))
    yield "garbage", tmp_path / "garbage.nii", "cannot read NIfTI"
    (tmp_path / "empty").mkdir()
    yield "empty folder", tmp_path / "empty", "empty folder"
    broken = _series(tmp_path, name="broken", shuffle_names=False)
    cut = sorted(broken.iterdir())[2]
    cut.write_bytes(cut.read_bytes()[:-200])  # pixel data cut short
    yield "corrupt dicom", cut, "DICOM"
    yield "missing", tmp_path / "nowhere.nii.gz", "no such file"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path):
    cases = list(_bad_inputs(tmp_path))
    for what, path, problem in cases:
        target = path.parent if what == "corrupt dicom" else path
        with pytest.raises(InputError) as err:
            read_volume(target)
        message = str(err.value)
        assert problem in message, (what, message)
        assert str(path) in message, (what, message)
        assert "\n" not in message, (what, message)
    with pytest.raises(InputError, match="cannot read image"):
        (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
        read_image2d(tmp_path / "bad.png")


# --- real data: display orientation -----------------------------------------------------------------

def test_real_volumes_show_liver_left_and_anterior_top(shared_data):
    ts = read_volume(shared_data / "totalseg-example" / "ct.nii.gz")
    liver = ts.to_axial(read_volume(shared_data / "totalseg-example" / "segmentations" / "liver.nii.gz").data)
    _, cols = np.nonzero(liver.any(axis=0))
    assert cols.mean() < liver.shape[2] / 2
    spine_rows, _ = np.nonzero((ts.axial() > 300).any(axis=0))
    assert spine_rows.mean() > liver.shape[1] / 2

    # the lits-slices PNGs (radiological view) agree: liver on the left
    masks = sorted((shared_data / "lits-slices" / "masks").glob("*.png"))[:20]
    cols = np.concatenate([np.nonzero(read_image2d(p))[1] for p in masks])
    assert cols.mean() < 128

    chaos = read_volume(shared_data / "chaos-ct3" / "dicom").axial()
    bone_rows, _ = np.nonzero(chaos[len(chaos) // 2] > 300)
    assert bone_rows.mean() > chaos.shape[1] / 2
    air = chaos[-5:] < -500  # lungs fill the top (most superior) slices, not the bottom ones
    assert air.mean() > (chaos[:5] < -500).mean()


def test_lits117_identity_affine_shows_the_known_180_degree_turn(shared_data):
    # lits-117 carries no geometry (identity affine). Taken at its word (RAS) the display is turned
    # by 180 degrees: liver on the image's right, spine at the top. We do not guess; stating the
    # orientation explicitly fixes it.
    root = shared_data / "lits-117"
    vol, mask = load_case(list_cases(root)[0])
    assert not vol.has_spacing and vol.axial_spacing() is None
    for volume, liver_left in [(vol, False), (vol.with_axcodes(("L", "P", "S")), True)]:
        liver = volume.to_axial(mask)
        _, cols = np.nonzero(liver.any(axis=0))
        assert (cols.mean() < liver.shape[2] / 2) == liver_left
        spine_rows, _ = np.nonzero((volume.axial()[40:90] > 400).any(axis=0))
        assert (spine_rows.mean() > liver.shape[1] / 2) == liver_left
