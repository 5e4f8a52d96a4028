"""Every failure named, nothing half-written (issue 13): DICOM tags that CT needs, outputs that can be
written, temporary files that a killed write leaves, weights files that are cut short."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from sammix.runfolder import RunFolder
from sammix.data.io import atomic_path, check_output_folder, read_volume, remove_stale_temps
from sammix.data.synthetic import synthetic_ct, write_dicom_series
from sammix.errors import InputError


def _one_line_naming(err, path) -> str:
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    return message


def _edit_dicom(files, edit) -> None:
    import pydicom

    for f in files:
        ds = pydicom.dcmread(str(f))
        edit(ds)
        ds.save_as(str(f))


@pytest.fixture
def chaos_copy(shared_data, tmp_path):
    """The real CHAOS DICOM series, copied where it may be edited."""
    return shutil.copytree(shared_data / "chaos-ct3" / "dicom", tmp_path / "chaos")


def _drop_rescale(ds) -> None:
    for tag in ("RescaleSlope", "RescaleIntercept"):
        ds.pop(tag, None)


def test_a_real_ct_series_without_rescale_tags_is_an_error_naming_a_file(chaos_copy):
    _edit_dicom(sorted(chaos_copy.iterdir()), _drop_rescale)
    with pytest.raises(InputError) as err:
        read_volume(chaos_copy)
    message = _one_line_naming(err, chaos_copy)
    assert "without RescaleSlope and RescaleIntercept" in message and "Hounsfield" in message


def test_one_ct_slice_without_an_intercept_is_named(tmp_path):
    hu, _, affine = synthetic_ct(shape=(16, 16, 5))
    folder = write_dicom_series(tmp_path / "series", hu, affine, shuffle_names=False)
    third = sorted(folder.iterdir())[2]
    _edit_dicom([third], lambda ds: delattr(ds, "RescaleIntercept"))
    with pytest.raises(InputError) as err:
        read_volume(folder)
    assert "without RescaleIntercept" in _one_line_naming(err, third)

    def as_mr(ds):  # outside CT, stored values without rescale tags are the values (DICOM's default)
        ds.Modality = "MR"
        _drop_rescale(ds)

    _edit_dicom(folder.iterdir(), as_mr)
    assert read_volume(folder).data.min() >= 0  # raw values, no -1024 applied


def test_a_real_series_whose_slices_differ_in_pixel_spacing_is_an_error(chaos_copy):
    odd = sorted(chaos_copy.iterdir())[40]
    _edit_dicom([odd], lambda ds: setattr(ds, "PixelSpacing", [0.8, 0.8]))
    with pytest.raises(InputError) as err:
        read_volume(chaos_copy)
    assert "PixelSpacing [0.8, 0.8] differs from the rest of the series" in _one_line_naming(err, odd)


def test_stale_temporary_files_of_one_output_are_removed_and_no_others(tmp_path):
    target = tmp_path / "case.nii.gz"
    stale = [tmp_path / ".tmp-0123abcd-case.nii.gz", tmp_path / ".tmp-deadbeef-case.nii.gz"]
    others = [tmp_path / ".tmp-0123abcd-x-case.nii.gz", tmp_path / ".tmp-0123abcd-case.json", tmp_path / "case.nii.gz"]
    for f in stale + others:
        f.write_bytes(b"half")
    remove_stale_temps(target)
    assert sorted(tmp_path.iterdir()) == sorted(others)
    with atomic_path(target) as tmp:  # the temporary names it removes are the ones atomic_path makes
        tmp.write_bytes(b"half")
        remove_stale_temps(target)
        assert not tmp.exists()
        tmp.write_bytes(b"whole")


def test_output_folder_checks_name_the_problem(tmp_path, read_only_folder):
    a_file = tmp_path / "ct.nii.gz"
    a_file.write_bytes(b"x")
    with pytest.raises(InputError, match="is a file, not a folder") as err:
        check_output_folder(a_file)
    _one_line_naming(err, a_file)
    below = a_file / "masks" / "deeper"
    with pytest.raises(InputError, match=f"cannot be a folder: {a_file} is a file") as err:
        check_output_folder(below)
    _one_line_naming(err, below)
    with pytest.raises(InputError, match="cannot write to this folder") as err:
        check_output_folder(read_only_folder / "masks")
    with pytest.raises(InputError, match="cannot write to this folder") as err:
        check_output_folder(read_only_folder)
    assert list(read_only_folder.iterdir()) == []
    made = check_output_folder(tmp_path / "new" / "masks")
    assert made.is_dir() and list(made.iterdir()) == []  # the probe leaves nothing


def test_truncated_or_foreign_weights_are_one_line_errors(tmp_path):
    run = RunFolder(tmp_path)
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    assert set(run.load_weights("good.pt")) == {"model"}
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        run.load_weights("cut.pt")
    _one_line_naming(err, cut)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(InputError, match="not a weights file"):
        run.load_weights("tensor.pt")
