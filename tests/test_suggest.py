"""`sammix suggest`: the picks (spread over cases and slices, doubt first), what it writes (CTs with
their geometry, label volumes to paint, the CSVs), its errors, and the labels coming back to train."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from sammix.cli import main
from sammix.config import PrepConfig, RunConfig
from sammix.data.io import read_volume
from sammix.data.layouts import detect_layout, list_cases, load_case
from sammix.data.synthetic import write_synthetic_dataset
from sammix.errors import InputError
from sammix.suggest import pick, suggest
from test_slice_labels import image_only_copy, organ_ranges

SMALL = ["--size", "32"]


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _scans(tmp_path, synthetic_root, n_cases: int = 3, **options):
    """Image-only copies of synthetic pairs (scan-0, scan-1, ...) and the records with their masks."""
    labelled = synthetic_root("pairs", n_cases, **options)
    names = {f"case{i:03d}": f"scan-{i}" for i in range(n_cases)}
    raw = image_only_copy(labelled, tmp_path / "raw", names)
    return raw, {names[r.case_id]: r for r in list_cases(labelled)}


def _organ(record) -> set[int]:
    volume, mask = load_case(record)
    return {int(z) for z in np.flatnonzero(volume.to_axial(mask).any(axis=(1, 2)))}


def _ranges(tmp_path, records, name: str = "ranges.csv") -> str:
    return _write(tmp_path / name, ["case,first,last", *[line for case, rec in records.items()
                                                         for line in organ_ranges(case, rec)]])


# -- the picks ----------------------------------------------------------------------------------

def test_picks_cover_the_cases_in_turn_and_keep_apart_in_each():
    case = np.repeat(["a", "b", "c"], 20)
    z = np.tile(np.arange(20), 3)
    features = np.random.default_rng(0).normal(size=(60, 8))
    chosen, spread = pick(case, z, features, np.zeros(60), n=8, min_gap=4)
    assert len(chosen) == 8 and len(set(chosen)) == 8 and all(0 <= s <= 1 for s in spread)
    assert sorted(case[chosen[:3]]) == ["a", "b", "c"] and sorted(case[chosen[3:6]]) == ["a", "b", "c"]
    for c in "abc":
        picked = np.sort(z[[i for i in chosen if case[i] == c]])
        assert (np.diff(picked) >= 4).all()


def test_picks_take_the_most_doubtful_first_and_stop_when_nothing_is_far_enough():
    case, z = np.array(["a"] * 10), np.arange(10)
    doubt = np.zeros(10)
    doubt[6] = 5.0
    chosen, _ = pick(case, z, np.eye(10), doubt, n=10, min_gap=3, labelled=z == 1)
    assert [z[i] for i in chosen] == [6, 9]  # 0-3 are near the labelled slice, 4-8 near the first pick


def test_picks_stand_for_the_whole_case_not_its_odd_ends():
    """Features that change along the slices (as anatomy does): the first pick is the middle one,
    the next two stand for the halves on either side (their medians, near 6 and 33: the 3-median
    of 0..40), not the ends; a labelled slice counts as a pick."""
    z = np.arange(41)
    chosen, _ = pick(np.array(["a"] * 41), z, z[:, None], np.zeros(41), n=3, min_gap=1)
    assert z[chosen[0]] == 20 and sorted(z[chosen[1:]]) == [6, 33]
    chosen, _ = pick(np.array(["a"] * 41), z, z[:, None], np.zeros(41), n=1, min_gap=1, labelled=z == 20)
    assert z[chosen[0]] in (6, 34)


def test_identical_features_still_give_distinct_picks():
    chosen, _ = pick(np.array(["a"] * 6), np.arange(6), np.ones((6, 3)), np.zeros(6), n=3, min_gap=2)
    assert len(chosen) == 3 and (np.diff(np.sort(chosen)) >= 2).all()


# -- what it writes -------------------------------------------------------------------------------

def test_suggest_without_a_run_writes_the_cases_to_paint(tmp_path, synthetic_root):
    """Image-only volumes (stored LPS, so the slice order matters) with liver ranges for two of
    three: the picks lie in the ranges (and anywhere in the third), spread, and every case comes
    out with its geometry; slices already looked at are not suggested again."""
    raw, records = _scans(tmp_path, synthetic_root, axcodes=("L", "P", "S"))
    ranges = _ranges(tmp_path, {k: v for k, v in records.items() if k != "scan-2"})
    organ = {case: _organ(record) for case, record in records.items()}
    looked = _write(tmp_path / "looked.csv", ["case,slice,present", f"scan-0,{min(organ['scan-0']) + 2},1"])
    out = tmp_path / "out"
    assert main(["suggest", "--data", str(raw), "-n", "7", "-o", str(out), "--slice-labels", ranges,
                 "--annotated-slices", looked, "--min-gap", "3", "--cache-dir", str(tmp_path / "cache"),
                 *SMALL]) == 0

    table = _rows(out / "suggested.csv")
    picks = [(r["case"], int(r["slice"])) for r in table]
    assert len(picks) == 7 and picks == sorted(picks)
    assert sorted(sum(c == f"scan-{i}" for c, _ in picks) for i in range(3)) == [2, 2, 3]  # the cases in turn
    assert sorted(int(r["rank"]) for r in table) == list(range(1, 8))
    for case, z in picks:
        assert case == "scan-2" or z in organ[case]
        assert all(abs(z - other) >= 3 for c, other in picks if c == case and other != z)
    assert all(abs(z - (min(organ["scan-0"]) + 2)) >= 3 for c, z in picks if c == "scan-0")
    assert {r["file"] for r in table} == {f"{c}/ct.nii.gz" for c, _ in picks}
    assert all(r["sam_iou"] == "" and float(r["doubt"]) == 0 for r in table)  # no run: no doubt

    annotated = [(r["case"], int(r["slice"]), r["present"]) for r in _rows(out / "annotated.csv")]
    assert annotated == sorted([*[(c, z, "") for c, z in picks], ("scan-0", min(organ["scan-0"]) + 2, "1")])
    assert (out / "montage.png").stat().st_size > 0
    assert detect_layout(out) == "totalseg"
    for case in records:
        ct, label = nib.load(str(out / case / "ct.nii.gz")), nib.load(str(out / case / "segmentations/liver.nii.gz"))
        source = nib.load(str(raw / f"{case}.nii.gz"))
        assert (out / case / "ct.nii.gz").resolve() == (raw / f"{case}.nii.gz").resolve()  # the input, linked
        assert ct.shape == label.shape == source.shape
        np.testing.assert_allclose(label.affine, source.affine, atol=1e-5)
        assert label.get_data_dtype() == np.uint8 and not np.asarray(label.dataobj).any()


def test_dicom_series_come_out_as_nifti_with_their_geometry(tmp_path, synthetic_root):
    dicom = synthetic_root("dicom", 2, shape=(48, 48, 16))
    out = tmp_path / "out"
    suggest([dicom], out, n=2, prep=PrepConfig(size=32), cache_dir=tmp_path / "cache")
    for record in list_cases(dicom):
        volume, written = read_volume(record.image), nib.load(str(out / record.case_id / "ct.nii.gz"))
        assert written.shape == volume.data.shape and written.get_data_dtype() == np.int16
        np.testing.assert_allclose(written.affine, volume.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(written.dataobj), volume.data)
        label = nib.load(str(out / record.case_id / "segmentations/liver.nii.gz"))
        np.testing.assert_allclose(label.affine, written.affine, atol=1e-6)


def test_2d_slices_come_out_as_images_with_an_empty_masks_folder(tmp_path, synthetic_root):
    slices = synthetic_root("slices", 2, shape=(48, 48, 32))
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    for image in (slices / "images").iterdir():
        (raw / "images" / image.name).symlink_to(image)
    out = tmp_path / "out"
    table = suggest([raw], out, n=3, prep=PrepConfig(size=32), cache_dir=tmp_path / "cache", min_gap=4)
    assert len(table) == 3 and not (out / "annotated.csv").exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r["file"].split("/")[1] for r in table)
    assert (out / "masks").is_dir() and not any((out / "masks").iterdir())
    for row in table:
        assert row["file"] == f"images/{row['case']}_{row['slice']:03d}.png"


def test_real_ct_as_in_the_readme(shared_data, tmp_path):
    """The README's first suggest on lits-117 and totalseg-example without their masks (64-pixel
    slices here): its ranges are those of the masks, and the picks lie in them, 4 per scan."""
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "lits117.nii.gz").symlink_to(shared_data / "lits-117" / "volume-117.nii.gz")
    (scans / "totalseg.nii.gz").symlink_to(shared_data / "totalseg-example" / "ct.nii.gz")
    ranges = _write(tmp_path / "ranges.csv", ["case,first,last", "lits117,0,127", "totalseg,69,111"])
    assert organ_ranges("lits117", list_cases(shared_data / "lits-117")[0]) == ["lits117,0,127"]
    assert organ_ranges("totalseg", list_cases(shared_data / "totalseg-example")[0]) == ["totalseg,69,111"]
    out = tmp_path / "todo"
    table = suggest([scans], out, n=8, prep=PrepConfig(size=64), slice_labels=ranges, cache_dir=tmp_path / "cache")
    assert sorted(r["case"] for r in table) == ["lits117"] * 4 + ["totalseg"] * 4
    assert all(69 <= r["slice"] <= 111 for r in table if r["case"] == "totalseg")
    for case in ("lits117", "totalseg"):
        picked = sorted(r["slice"] for r in table if r["case"] == case)
        assert (np.diff(picked) >= 5).all()
        source = nib.load(str(scans / f"{case}.nii.gz"))
        label = nib.load(str(out / case / "segmentations" / "liver.nii.gz"))
        assert label.shape == source.shape and np.allclose(label.affine, source.affine)


# -- errors ----------------------------------------------------------------------------------------

def test_an_existing_folder_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "suggested.csv").write_text("case,slice\n")
    assert main(["suggest", "--data", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"sammix suggest: error: {out}: exists and is not empty (painted labels there?); "
                   "choose a new folder or --overwrite")
    assert main(["suggest", "--data", str(tmp_path), "-o", str(tmp_path / "inside")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"overlaps the input {tmp_path}; write the suggestions elsewhere")
    assert main(["suggest", "--data", str(tmp_path), "-o", str(out), "--overwrite", "--prefill"]) == 2
    assert "--prefill needs --run" in capsys.readouterr().err


def test_a_suggest_folder_needs_its_annotated_slices(tmp_path, synthetic_root, capsys):
    raw, _ = _scans(tmp_path, synthetic_root)
    out = tmp_path / "out"
    suggest([raw], out, n=2, prep=PrepConfig(size=32), cache_dir=tmp_path / "cache")
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                 *SMALL]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sammix train: error: {out}: its label volumes are painted on the suggested slices only: give "
        f"--annotated-slices {out / 'annotated.csv'}")
    assert main(["suggest", "--data", str(out), "-o", str(tmp_path / "again"), "--cache-dir", str(tmp_path / "cache"),
                 *SMALL]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"sammix suggest: error: {out}: its label volumes are painted on the suggested slices only")


def test_painted_slices_come_back_with_a_note_for_those_not_suggested(tmp_path, synthetic_root, capsys):
    """What train reads from a suggest folder: the painted slices are the labelled ones, a slice
    painted without being suggested is allowed and noted, a label volume off its CT's grid is an error."""
    from sammix.training.slices import load_training_sources

    raw, records = _scans(tmp_path, synthetic_root)
    out = tmp_path / "out"
    table = suggest([raw], out, n=3, prep=PrepConfig(size=32), slice_labels=_ranges(tmp_path, records),
                    cache_dir=tmp_path / "cache")
    extra = next(z for z in sorted(_organ(records["scan-0"])) if all(abs(z - r["slice"]) > 1 for r in table))
    paint(out, records, [*table, {"case": "scan-0", "slice": extra}])
    cfg = RunConfig(prep=PrepConfig(size=32), data=[str(out)], annotated_slices=str(out / "annotated.csv"))
    data, _ = load_training_sources(cfg, tmp_path / "cache")
    assert sorted(zip(data.case[data.has_mask], data.slice_index[data.has_mask])) == \
        sorted([(r["case"], r["slice"]) for r in table] + [("scan-0", extra)])
    assert f"note: {out}: 1 painted slice that suggest did not ask for (scan-0 {extra}): labelled slices too" \
        in capsys.readouterr().err

    label = out / "scan-1" / "segmentations" / "liver.nii.gz"
    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([1, 1, 2, 1])), str(label))
    with pytest.raises(InputError, match=f"^{label}: label geometry \\(affine\\) differs from image ct.nii.gz"):
        load_training_sources(cfg, tmp_path / "cache")


