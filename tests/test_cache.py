"""Preprocessing, the HDF5 slice cache (`sammix prepare`): contents, reuse, atomicity, CLI."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from sammix.cli import main
from sammix.config import PrepConfig
from sammix.data import cache as cache_module
from sammix.data.cache import SliceCache, prepare_dataset
from sammix.data.io import read_image2d
from sammix.data.layouts import list_cases, load_case
from sammix.data.preprocess import (from_square, middle_slices, resize_image, resize_mask, square_padding, square_shape,
                                    to_square, to_unit, window)

SMALL = PrepConfig(size=32)


def test_window_resize_and_middle_slices():
    np.testing.assert_allclose(window(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), 40, 400),
                               [0.0, 0.0, 0.5, 1.0, 1.0])
    assert window(np.zeros(3, np.int16), 40, 400).dtype == np.float32
    np.testing.assert_allclose(to_unit(np.array([0, 51, 255], np.uint8)), [0.0, 0.2, 1.0])
    img = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    assert resize_image(img, 16).shape == (16, 16) and resize_image(img, (10, 20)).dtype == np.float32
    mask = np.zeros((40, 30), np.uint8)
    mask[10:30, 5:20] = 1
    small = resize_mask(mask, 20)
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    assert abs(int(small.sum()) - mask.sum() * (20 * 20) / (40 * 30)) < 25
    assert middle_slices(100, 0.3) == range(35, 65)
    assert middle_slices(100, 1.0) == range(100) and len(middle_slices(5, 0.01)) == 1
    with pytest.raises(ValueError):
        middle_slices(10, 0.0)


def test_square_field_of_view():
    assert square_padding((101, 122)) == ((10, 11), (0, 0))  # a 3 mm TotalSegmentator crop
    assert square_padding((64, 64), (2.0, 1.0)) == ((0, 0), (32, 32))  # 128 x 64 mm
    assert square_padding((512, 512), (0.7, 0.7)) == ((0, 0), (0, 0))
    assert square_shape((101, 122)) == (122, 122) and square_shape((64, 64), (2.0, 1.0)) == (64, 128)
    img = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4) + 1
    square = to_square(img)
    assert square.shape == (5, 4, 4) and (square[:, 3] == 0).all()  # the extra row below: air
    np.testing.assert_array_equal(from_square(square, (3, 4)), img)


def test_cache_contents_match_the_volumes(synthetic_root, tmp_path):
    root = synthetic_root("lits", spacing=(1.0, 2.0, 3.0), axcodes=("L", "P", "S"))
    cache = prepare_dataset(root, SMALL, cache_dir=tmp_path, progress=False)
    assert len(cache) == 3 * 48 and cache.cases() == ["volume-0", "volume-1", "volume-2"]
    assert cache.layout == "lits" and cache.prep == SMALL
    data = cache.load()
    assert data["images"].shape == (144, 32, 32) and data["images"].dtype == np.uint8
    assert data["masks"].dtype == np.uint8 and set(np.unique(data["masks"])) == {0, 1}
    np.testing.assert_array_equal(data["labels"], data["masks"].any(axis=(1, 2)))
    assert data["has_mask"].all() and 0 < data["labels"].mean() < 1  # slices with and without liver
    assert (data["depth"] == 48).all()
    # rows 2 mm, columns 1 mm: 128 x 64 mm, padded to 128 x 128 mm, so 4 mm per pixel both ways
    np.testing.assert_allclose(data["spacing"], np.tile([4.0, 4.0], (144, 1)))

    idx = cache.indices_for_cases(["volume-1"])
    assert len(idx) == 48 and (cache.case[idx] == "volume-1").all()
    np.testing.assert_array_equal(cache.slice_index[idx], np.arange(48))
    volume, mask = load_case(list_cases(root)[1])
    z = 30
    square = to_square(window(volume.axial()[z], 40, 400), (2.0, 1.0))
    assert square.shape == (64, 128)
    expected = np.round(np.clip(resize_image(square, 32), 0, 1) * 255)
    np.testing.assert_array_equal(cache.image(idx[z]), expected.astype(np.uint8))
    np.testing.assert_array_equal(cache.mask(idx[z]), resize_mask(to_square(volume.to_axial(mask)[z], (2.0, 1.0)), 32))
    picks = [idx[30], idx[2], idx[30], 5]
    np.testing.assert_array_equal(cache.images(picks), np.stack([cache.image(i) for i in picks]))
    np.testing.assert_array_equal(cache.masks(picks), np.stack([cache.mask(i) for i in picks]))

    summary = cache.summary()
    assert "144 slices from 3 cases" in summary and str(cache.path) in summary and "\n" not in summary
    assert f"{int(data['labels'].sum())} with liver" in summary
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.image(7), cache.image(7))
    cache.close()


def test_cache_is_reused_and_keyed_on_inputs_and_settings(synthetic_root, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root("pairs"), root)
    first = prepare_dataset(root, SMALL, cache_dir=tmp_path / "c", progress=False)

    def must_not_read(*args, **kwargs):
        raise AssertionError("an unchanged dataset must not be read again")

    with monkeypatch.context() as m:
        m.setattr(cache_module, "load_case", must_not_read)
        again = prepare_dataset(root, SMALL, cache_dir=tmp_path / "c", progress=False)  # timed in benchmarks/cache_bench.py
    assert again.path == first.path

    other = prepare_dataset(root, PrepConfig(size=24), cache_dir=tmp_path / "c", progress=False)
    assert other.path != first.path and other.image(0).shape == (24, 24)
    stamp = os.stat(root / "case001.nii.gz").st_mtime_ns
    os.utime(root / "case001.nii.gz", ns=(stamp + 10**9, stamp + 10**9))
    touched = prepare_dataset(root, SMALL, cache_dir=tmp_path / "c", progress=False)
    assert touched.path != first.path
    assert len(list((tmp_path / "c").glob("*.h5"))) == 3

    monkeypatch.setenv("SAMMIX_CACHE", str(tmp_path / "env"))
    from_env = prepare_dataset(root, SMALL, progress=False)
    assert from_env.path.parent == tmp_path / "env"


def test_interrupted_prepare_leaves_no_cache_file(synthetic_root, tmp_path, monkeypatch):
    real = cache_module.load_case
    calls = []

    def fail_on_second(record, organ):
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(record, organ)

    monkeypatch.setattr(cache_module, "load_case", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(synthetic_root("lits"), SMALL, cache_dir=tmp_path / "c", progress=False)
    assert len(calls) == 2
    assert list((tmp_path / "c").iterdir()) == []


def test_slices_are_used_as_they_are_and_middle_fraction_applies_to_volumes(synthetic_root, tmp_path):
    slices = synthetic_root("slices")
    for win in [(40.0, 400.0), None]:
        cache = prepare_dataset(slices, PrepConfig(size=64, window=win), cache_dir=tmp_path, progress=False)
        first = list_cases(slices)[0]
        np.testing.assert_array_equal(cache.image(0), read_image2d(first.image))
        assert (cache.case[0], cache.slice_index[0]) == ("synth000", 0)
        assert cache.has_mask.all() and np.isnan(cache.spacing).all()

    cache = prepare_dataset(synthetic_root("totalseg"), PrepConfig(size=32, middle_fraction=0.5),
                            cache_dir=tmp_path, progress=False)
    idx = cache.indices_for_cases(["s0000"])
    np.testing.assert_array_equal(cache.slice_index[idx], np.arange(12, 36))


def test_unlabelled_dicom_slices_have_no_masks(synthetic_root, tmp_path):
    cache = prepare_dataset(synthetic_root("dicom"), SMALL, cache_dir=tmp_path, progress=False)
    assert len(cache) == 3 * 48 and not cache.has_mask.any() and not cache.masks(range(len(cache))).any()
    assert "no masks" in cache.summary()


# --- the `sammix prepare` command ------------------------------------------------------------------

@pytest.mark.parametrize("folder,slices", [("lits-slices", 442), ("lits-117", 128), ("totalseg-example", 112),
                                           ("chaos-ct3", 78)])
def test_cli_prepare_on_real_data(shared_data, tmp_path, capsys, folder, slices):
    code = main(["prepare", str(shared_data / folder), "--cache-dir", str(tmp_path), "--size", "64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith(f"{slices} slices from ")
    (path,) = tmp_path.glob("*.h5")
    cache = SliceCache(path)
    assert len(cache) == slices and cache.images([0]).shape == (1, 64, 64)
    if folder == "totalseg-example":
        assert int(cache.labels.sum()) == 43  # 43 slices with liver, 69 without (README)


def test_cli_prepare_rejects_broken_input_in_one_line(tmp_path, capsys, synthetic_root):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_root("lits"), broken)
    (broken / "volume-2.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    code = main(["prepare", str(broken), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert all("prepare broken" in line for line in err[:-1])  # the progress bar, then one error line
    assert err[-1].startswith("sammix prepare: error: ") and "volume-2.nii.gz" in err[-1]
    assert not list((tmp_path / "c").glob("*.h5"))

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", str(empty), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and "no known dataset layout" in err[0]
