"""Slice labels without masks (--slice-labels) and sparse annotations inside volumes
(--annotated-slices): the CSV rows, their errors, the labels they give, and a training run."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from sammix.cli import main
from sammix.config import PrepConfig, TrainConfig
from sammix.data.layouts import list_cases, load_case
from sammix.data.slice_labels import CaseSlices, label_cases, read_slice_rows
from sammix.data.synthetic import write_synthetic_dataset
from sammix.errors import InputError
from sammix.training.slices import apply_slice_labels, load_sources

PREP = PrepConfig(size=32)


def _csv(tmp_path, text: str, name: str = "labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _expect_error(fn, path, problem: str) -> None:
    with pytest.raises(InputError) as err:
        fn()
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def organ_ranges(name: str, record) -> list[str]:
    """`case,first,last` rows for the organ's slices in a case's full mask (any voxel counts)."""
    volume, mask = load_case(record)
    z = np.flatnonzero(volume.to_axial(mask).any(axis=(1, 2)))
    return [f"{name},{run[0]},{run[-1]}" for run in np.split(z, np.flatnonzero(np.diff(z) > 1) + 1)]


def image_only_copy(source, target, names: dict[str, str]):
    """The volumes of a labelled dataset as an image-only folder: `names` maps case -> new name."""
    target.mkdir()
    for record in list_cases(source):
        if record.case_id in names:
            (target / f"{names[record.case_id]}.nii.gz").symlink_to(record.image)
    return target


def paint_sparsely(root, case: str, keep) -> list[int]:
    """Erase the label volume of a synthetic pairs case (RAS: axial slice z = third axis) except on
    the organ slices `keep` picks (a function of the sorted organ slices); returns those slices."""
    path = root / f"{case}_label.nii.gz"
    img = nib.load(str(path))
    label = np.asarray(img.dataobj)
    kept = keep(np.flatnonzero(label.any(axis=(0, 1))))
    sparse = np.zeros_like(label)
    sparse[:, :, kept] = label[:, :, kept]
    nib.save(nib.Nifti1Image(sparse, img.affine), str(path))
    return [int(z) for z in kept]


# -- the CSV ---------------------------------------------------------------------------------

def test_rows_of_both_kinds_are_read_with_their_line(tmp_path):
    path = _csv(tmp_path, "case,first,last,slice,present\nvolume-1,10,20,,\n\n volume-2 ,,,7,0\nvolume-2,,,8,1\n")
    rows = read_slice_rows(path)
    assert [(r.line, r.case, r.first, r.last, r.present) for r in rows] == [
        (2, "volume-1", 10, 20, None), (4, "volume-2", 7, 7, False), (5, "volume-2", 8, 8, True)]
    assert str(rows[1]) == "labels.csv row 4"
    spreadsheet = _csv(tmp_path, "\ufeffCase, Slice, Present\na,3,1\n", "b.csv")  # a BOM, capitals, spaces
    assert [r.present for r in read_slice_rows(spreadsheet)] == [True]


@pytest.mark.parametrize("text, problem", [
    ("volume-1,10,20\n", "expected a header line: case,first,last or case,slice,present"),
    ("case,first,last\nvolume-1,10\n", "row 2: expected case,first,last or case,slice,present (last is empty)"),
    ("case,slice,present\nct01,41,\n", "row 2: expected case,first,last or case,slice,present (present is empty)"),
    ("case,first,last,slice,present\nvolume-1,10,20,3,1\n", "row 2: expected case,first,last"),
    ("case,first,last\n,10,20\n", "row 2: expected case,first,last"),
    ("case,first,last\nvolume-1,ten,20\n", "row 2: first,last must be whole numbers, got ten,20"),
    ("case,slice,present\na,1,1\na,3,2\n", "row 3: present must be 0 or 1, got 2"),
    ("case,first,last\na,20,10\n", "row 2: first slice 20 is after last slice 10"),
    ("case,slice,present\na,-1,0\n", "row 2: slice -1 is outside the volume"),
])
def test_a_bad_row_is_a_one_line_error_naming_it(tmp_path, text, problem):
    path = _csv(tmp_path, text)
    _expect_error(lambda: read_slice_rows(path), path, problem)


def test_a_missing_file_is_a_one_line_error(tmp_path):
    _expect_error(lambda: read_slice_rows(tmp_path / "nope.csv"), tmp_path / "nope.csv", "cannot read slice labels")


# -- rows -> labels ----------------------------------------------------------------------------

def _label(tmp_path, text: str, cases=None, looked_at: str | None = None):
    cases = cases or [CaseSlices("a", range(30), 30), CaseSlices("b", range(30), 30)]
    looked = read_slice_rows(_csv(tmp_path, looked_at, "looked.csv")) if looked_at else []
    label_cases(cases, read_slice_rows(_csv(tmp_path, text)), looked)
    return cases


def test_ranges_label_every_slice_and_single_slices_their_own(tmp_path):
    a, b = _label(tmp_path, "case,first,last,slice,present\na,10,12,,\na,20,21,,\nb,,,5,1\nb,,,15,1\nb,,,25,0\n"
                            "b,,,15,1\n")
    assert sorted(a.present) == list(range(30))
    assert [z for z in range(30) if a.present[z]] == [10, 11, 12, 20, 21]
    assert {z for z, p in b.present.items() if p} == set(range(5, 16))  # the z-extent between present slices
    assert b.present[25] is False and not {0, 4, 16, 24, 29} & set(b.present)  # the rest stays unknown


def test_rows_name_cases_alone_when_datasets_are_joined(tmp_path):
    x, y = _label(tmp_path, "case,slice,present\na,3,1\ny/b,4,0\n",
                  [CaseSlices("x/a", range(10), 10), CaseSlices("y/b", range(10), 10)])
    assert x.present == {3: True} and y.present == {4: False}
    path = tmp_path / "labels.csv"
    _expect_error(lambda: _label(tmp_path, "case,slice,present\na,3,1\n",
                                 [CaseSlices("x/a", range(10), 10), CaseSlices("y/a", range(10), 10)]),
                  path, "row 2: case 'a' is in several datasets (x/a, y/a)")


@pytest.mark.parametrize("text, problem", [
    ("case,first,last\na,3,5\nc,1,2\n", "row 3: case 'c' is not in the data"),
    ("case,first,last\na,25,30\n", "row 2: slice 30 is outside case a (slices 0 to 29)"),
    ("case,slice,present\nb,29,1\nb,30,0\n", "row 3: slice 30 is outside case b (slices 0 to 29)"),
    ("case,slice,present\na,5,1\na,5,0\n",
     "row 3: says the organ is absent on slice 5 of case a, but labels.csv row 2 says present"),
    ("case,first,last,slice,present\na,10,12,,\na,,,11,0\n",
     "row 2: says the organ is present on slice 11 of case a, but labels.csv row 3 says absent"),
    ("case,first,last,slice,present\na,10,12,,\na,,,20,1\n",
     "row 2: says the organ is absent on slice 20 of case a, but labels.csv row 3 says present"),
    ("case,first,last\na,10,20\nb,10,20\na,15,25\n", "row 4: range 15-25 of case a crosses labels.csv row 2 (10-20)"),
    ("case,first,last\na,10,20\na,0,10\n", "row 2: range 10-20 of case a crosses labels.csv row 3 (0-10)"),
])
def test_rows_that_do_not_fit_the_data_or_each_other_are_one_line_errors(tmp_path, text, problem):
    _expect_error(lambda: _label(tmp_path, text), tmp_path / "labels.csv", problem)


def test_a_row_against_the_label_volume_is_an_error(tmp_path):
    painted = CaseSlices("a", range(30), 30)
    painted.set(11, True)  # what the case's label volume shows
    _expect_error(lambda: _label(tmp_path, "case,slice,present\na,11,0\n", [painted]), tmp_path / "labels.csv",
                  "row 2: says the organ is absent on slice 11 of case a, but its label volume says present")


def test_looked_at_rows_record_the_organ_free_slices(tmp_path):
    (a,) = _label(tmp_path, "case,first,last\na,10,12\n", [CaseSlices("a", range(30), 30)],
                  looked_at="case,slice,present\na,3,0\na,11,1\n")
    assert a.looked_empty == {3} and a.present[3] is False and a.present[11] is True


def test_slice_folders_have_no_known_depth(tmp_path):
    (a,) = _label(tmp_path, "case,first,last\na,100,140\n", [CaseSlices("a", [90, 103, 120, 150], None)])
    assert a.present == {90: False, 103: True, 120: True, 150: False}


# -- datasets ---------------------------------------------------------------------------------

def test_ranges_over_image_only_volumes_give_the_labels_of_the_masks(tmp_path, synthetic_root, capsys):
    labelled = synthetic_root("pairs")
    raw = image_only_copy(labelled, tmp_path / "raw", {"case000": "scan-a", "case001": "scan-b", "case002": "scan-c"})
    records = {r.case_id: r for r in list_cases(labelled)}
    ranges = _csv(tmp_path, "\n".join(["case,first,last", *organ_ranges("scan-a", records["case000"]),
                                       *organ_ranges("scan-b", records["case001"])]) + "\n")
    masked = load_sources([labelled], PREP, tmp_path / "cache", masks=True)
    (image_only,) = apply_slice_labels([load_sources([raw], PREP, tmp_path / "cache", masks=True)],
                                       read_slice_rows(ranges))
    assert not image_only.has_mask.any()
    for case, name in [("case000", "scan-a"), ("case001", "scan-b")]:
        idx, ref = image_only.indices_for([name]), masked.indices_for([case])
        assert image_only.known[idx].all() and 0 < image_only.labels[idx].sum() < len(idx)
        np.testing.assert_array_equal(image_only.labels[idx], masked.labels[ref])
    assert not image_only.known[image_only.indices_for(["scan-c"])].any()  # no row: unknown, and said so
    assert "warning: 48 slices of 1 case have no mask and no slice label" in capsys.readouterr().err

    # a case the data does not hold, and a slice beyond the volume's 48
    for text, problem in [("case,first,last\nscan-d,3,5\n", "row 2: case 'scan-d' is not in the data"),
                          ("case,slice,present\nscan-a,48,0\n", "row 2: slice 48 is outside case scan-a")]:
        bad = _csv(tmp_path, text, "bad.csv")
        _expect_error(lambda: apply_slice_labels([image_only], read_slice_rows(bad)), bad, problem)


def test_sparse_annotations_label_painted_slices_and_their_extent(tmp_path, synthetic_root, capsys):
    root = tmp_path / "painted"
    shutil.copytree(synthetic_root("pairs"), root)
    painted = paint_sparsely(root, "case000", lambda organ: organ[[2, len(organ) // 2, -3]])
    organ = np.flatnonzero(nib.load(str(synthetic_root("pairs") / "case000_label.nii.gz")).get_fdata().any((0, 1)))
    looked = _csv(tmp_path, f"case,slice,present\ncase000,{organ[0] - 3},0\ncase000,{painted[1]},1\n", "looked.csv")
    ranges = _csv(tmp_path, "\n".join(["case,first,last", *organ_ranges("case001", list_cases(root)[1])]) + "\n")
    data = load_sources([root], PREP, tmp_path / "cache", masks=True)
    (sparse,) = apply_slice_labels([data], read_slice_rows(ranges), read_slice_rows(looked))

    idx = sparse.indices_for(["case000"])
    z = sparse.slice_index[idx]
    np.testing.assert_array_equal(z[sparse.has_mask[idx]], sorted([*painted, organ[0] - 3]))
    assert (sparse.labels[idx][np.isin(z, painted)] == 1).all()
    np.testing.assert_array_equal(z[sparse.known[idx]], [organ[0] - 3, *range(painted[0], painted[-1] + 1)])
    assert (sparse.labels[idx][(z >= painted[0]) & (z <= painted[-1])] == 1).all()  # the painted z-extent
    assert not sparse.masks[idx][z == organ[0] - 3].any()  # a looked-at slice without organ: an empty mask

    full = sparse.indices_for(["case001"])  # a full label volume and its range: every slice labelled
    assert sparse.known[full].all()
    np.testing.assert_array_equal(sparse.labels[full], data.labels[full])
    np.testing.assert_array_equal(sparse.has_mask[full], data.labels[full] > 0)  # only its painted slices
    assert "slices of 2 cases have no mask and no slice label" in capsys.readouterr().err  # case000, case002

    wrong = _csv(tmp_path, f"case,slice,present\ncase000,{painted[0]},0\n", "wrong.csv")
    _expect_error(lambda: apply_slice_labels([data], [], read_slice_rows(wrong)), wrong,
                  f"row 2: says the organ is absent on slice {painted[0]} of case case000, but its label volume")


def test_real_ct_as_image_only_volumes_with_ranges_from_their_masks(shared_data, tmp_path):
    """lits-117 and totalseg-example without their labels, and ranges derived from those labels:
    the slice labels equal the ones the masks give (default 256-pixel slices)."""
    sources = {"lits117": shared_data / "lits-117", "totalseg": shared_data / "totalseg-example"}
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = ["case,first,last"]
    for name, folder in sources.items():
        (record,) = list_cases(folder)
        (raw / f"{name}.nii.gz").symlink_to(record.image)
        lines += organ_ranges(name, record)
    ranges = _csv(tmp_path, "\n".join(lines) + "\n")
    prep, cache = PrepConfig(), tmp_path / "cache"
    (image_only,) = apply_slice_labels([load_sources([raw], prep, cache, masks=True)], read_slice_rows(ranges))
    assert image_only.known.all() and not image_only.has_mask.any()
    for name, folder in sources.items():
        masked = load_sources([folder], prep, cache, masks=True)
        idx = image_only.indices_for([name])
        np.testing.assert_array_equal(image_only.slice_index[idx], masked.slice_index)
        np.testing.assert_array_equal(image_only.labels[idx], masked.labels)
    totalseg = image_only.labels[image_only.indices_for(["totalseg"])]
    assert (len(totalseg), int(totalseg.sum())) == (112, 43)  # as the data README counts them


# -- the command ------------------------------------------------------------------------------

def test_train_rejects_a_bad_row_in_one_line(tmp_path, synthetic_root, capsys):
    raw = image_only_copy(synthetic_root("pairs"), tmp_path / "raw", {"case000": "scan-a"})
    bad = _csv(tmp_path, "case,first,last\nscan-a,10,20\nscan-a,20,30\n")
    code = main(["train", "--data", str(raw), "--slice-labels", str(bad), "--out", str(tmp_path / "run"),
                 "--size", "32", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (f"sammix train: error: {bad}: row 3: range 20-30 of case scan-a crosses "
                                     "labels.csv row 2 (10-20)")


@pytest.mark.slow
def test_train_from_ranges_and_sparse_annotations(tmp_path):
    """The few-label path: 4 CTs painted on 3 slices each (one looked-at slice without liver), 2 more
    with liver ranges alone; one epoch with tiny settings, then the default self-training round, leaves a
    complete run folder."""
    painted = write_synthetic_dataset(tmp_path / "painted", "pairs", n_cases=4, shape=(64, 64, 24))
    looked, marked = ["case,slice,present"], {}
    for i in range(4):
        marked[f"case{i:03d}"] = paint_sparsely(painted, f"case{i:03d}", lambda organ: organ[[0, len(organ) // 2, -1]])
        looked.append(f"case{i:03d},0,0")
    scans = write_synthetic_dataset(tmp_path / "scans", "pairs", n_cases=2, shape=(64, 64, 24), seed=10)
    raw = image_only_copy(scans, tmp_path / "raw", {"case000": "scan-a", "case001": "scan-b"})
    ranges = ["case,first,last", *organ_ranges("scan-a", list_cases(scans)[0]),
              *organ_ranges("scan-b", list_cases(scans)[1])]
    run = tmp_path / "run"
    assert main(["train", "--data", str(painted), "--data", str(raw),
                 "--slice-labels", str(_csv(tmp_path, "\n".join(ranges) + "\n")),
                 "--annotated-slices", str(_csv(tmp_path, "\n".join(looked) + "\n", "looked.csv")),
                 "--out", str(run), "--epochs", "1", "--batch-size", "2", "--size", "64", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache"), "--set", "train.cls_batch_size=8",
                 "--set", "train.sam_samples_per_epoch=2", "--set", "train.val_max_slices=2",
                 "--set", "train.val_fraction=0.2", "--set", "train.test_fraction=0.2"]) == 0
    for name in ["config.yaml", "split.json", "labeled.json", "log.jsonl", "best.pt", "last.pt"]:
        assert (run / name).is_file(), name
    train_cases = json.loads((run / "split.json").read_text())["train"]
    labeled = {(row["case"], row["slice"]) for row in json.loads((run / "labeled.json").read_text())}
    expected = {(f"painted/{case}", z) for case, zs in marked.items() for z in zs if f"painted/{case}" in train_cases}
    assert labeled == expected and expected  # every painted slice of the training cases, no other
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in rows if r.get("epoch") == 1]
    assert np.isfinite(epoch["cls_loss"]) and np.isfinite(epoch["sam_loss"])
    # with this few labelled slices self-training follows by default, on every slice without a mask
    (round_row,) = [r for r in rows if "self_training_round" in r]
    assert round_row["pool"] > 0 and max(r.get("epoch", 0) for r in rows) == 1 + TrainConfig().self_train_epochs


@pytest.mark.slow
def test_ranges_and_sparse_masks_train_the_same_model_as_full_masks(tmp_path):
    """Issue 12's check, by construction: the k slices a full-mask run labels, painted alone in the
    training CTs, with liver ranges for the rest of them, train exactly the same weights (so the
    same Dice) as the full label volumes do. Validation and test cases stay fully painted."""
    full = write_synthetic_dataset(tmp_path / "full", "pairs", n_cases=4, shape=(64, 64, 24))
    tiny = ["--epochs", "1", "--batch-size", "2", "--size", "64", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--set", "train.cls_batch_size=8",
            "--set", "train.sam_samples_per_epoch=2", "--set", "train.val_max_slices=2",
            "--set", "train.val_fraction=0.25", "--set", "train.test_fraction=0.25"]
    assert main(["train", "--data", str(full), "--labeled", "3", "--out", str(tmp_path / "full-run"), *tiny]) == 0
    labeled = json.loads((tmp_path / "full-run" / "labeled.json").read_text())
    train_cases = json.loads((tmp_path / "full-run" / "split.json").read_text())["train"]

    sparse = tmp_path / "sparse"
    shutil.copytree(full, sparse)
    ranges = ["case,first,last"]
    for record in list_cases(full):
        if record.case_id in train_cases:
            ranges += organ_ranges(record.case_id, record)
            keep = {row["slice"] for row in labeled if row["case"] == record.case_id}
            assert paint_sparsely(sparse, record.case_id, lambda organ: [z for z in organ if z in keep]) == sorted(keep)
    assert main(["train", "--data", str(sparse), "--slice-labels", str(_csv(tmp_path, "\n".join(ranges) + "\n")),
                 "--annotated-slices", str(_csv(tmp_path, "case,slice,present\n", "looked.csv")),
                 "--out", str(tmp_path / "sparse-run"), *tiny]) == 0

    assert json.loads((tmp_path / "sparse-run" / "labeled.json").read_text()) == labeled
    ours, ref = (torch.load(tmp_path / run / "best.pt", map_location="cpu", weights_only=False)["model"]
                 for run in ("sparse-run", "full-run"))
    for part in ("classifier", "sam"):
        for key in ref[part]:
            assert torch.equal(ours[part][key], ref[part][key]), f"{part}.{key} differs"
    assert ours["cls_threshold"] == ref["cls_threshold"] and ours.get("cam_threshold") == ref.get("cam_threshold")
