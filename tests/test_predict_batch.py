"""`sammix predict` on many inputs (issue 13): manifests, parts, resume on the record as the commit
mark, a summary of every failure, and a bad output location or run named before any model work."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sammix.cli import main
from sammix.config import RunConfig
from sammix.data.synthetic import synthetic_ct, write_dicom_series
from sammix.errors import InputError, SammixError
from sammix.inference.batch import Job, is_done, plan_jobs, read_manifest, run_key, scans, select_part


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # planning reads names only
    return path


@pytest.fixture
def tree(tmp_path):
    """Inputs of every kind, names shared across folders, a manifest with names, a bad row."""
    root = tmp_path / "in"
    for name in ["a/ct.nii.gz", "b/ct.nii.gz", "b/scan.nrrd", "c/slice.png", "c/notes.txt", "ct.nii.gz"]:
        _touch(root / name)
    hu, _, affine = synthetic_ct(shape=(8, 8, 3))
    write_dicom_series(root / "c" / "series", hu, affine)
    _touch(tmp_path / "listed" / "p1.nii.gz")
    _touch(tmp_path / "listed" / "p2.nii.gz")
    manifest = tmp_path / "listed" / "cases.csv"
    manifest.write_text("input,output\np1.nii.gz,patient-one.nii.gz\n\np2.nii.gz\nmissing.nii.gz,x\n")
    return root, manifest


def test_manifest_rows_relative_to_the_csv_and_bad_rows_named(tmp_path, tree):
    _, manifest = tree
    assert read_manifest(manifest) == [(manifest.parent / "p1.nii.gz", "patient-one.nii.gz"),
                                       (manifest.parent / "p2.nii.gz", None),
                                       (manifest.parent / "missing.nii.gz", "x")]
    bad = tmp_path / "bad.csv"
    bad.write_text("a.nii.gz\na.nii.gz,b,c\n")
    with pytest.raises(InputError, match="line 2: expected INPUT"):
        read_manifest(bad)
    with pytest.raises(InputError, match="cannot read the manifest"):
        read_manifest(tmp_path / "none.csv")


def test_jobs_are_sorted_named_once_and_bad_inputs_are_jobs(tmp_path, tree):
    root, manifest = tree
    clash = tmp_path / "clash.csv"
    clash.write_text(f"{root / 'ct.nii.gz'},patient-one\n{root / 'c'},many\n{root / 'b/scan.nrrd'},../up\n")
    jobs = plan_jobs([root, tmp_path / "nowhere.nii.gz"], [manifest, clash], tmp_path / "out")
    assert [str(j.input) for j in jobs] == sorted(str(j.input) for j in jobs)
    named = {j.input.relative_to(tmp_path).as_posix(): j.name for j in jobs if j.error is None}
    assert named == {"in/a/ct.nii.gz": "a_ct", "in/b/ct.nii.gz": "b_ct", "in/ct.nii.gz": "in_ct",
                     "in/b/scan.nrrd": "scan", "in/c/slice.png": "slice", "in/c/series": "series",
                     "listed/p1.nii.gz": "patient-one", "listed/p2.nii.gz": "p2"}
    errors = {j.input.name: j.error for j in jobs if j.error is not None}
    assert set(errors) == {"nowhere.nii.gz", "missing.nii.gz", "c"}
    assert "no such file" in errors["nowhere.nii.gz"] and "single input" in errors["c"]
    for job in jobs:
        assert job.error is None or (str(job.input) in job.error and "\n" not in job.error)
    # the manifest names the folder input ct.nii.gz too: the first request of an input wins, and a
    # name given twice or with a path in it fails that input
    jobs = plan_jobs([], [clash, manifest], tmp_path / "out")
    errors = {j.input.name: j.error for j in jobs if j.error is not None}
    assert "taken by another input" in errors["p1.nii.gz"] and "not a plain file name" in errors["scan.nrrd"]


def test_parts_cover_every_input_exactly_once(tmp_path, tree):
    root, manifest = tree
    whole = plan_jobs([root, tmp_path / "nowhere.nii.gz"], [manifest], tmp_path / "out")
    assert len(whole) == 10
    for num_parts in (1, 2, 3, 4, 20):
        parts = [select_part(plan_jobs([root, tmp_path / "nowhere.nii.gz"], [manifest], tmp_path / "out", num_parts),
                             num_parts, i) for i in range(num_parts)]
        seen = [(j.input, j.name, j.error) for part in parts for scan in part for j in scan]
        assert len(seen) == len(set(seen)) == len(whole)  # disjoint
        assert set(seen) == {(j.input, j.name, j.error) for j in whole}  # together the whole, named alike
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for num_parts, part_id in [(2, 2), (2, -1), (0, 0)]:
        with pytest.raises(SammixError, match="--part-id"):
            select_part(whole, num_parts, part_id)


def test_the_images_of_one_scan_go_together_in_slice_order_and_in_one_part(tmp_path):
    for name in ["in/a_010.png", "in/a_002.png", "in/a_7.png", "in/b_001.png", "in/c.png", "in/d_x.png",
                 "in/e_1.png", "in/e_01.png", "in2/a_003.png", "in/ct.nii.gz"]:
        _touch(tmp_path / name)
    jobs = plan_jobs([tmp_path / "in", tmp_path / "in2"], [], tmp_path / "out")
    groups = sorted([j.input.name for j in scan] for scan in scans(jobs))
    # one folder's <case>_<slice> images are one scan, sorted by slice; another folder's are another
    # scan; a name without a slice number, or a case with one slice number twice, goes alone
    assert groups == [["a_002.png", "a_7.png", "a_010.png"], ["a_003.png"], ["b_001.png"], ["c.png"], ["ct.nii.gz"],
                      ["d_x.png"], ["e_01.png"], ["e_1.png"]]
    for num_parts in (2, 3):
        parts = [select_part(jobs, num_parts, i) for i in range(num_parts)]
        assert sorted(j.input for part in parts for scan in part for j in scan) == sorted(j.input for j in jobs)
        assert ["a_002.png", "a_7.png", "a_010.png"] in [[j.input.name for j in scan] for part in parts for scan in part]


def _run_folder(tmp_path, weights=b"not a zip") -> Path:
    run = tmp_path / "run"
    run.mkdir()
    RunConfig().save(run / "config.yaml")
    (run / "best.pt").write_bytes(weights)
    return run


def test_resume_trusts_only_a_record_of_the_same_run_settings_and_input(tmp_path):
    run = _run_folder(tmp_path)
    key = run_key(run, {"slice_step": 1})
    assert run_key(run, {"slice_step": 2}) != key
    out = tmp_path / "out"
    ct = _touch(tmp_path / "ct.nii.gz")
    job = Job(ct, "ct")
    paths = job.targets(out)
    _touch(paths["mask"])
    assert not is_done(job, out, key, preview=False)  # a mask without its record: killed before the record
    paths["record"].write_text(json.dumps({"input": str(ct.resolve()), "run_key": key}))
    assert is_done(job, out, key, preview=False)
    assert not is_done(job, out, key, preview=True)  # the preview is asked for and missing
    assert not is_done(Job(_touch(tmp_path / "other" / "ct.nii.gz"), "ct"), out, key, preview=False)
    assert not is_done(job, out, None, preview=False)
    paths["mask"].unlink()
    assert not is_done(job, out, key, preview=False)
    _touch(paths["mask"])
    paths["record"].write_text('{"input": "cut sh')
    assert not is_done(job, out, key, preview=False)
    (run / "best.pt").write_bytes(b"other weights")
    assert run_key(run, {"slice_step": 1}) != key


def _one_error_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert str(word) in err, err
    return err


def test_a_bad_output_location_is_one_line_before_any_model_work(tmp_path, capsys, read_only_folder):
    run = _run_folder(tmp_path)  # truncated weights: any model work would fail on them instead
    ct = _touch(tmp_path / "data" / "ct.nii.gz")
    for out, words in [(ct, ["is a file, not a folder"]), (ct / "masks", [f"{ct} is a file"]),
                       (read_only_folder / "masks", ["cannot write to this folder"])]:
        assert main(["predict", "--run", str(run), str(ct), "-o", str(out)]) == 2
        _one_error_line(capsys, out, *words)
    assert main(["predict", "--run", str(run), str(ct.parent), "-o", str(ct.parent)]) == 1
    err = capsys.readouterr().err
    assert "is also the output folder" in err and "truncated" not in err
    assert main(["predict", "--run", str(run), str(ct), "-o", str(ct.parent), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "would overwrite an input" in err and "truncated" not in err
    assert main(["predict", "--run", str(run), str(ct), "-o", str(tmp_path / "out"), "--num-parts", "2",
                 "--part-id", "2"]) == 2
    _one_error_line(capsys, "--part-id")


def test_truncated_weights_are_one_line_in_predict_and_evaluate(tmp_path, capsys):
    import torch

    torch.save({"model": {"classifier": {"w": torch.zeros(100_000)}}}, tmp_path / "whole.pt")
    run = _run_folder(tmp_path, weights=(tmp_path / "whole.pt").read_bytes()[:200_000])
    ct = _touch(tmp_path / "ct.nii.gz")
    assert main(["predict", "--run", str(run), str(ct), "-o", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, run / "best.pt", "truncated or corrupt")
    assert main(["evaluate", "--run", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "m.json")]) == 2
    _one_error_line(capsys, run / "best.pt", "truncated or corrupt")


@pytest.fixture(scope="module")
def gate_all_run(tmp_path_factory) -> Path:
    """An untrained run (pretrained parts, random heads) and its ONNX export, with the gate shut:
    the classifier sees every slice, SAM none (the files, not the masks' content, are under test)."""
    import torch

    from sammix.inference import export
    from sammix.models.sammix import SamMix

    run = tmp_path_factory.mktemp("gate-all")
    cfg = RunConfig()
    cfg.model.cls_threshold = 1.01
    cfg.save(run / "config.yaml")
    torch.manual_seed(0)
    torch.save({"model": SamMix(cfg.model, cfg.prep).trained_state()}, run / "best.pt")
    export.export_onnx(run)
    return run


def _summary(out: Path, name="predict-summary.json") -> dict:
    return json.loads((out / name).read_text())


@pytest.mark.slow
def test_a_batch_of_real_cts_with_a_corrupt_one_in_parts_then_resumed(shared_data, gate_all_run, tmp_path, capsys):
    totalseg, lits = shared_data / "totalseg-example" / "ct.nii.gz", shared_data / "lits-117" / "volume-117.nii.gz"
    corrupt = tmp_path / "in" / "corrupt.nii.gz"
    corrupt.parent.mkdir()
    corrupt.write_bytes(totalseg.read_bytes()[:5000])
    manifest = tmp_path / "in" / "batch.csv"
    manifest.write_text(f"input,output\n{totalseg},ts\ncorrupt.nii.gz\n{lits}\n")
    out = tmp_path / "out"
    base = ["predict", "--run", str(gate_all_run), "--manifest", str(manifest), "-o", str(out)]

    codes = [main([*base, "--num-parts", "2", "--part-id", str(i)]) for i in range(2)]
    parts = [_summary(out, f"predict-summary-part{i}of2.json") for i in range(2)]
    assert sorted(codes) == [0, 1]
    done = [p for part in parts for p in part["predicted"]]
    assert sorted(done) == sorted([str(totalseg), str(lits)])  # each good input once, by one part
    failed = [f for part in parts for f in part["failed"]]
    assert len(failed) == 1 and str(corrupt) in failed[0]["error"] and "cannot read NIfTI" in failed[0]["error"]
    err = capsys.readouterr().err
    assert "1 of 2 inputs failed" in err and err.count(failed[0]["error"]) == 2  # when it happens, and at the end
    for src, name in [(totalseg, "ts"), (lits, "volume-117")]:
        mask, image = nib.load(str(out / f"{name}.nii.gz")), nib.load(str(src))
        assert mask.shape == image.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        assert json.loads((out / f"{name}.json").read_text())["run_key"] == parts[0]["run_key"]

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("predict-summary")}
    assert main(base) == 1  # a second call does nothing new; the corrupt input still fails
    summary = _summary(out)
    assert summary["predicted"] == [] and sorted(summary["skipped"]) == sorted(done) and len(summary["failed"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamps} == stamps

    (out / "ts.json").unlink()  # killed between the mask and its record
    (out / "ts.nii.gz").write_bytes(b"half")
    stale = out / ".tmp-0badf00d-ts.nii.gz"  # killed during a write
    stale.write_bytes(b"half")
    corrupt.unlink()
    manifest.write_text(f"{totalseg},ts\n{lits}\n")
    assert main(base) == 0
    summary = _summary(out)
    assert summary["predicted"] == [str(totalseg)] and summary["skipped"] == [str(lits)] and not summary["failed"]
    assert nib.load(str(out / "ts.nii.gz")).shape == nib.load(str(totalseg)).shape and not stale.exists()
    assert main([*base, "--slice-step", "2"]) == 0  # other settings: redone
    assert sorted(_summary(out)["predicted"]) == sorted(done)