# -- with a run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The untrained model (pretrained parts, random heads) on 32-pixel slices, as a run folder."""
    from sammix.models.sammix import SamMix

    run = tmp_path_factory.mktemp("tiny-run")
    torch.manual_seed(0)
    cfg = RunConfig(prep=PrepConfig(size=32))
    cfg.save(run / "config.yaml")
    torch.save({"model": SamMix(cfg.model, cfg.prep).trained_state()}, run / "best.pt")
    return run


def test_with_a_run_the_doubt_counts_and_prefill_paints_the_suggested_slices_only(tmp_path, synthetic_root,
                                                                                   tiny_run):
    """Two slices per case for SAM (the encoder costs seconds a slice); the volumes are stored
    (P, I, R), so the label's slices must be mapped back through the orientation."""
    raw, records = _scans(tmp_path, synthetic_root, 2, axcodes=("P", "I", "R"), shape=(48, 48, 20))
    lines = ["case,first,last"]
    for case, record in records.items():
        first, last = (int(v) for v in organ_ranges(case, record)[0].split(",")[1:])
        lines.append(f"{case},{(first + last) // 2},{(first + last) // 2 + 1}")
    out = tmp_path / "out"
    table = suggest([raw], out, n=4, run=tiny_run, slice_labels=_write(tmp_path / "r.csv", lines), min_gap=1,
                    prefill=True, cache_dir=tmp_path / "cache", device="cpu")
    assert len(table) == 4
    for row in table:
        assert 0 <= row["sam_iou"] <= 1 and 0 <= row["box_iou"] <= 1 and 0 <= row["neighbour_dice"] <= 1
        assert row["doubt"] == pytest.approx(np.mean([1 - row[k] for k in ("sam_iou", "box_iou", "neighbour_dice")]))
    for case in records:
        label = np.asarray(nib.load(str(out / case / "segmentations/liver.nii.gz")).dataobj)
        depth = label.shape[1]  # stored axis 1 runs inferior: axial slice z is index depth - 1 - z
        painted = {depth - 1 - int(i) for i in np.flatnonzero(label.any(axis=(0, 2)))}
        assert painted == {row["slice"] for row in table if row["case"] == case}


