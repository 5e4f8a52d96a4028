"""Dataset layouts: detection on synthetic and real folders, case records, masks, errors."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from sammix.data.io import Volume
from sammix.data.layouts import CaseRecord, detect_layout, list_cases, load_case
from sammix.data.synthetic import write_synthetic_dataset
from sammix.errors import InputError


@pytest.mark.parametrize("layout", ["lits", "msd", "totalseg", "pairs", "slices", "dicom"])
def test_every_synthetic_layout_is_detected_and_loads(synthetic_root, layout):
    root = synthetic_root(layout)
    assert detect_layout(root) == layout
    records = list_cases(root)
    assert len({r.case_id for r in records}) == 3
    assert all(isinstance(r, CaseRecord) and r.layout == layout for r in records)
    image, mask = load_case(records[0] if layout != "slices" else records[6])  # slice 24 shows liver
    if layout == "dicom":
        assert isinstance(image, Volume) and mask is None and records[0].label is None
        return
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}  # tumour (2) merged into liver
    if layout == "slices":
        assert image.ndim == 2 and image.dtype == np.uint8 and image.shape == mask.shape
        assert records[0].slice_index == 0 and records[1].slice_index == 4
    else:
        assert isinstance(image, Volume) and image.data.shape == mask.shape
        liver_hu = image.data[mask > 0].mean()
        assert 30 < liver_hu < 90


def test_real_shared_folders_are_detected(shared_data):
    expected = {"lits-117": "lits", "totalseg-example": "totalseg", "lits-slices": "slices",
                "chaos-ct3": "dicom", "chaos-ct3/dicom": "dicom"}
    for folder, layout in expected.items():
        assert detect_layout(shared_data / folder) == layout, folder
    slices = list_cases(shared_data / "lits-slices")
    assert len(slices) == 442 and len({r.case_id for r in slices}) == 85
    first = next(r for r in slices if r.image.name == "lits10001_103.png")
    assert (first.case_id, first.slice_index) == ("lits10001", 103)
    assert first.label == shared_data / "lits-slices" / "masks" / "lits10001_103.png"
    (ts,) = list_cases(shared_data / "totalseg-example")
    assert ts.label.name == "liver.nii.gz"
    (lits,) = list_cases(shared_data / "lits-117")
    assert (lits.case_id, lits.label.name) == ("volume-117", "segmentation-117.nii.gz")
    volume, mask = load_case(lits)
    raw = np.asarray(nib.load(str(lits.label)).dataobj)
    assert set(np.unique(raw)) == {0, 1, 2}
    np.testing.assert_array_equal(mask, (raw > 0).astype(np.uint8))
    assert [r.case_id for r in list_cases(shared_data / "chaos-ct3")] == ["dicom"]


def test_pair_variants_and_single_totalseg_case(tmp_path, synthetic_root):
    src = synthetic_root("pairs", n_cases=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(src / "case000.nii.gz", flat / "a.nii.gz")
    shutil.copy(src / "case000_label.nii.gz", flat / "a_seg.nii.gz")
    shutil.copy(src / "case001.nii.gz", flat / "b.nii.gz")
    shutil.copy(src / "case001_label.nii.gz", flat / "b_mask.nii.gz")
    assert detect_layout(flat) == "pairs"
    assert [(r.case_id, r.label.name) for r in list_cases(flat)] == [("a", "a_seg.nii.gz"), ("b", "b_mask.nii.gz")]

    split = tmp_path / "split"
    (split / "images").mkdir(parents=True)
    (split / "labels").mkdir()
    shutil.copy(src / "case000.nii.gz", split / "images" / "p1_0000.nii.gz")
    shutil.copy(src / "case000_label.nii.gz", split / "labels" / "p1.nii.gz")
    assert detect_layout(split) == "pairs"
    (rec,) = list_cases(split)
    assert rec.case_id == "p1" and load_case(rec)[1].sum() > 0

    case = synthetic_root("totalseg", n_cases=1) / "s0000"
    assert detect_layout(case) == "totalseg"
    assert [r.case_id for r in list_cases(case)] == ["s0000"]


def test_msd_label_names_pick_the_organ(tmp_path, synthetic_root):
    root = tmp_path / "msd"
    shutil.copytree(synthetic_root("msd", n_cases=1), root)
    rec = list_cases(root)[0]
    raw = np.asarray(nib.load(str(rec.label)).dataobj)
    _, mask = load_case(rec)
    np.testing.assert_array_equal(mask, (raw > 0).astype(np.uint8))  # liver + cancer
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "liver": 1, "vessel": 2}  # nnU-Net v2 style, no tumour
    (root / "dataset.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(load_case(rec)[1], (raw == 1).astype(np.uint8))
    with pytest.raises(InputError, match="no 'spleen' label") as err:
        list_cases(root, organ="spleen")
    assert "dataset.json" in str(err.value)


def _expect_error(fn, name: str, problem: str):
    with pytest.raises(InputError) as err:
        fn()
    message = str(err.value)
    assert name in message and problem in message, message
    assert "\n" not in message
    return message


def test_layout_errors_name_the_file(tmp_path, synthetic_root):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "readme.txt").write_text("hello")
    _expect_error(lambda: detect_layout(nothing), str(nothing), "no known dataset layout")


    lits = tmp_path / "lits"
    shutil.copytree(synthetic_root("lits"), lits)
    (lits / "segmentation-1.nii.gz").unlink()
    _expect_error(lambda: list_cases(lits), "volume-1.nii.gz", "without its label")

    pairs = tmp_path / "pairs"
    shutil.copytree(synthetic_root("pairs"), pairs)
    (pairs / "case002_label.nii.gz").unlink()
    _expect_error(lambda: list_cases(pairs), "case002.nii.gz", "without its label")
    label = pairs / "case000_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 40), np.uint8), np.eye(4)), str(label))
    rec = CaseRecord("case000", pairs / "case000.nii.gz", label, "pairs")
    _expect_error(lambda: load_case(rec), str(label), "does not match image case000.nii.gz")

    totalseg = synthetic_root("totalseg")
    _expect_error(lambda: list_cases(totalseg, organ="spleen"), "segmentations/spleen.nii.gz", "missing organ file")
    _expect_error(lambda: list_cases(synthetic_root("lits"), organ="spleen"), "lits", "only the liver")

    slices = tmp_path / "slices"
    shutil.copytree(synthetic_root("slices"), slices)
    (slices / "masks" / "synth001_004.png").unlink()
    _expect_error(lambda: list_cases(slices), "synth001_004.png", "without its mask")


def test_label_with_another_orientation_is_rejected(tmp_path):
    write_synthetic_dataset(tmp_path / "ras", "pairs", 1)
    write_synthetic_dataset(tmp_path / "lps", "pairs", 1, axcodes=("L", "P", "S"))
    shutil.copy(tmp_path / "lps" / "case000_label.nii.gz", tmp_path / "ras" / "case000_label.nii.gz")
    (rec,) = list_cases(tmp_path / "ras")
    _expect_error(lambda: load_case(rec), "case000_label.nii.gz", "orientation LPS differs")


def test_label_with_another_affine_is_rejected(tmp_path):
    write_synthetic_dataset(tmp_path / "a", "pairs", 1)
    label = tmp_path / "a" / "case000_label.nii.gz"
    img = nib.load(str(label))
    shifted = img.affine.copy()
    shifted[2, 3] += 3.0  # one slice (3 mm) higher: same shape and orientation
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), str(label))
    (rec,) = list_cases(tmp_path / "a")
    _expect_error(lambda: load_case(rec), "case000_label.nii.gz", "label geometry (affine) differs from image "
                                                                  "case000.nii.gz: a voxel lies up to 3.00 mm")
    shifted[2, 3] -= 2.9  # a tenth of a mm off: the same grid as far as a mask is concerned
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), str(label))
    assert load_case(rec)[1].any()


def test_volumes_without_any_label_file_are_image_only(tmp_path, synthetic_root):
    root = tmp_path / "raw"
    root.mkdir()
    for name in ("case000.nii.gz", "case001.nii.gz"):
        shutil.copy(synthetic_root("pairs") / name, root / name)
    assert detect_layout(root) == "pairs"
    records = list_cases(root)
    assert [(r.case_id, r.label) for r in records] == [("case000", None), ("case001", None)]
    volume, mask = load_case(records[0])
    assert isinstance(volume, Volume) and mask is None


def test_slices_without_masks_have_unknown_labels(tmp_path, synthetic_root):
    root = tmp_path / "nomasks"
    shutil.copytree(synthetic_root("slices"), root)
    shutil.rmtree(root / "masks")
    records = list_cases(root)
    assert detect_layout(root) == "slices" and all(r.label is None for r in records)
    image, mask = load_case(records[0])
    assert image.dtype == np.uint8 and mask is None
