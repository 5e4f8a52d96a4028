"""ONNX export (`sammix export`): every graph agrees with PyTorch, and the fast engines give the
masks of `SamMix.predict_slices`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sammix.data.io import Volume, read_volume
from sammix.data.preprocess import resize_image, volume_to_unit
from sammix.data.synthetic import synthetic_ct
from sammix.inference.engine import Engine
from sammix.inference.export import INT8_MAX_REL_ERROR, model_key
from sammix.inference.sessions import FILES, onnx_session
from sammix.models.inferer import SliceInferer
from sammix.models.sammix import SamMix

pytestmark = pytest.mark.slow  # the real pretrained models


@pytest.fixture(scope="module")
def run(untrained_run) -> Path:
    return untrained_run


@pytest.fixture(scope="module")
def model(run) -> SamMix:
    return SamMix.load(run, device="cpu")


def _slices(shared: Path | None, n: int = 3) -> torch.Tensor:
    """Slices through the liver the export check did not see: the TotalSegmentator CT when the
    shared data is there, else a synthetic CT of another seed."""
    if shared is not None and (shared / "totalseg-example" / "ct.nii.gz").is_file():
        axial = read_volume(shared / "totalseg-example" / "ct.nii.gz").axial()
        picks = axial[[60, 75, 90][:n]]
    else:
        hu, _, affine = synthetic_ct((80, 72, 10), (2.0, 2.0, 5.0), seed=7)
        picks = Volume(hu, affine, Path("synthetic")).axial()[[4, 6, 8][:n]]
    unit = volume_to_unit(picks, (40.0, 400.0))
    return torch.from_numpy(np.stack([resize_image(s, 256) for s in unit]))[:, None]


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    return _slices(shared if shared.is_dir() else None)


def test_export_writes_the_graphs_checked_against_pytorch(run, model):
    folder = run / "onnx"
    manifest = json.loads((folder / "export.json").read_text())
    assert all((folder / f).is_file() for f in FILES.values())
    assert manifest["key"] == model_key(model)  # the export belongs to exactly these weights


def test_onnx_graphs_agree_with_pytorch_on_other_slices(run, model, slices):
    folder = run / "onnx"
    with torch.no_grad():
        ref_logits, ref_cams = model.prompter.compute(slices)  # GradCAM by autograd
        logits, cams = onnx_session(folder / FILES["classifier"]).run(None, {"slices": slices.numpy()})
        assert np.abs(logits - ref_logits.numpy()).max() < 1e-3
        assert np.abs(cams - ref_cams.numpy()).max() < 1e-3

        x = slices[1:2]
        emb_ref = model.sam.encode(x)  # LoRA not merged, BatchNorm not fused
        (emb,) = onnx_session(folder / FILES["encoder"]).run(None, {"slices": x.numpy()})
        assert np.abs(emb - emb_ref.numpy()).max() < 1e-3

        boxes, prompts = model.prompter.prompts(ref_cams[1:2])
        masks_ref, scores_ref = model.sam.decode(emb_ref, boxes, prompts, multimask=True, size=256)
        feeds = {"embeddings": emb_ref.numpy(), "box": boxes.numpy()}
        if prompts is not None:  # the run's mask_prompt "none" exports a box-only decoder
            feeds["mask_prompt"] = prompts.numpy()
        masks, scores = onnx_session(folder / FILES["decoder"]).run(None, feeds)
        assert masks.shape == (1, 3, 256, 256)
        assert np.abs(masks - masks_ref.numpy()).max() < 1e-2
        assert np.abs(scores - scores_ref.numpy()).max() < 1e-3


@pytest.fixture(scope="module")
def reference(model, slices) -> dict:
    return model.predict_slices(slices[:2], gate=False)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_fast_engines_give_the_masks_of_predict_slices(run, model, slices, reference, backend):
    engine = Engine(model, "fp32", backend, onnx_dir=run / "onnx" if backend == "onnx" else None)
    masks = SliceInferer(engine).predict_masks(slices[:2], gate=False)
    assert reference["masks"].any()
    agree = (masks == reference["masks"].numpy()).mean()
    assert agree > 0.9995, agree  # a few threshold pixels may flip with float rounding
    probs, _ = engine.classify(slices[:2])  # the gate sees the same probabilities
    np.testing.assert_allclose(probs.numpy(), reference["probs"].numpy(), atol=1e-4)


def test_int8_engine_stays_close_to_fp32(run, model, slices, reference):
    """int8 is not exact: its embeddings move by a few percent, its masks by a few pixels."""
    engine = Engine(model, "int8", "onnx", onnx_dir=run / "onnx")
    assert "encoder int8" in engine.describe()
    fp32 = Engine(model, "fp32", "onnx", onnx_dir=run / "onnx")
    emb, ref = engine.encode(slices[:2]), fp32.encode(slices[:2])
    error = float((emb - ref).norm() / ref.norm())
    assert 0 < error <= INT8_MAX_REL_ERROR, error
    masks, expected = SliceInferer(engine).predict_masks(slices[:2], gate=False), reference["masks"].numpy()
    dice = 2 * (masks & expected).sum() / (masks.sum() + expected.sum())
    assert dice > 0.95, dice
    with pytest.raises(ValueError, match="ONNX Runtime"):
        Engine(model, "int8", "torch")


@pytest.mark.parametrize("setting, value", [("mask_prompt", "none"), ("prompt", "full_box")])
def test_torch_engine_follows_the_prompt_settings(model, slices, setting, value):
    """Box-only prompts and the SAM-PP whole-image box give predict_slices' masks too."""
    saved = getattr(model.cfg, setting), model.prompter.mask_mode
    setattr(model.cfg, setting, value)
    if setting == "mask_prompt":
        model.prompter.mask_mode = value
    try:
        ref = model.predict_slices(slices[1:2], gate=False)
        masks = SliceInferer(Engine(model, "fp32", "torch")).predict_masks(slices[1:2], gate=False)
    finally:
        setattr(model.cfg, setting, saved[0])
        model.prompter.mask_mode = saved[1]
    assert (masks == ref["masks"].numpy()).mean() > 0.9995


def test_the_onnx_refining_decoder_gives_the_torch_masks(run, model, slices):
    model.cfg.refine = True
    try:
        ref = model.predict_slices(slices[:2], gate=False)["masks"].numpy()
        masks = SliceInferer(Engine(model, "fp32", "onnx", onnx_dir=run / "onnx")).predict_masks(slices[:2], gate=False)
    finally:
        model.cfg.refine = False
    assert ref.any() and (masks == ref).mean() > 0.9995