# -- the whole path ------------------------------------------------------------------------------

def paint(out, records, table) -> None:
    """Stand in for a person: the true masks on the suggested slices of OUT's label volumes, and
    annotated.csv filled in."""
    for case, record in records.items():
        volume, truth = load_case(record)
        path = out / case / "segmentations" / "liver.nii.gz"
        img = nib.load(str(path))
        label = volume.to_axial(np.asarray(img.dataobj))
        for row in table:
            if row["case"] == case:
                label[row["slice"]] = volume.to_axial(truth)[row["slice"]]
        nib.save(nib.Nifti1Image(volume.from_axial(label).astype(np.uint8), img.affine), str(path))
    rows = _rows(out / "annotated.csv")
    for row in rows:
        volume, truth = load_case(records[row["case"]])
        row["present"] = row["present"] or int(volume.to_axial(truth)[int(row["slice"])].any())
    _write(out / "annotated.csv", ["case,slice,present", *[f"{r['case']},{r['slice']},{r['present']}" for r in rows]])


@pytest.mark.slow
def test_from_raw_scans_to_masks(tmp_path, capsys):
    """The README's path on small data: image-only CTs with liver ranges -> suggest -> the true
    masks painted on the suggested slices -> train (1 epoch, tiny) -> suggest again with the run,
    prefilled -> predict."""
    labelled = write_synthetic_dataset(tmp_path / "labelled", "pairs", n_cases=4, shape=(64, 64, 16))
    names = {f"case{i:03d}": f"ct{i}" for i in range(4)}
    raw = image_only_copy(labelled, tmp_path / "scans", names)
    records = {names[r.case_id]: r for r in list_cases(labelled)}
    ranges, cache = _ranges(tmp_path, records), str(tmp_path / "cache")
    tiny = ["--size", "64", "--cache-dir", cache]
    first = tmp_path / "todo"
    assert main(["suggest", "--data", str(raw), "--slice-labels", ranges, "-n", "8", "--min-gap", "3",
                 "-o", str(first), *tiny]) == 0
    table = [{**r, "slice": int(r["slice"])} for r in _rows(first / "suggested.csv")]
    paint(first, records, table)
    run = tmp_path / "run"
    assert main(["train", "--data", str(first), "--slice-labels", ranges, "--annotated-slices",
                 str(first / "annotated.csv"), "--out", str(run), "--epochs", "1", "--batch-size", "2",
                 "--device", "cpu", *tiny, "--set", "train.cls_batch_size=8", "--set", "train.sam_samples_per_epoch=2",
                 "--set", "train.val_max_slices=2", "--set", "train.val_fraction=0.25",
                 "--set", "train.test_fraction=0.25"]) == 0
    labeled = {(r["case"], r["slice"]) for r in json.loads((run / "labeled.json").read_text())}
    train_cases = json.loads((run / "split.json").read_text())["train"]
    assert labeled == {(r["case"], r["slice"]) for r in table if r["case"] in train_cases} and labeled

    second = tmp_path / "todo2"
    assert main(["suggest", "--data", str(first), "--run", str(run), "--slice-labels", ranges, "--annotated-slices",
                 str(first / "annotated.csv"), "-n", "4", "--min-gap", "1", "--prefill", "--device", "cpu",
                 "-o", str(second), "--cache-dir", cache]) == 0
    again = [(r["case"], int(r["slice"])) for r in _rows(second / "suggested.csv")]
    assert len(again) == 4 and not set(again) & {(r["case"], r["slice"]) for r in table}
    assert {(r["case"], int(r["slice"])) for r in _rows(second / "annotated.csv") if r["present"]} == \
        {(r["case"], r["slice"]) for r in table}  # the first round's rows, carried over
    for case, record in records.items():  # the first round's paint is kept, the new slices prefilled
        volume, _ = load_case(record)
        before = volume.to_axial(np.asarray(nib.load(str(first / case / "segmentations/liver.nii.gz")).dataobj))
        after = volume.to_axial(np.asarray(nib.load(str(second / case / "segmentations/liver.nii.gz")).dataobj))
        np.testing.assert_array_equal(after[before.any(axis=(1, 2))], before[before.any(axis=(1, 2))])
        new = {z for c, z in again if c == case}
        assert set(np.flatnonzero(after.any(axis=(1, 2)))) - set(np.flatnonzero(before.any(axis=(1, 2)))) <= new

    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(raw / "ct0.nii.gz"), "-o", str(tmp_path / "masks"),
                 "--device", "cpu"]) == 0
    mask = nib.load(str(tmp_path / "masks" / "ct0.nii.gz"))
    assert mask.shape == nib.load(str(records["ct0"].image)).shape
