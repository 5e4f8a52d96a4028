"""The one inference path (`models.inferer.SliceInferer`): volume context on a synthetic volume
whose organ moves, with a SAM stand-in that segments whatever object the box holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sammix.config import ModelConfig
from sammix.masks import dice_score
from sammix.models.inferer import LEVEL_CHECK_TOLERANCE, SliceInferer, keep_main_run, organ_level

S = 64


def _disk(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


class ObjectsBackend:
    """Z slices, each with an organ (a disk that moves 2 px a slice and shrinks at its ends) and a
    distractor (a fixed disk: another organ). The classifier's CAM points at the organ, except on
    `wrong_cam` slices where it points at the distractor. "SAM" returns the object that fills most
    of the box it is given (score 0.9), or nothing (score 0.1)."""

    cfg = ModelConfig(cls_threshold=0.5, cam_threshold=0.4, level_check=False, one_run=False, propagate=False)
    size = S

    def __init__(self, z=24, organ=range(4, 20), wrong_cam=(6, 7, 15), gate_extra=(20, 21)):
        self.organ = np.zeros((z, S, S), bool)
        for i in organ:
            end = min(i - organ[0], organ[-1] - i)
            self.organ[i] = _disk(18 + 0.5 * i, 14 + 2 * i, min(9, 3 + 2 * end))
        self.distractor = _disk(50, 50, 7)
        self.wrong_cam, self.gate_extra = set(wrong_cam), set(gate_extra)

    def classify(self, x):
        zs = x[:, 0, 0, 0].round().long().tolist()
        probs = torch.tensor([0.9 if self.organ[i].any() or i in self.gate_extra else 0.1 for i in zs])
        cams = torch.zeros(len(zs), S, S)
        for j, i in enumerate(zs):
            target = self.distractor if i in self.wrong_cam or not self.organ[i].any() else self.organ[i]
            cams[j] = torch.from_numpy(target.astype(np.float32))
        return probs, cams

    def encode(self, x):
        return x[:, :, 0, 0].round()  # (B,1): the slice's index

    def decode(self, emb, boxes, mask_prompts):
        logits, scores = [], []
        for e, box in zip(emb, boxes):
            i = int(e[0])
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            inside = np.zeros((S, S), bool)
            inside[y1:y2 + 1, x1:x2 + 1] = True
            fill = [(obj & inside).sum() / max(obj.sum(), 1) for obj in (self.organ[i], self.distractor)]
            k = int(np.argmax(fill))
            mask = (self.organ[i], self.distractor)[k] if fill[k] > 0.3 else np.zeros((S, S), bool)
            logits.append(torch.from_numpy(np.where(mask, 8.0, -8.0).astype(np.float32))[None].repeat(3, 1, 1))
            scores.append(torch.tensor([0.9 if mask.any() else 0.1, 0.2, 0.2]))
        return torch.stack(logits), torch.stack(scores)


def _volume(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, S, S).clone()


def test_propagation_follows_the_moving_organ_past_wrong_cams_and_stops_at_its_ends():
    backend = ObjectsBackend(gate_extra=())
    inferer = SliceInferer(backend)
    x = _volume(len(backend.organ))
    plain = inferer.predict_volume(x, propagate=False)["logits"] > 0
    context = inferer.predict_volume(x, propagate=True)
    masks = context["logits"] > 0
    # slice by slice, the CAM path takes the distractor where the CAM points at it ...
    assert all(dice_score(plain[i], backend.distractor) == 1.0 for i in backend.wrong_cam)
    # ... the neighbour's box keeps the organ there, and nothing is found beyond its ends
    for i in range(len(backend.organ)):
        assert dice_score(masks[i], backend.organ[i]) == 1.0, i
    assert not context["segmented"][:3].any() and not context["segmented"][21:].any()


def test_propagation_with_a_slice_step_blends_where_the_organ_changes_slowly():
    backend = ObjectsBackend(gate_extra=())
    for i in range(4, 20):  # an organ that moves half a pixel a slice, and still shrinks at its ends
        backend.organ[i] = _disk(20, 20 + 0.5 * i, min(9, 3 + 2 * min(i - 4, 19 - i)))
    x = _volume(len(backend.organ))
    every = SliceInferer(backend).predict_volume(x, propagate=True)
    stepped = SliceInferer(backend).predict_volume(x, propagate=True, slice_step=2)
    assert stepped["segmented"].sum() < every["segmented"].sum() == 18  # the organ and the slice past each end
    masks = stepped["logits"] > 0
    for i in range(4, 20):  # blended in the middle, walked slice by slice where the ends shrink
        assert dice_score(masks[i], backend.organ[i]) >= 0.9, i
    assert not masks[:4].any() and not masks[20:].any()


class DriftDoubtBackend(ObjectsBackend):
    """The classifier is surest of slice 14; on slice 8, inside the organ, SAM doubts every answer
    (predicted IoU 0.3), as it doubts a mask that has drifted: the walk from 14 down ends there."""

    def __init__(self):
        super().__init__(wrong_cam=(), gate_extra=())

    def classify(self, x):
        probs, cams = super().classify(x)
        zs = x[:, 0, 0, 0].round().long().tolist()
        return torch.tensor([0.95 if i == 14 else float(p) for i, p in zip(zs, probs)]), cams

    def decode(self, emb, boxes, mask_prompts):
        logits, scores = super().decode(emb, boxes, mask_prompts)
        for j, e in enumerate(emb):
            if int(e[0]) == 8:
                scores[j] = torch.tensor([0.3, 0.2, 0.2])
        return logits, scores


def test_past_where_the_walk_ends_the_slices_the_gate_passes_get_their_cam_prompts():
    backend = DriftDoubtBackend()
    out = SliceInferer(backend).predict_volume(_volume(len(backend.organ)), propagate=True)
    masks = out["logits"] > 0
    for i in range(len(backend.organ)):
        assert dice_score(masks[i], backend.organ[i]) == 1.0, i
    assert np.isnan(out["boxes"][:4]).all() and not np.isnan(out["boxes"][4:9]).any()
    # a run of slices too short to walk is prompted slice by slice
    short = SliceInferer(backend).predict_volume(_volume(len(backend.organ))[12:16], propagate=True,
                                                 positions=[12, 13, 14, 15])
    assert short["segmented"].all()


class NeighbourOrganBackend(ObjectsBackend):
    """Past the organ's last slice, on slices the gate passes (`gate_extra`, as a classifier
    passes organ-free slices of an unfamiliar scanner), SAM finds a neighbouring organ in any box
    and returns it with a low predicted IoU (0.3): what the walk ran into on TotalSegmentator."""

    def decode(self, emb, boxes, mask_prompts):
        logits, scores = super().decode(emb, boxes, mask_prompts)
        neighbour = torch.from_numpy(np.where(_disk(30, 50, 8), 8.0, -8.0).astype(np.float32))
        for j, e in enumerate(emb):
            if int(e[0]) in self.gate_extra:
                logits[j], scores[j] = neighbour, torch.tensor([0.3, 0.2, 0.2])
        return logits, scores


class ConfidentNeighbourBackend(NeighbourOrganBackend):
    """As NeighbourOrganBackend, but SAM is sure of the neighbouring organ (0.8), and the
    classifier passes the slices past the organ's end (`gate_extra`) at a third of its
    probability on the organ (0.3, above a gate of 0.2)."""

    cfg = ModelConfig(cls_threshold=0.2, cam_threshold=0.4, level_check=False, one_run=False, propagate=False)

    def classify(self, x):
        probs, cams = super().classify(x)
        zs = x[:, 0, 0, 0].round().long().tolist()
        return torch.tensor([0.3 if i in self.gate_extra else float(p) for i, p in zip(zs, probs)]), cams

    def decode(self, emb, boxes, mask_prompts):
        logits, scores = super().decode(emb, boxes, mask_prompts)
        for j, e in enumerate(emb):
            if int(e[0]) in self.gate_extra:
                scores[j] = torch.tensor([0.8, 0.2, 0.2])
        return logits, scores


@pytest.mark.parametrize("make", [NeighbourOrganBackend, ConfidentNeighbourBackend],
                         ids=["sam_doubts_its_mask", "the_mask_outgrows_its_neighbour_where_the_classifier_doubts"])
def test_the_walk_ends_past_the_organ_though_the_gate_passes_the_slice(make):
    backend = make()
    out = SliceInferer(backend).predict_volume(_volume(len(backend.organ)), propagate=True)
    masks = out["logits"] > 0
    assert out["present"][20] and out["present"][21]
    assert all(dice_score(masks[i], backend.organ[i]) == 1.0 for i in range(20))
    # the walk did not take the neighbouring organ on from slice 19's box: past its end the slices
    # the gate passes are the CAM path's, prompted with their own CAM box (on the distractor), and
    # left to the level check and the main run
    cam_box = SliceInferer(backend).prompter.prompts(torch.from_numpy(backend.distractor[None].astype(np.float32)))[0][0]
    assert torch.equal(torch.from_numpy(out["boxes"][20]), cam_box)


def test_without_volume_context_the_gate_and_cam_decide_each_slice():
    backend = ObjectsBackend(wrong_cam=())
    out = SliceInferer(backend).predict_volume(_volume(len(backend.organ)), propagate=False)
    masks = out["logits"] > 0
    assert (out["present"] == (backend.organ.any(axis=(1, 2)) | np.isin(np.arange(24), [20, 21]))).all()
    assert all(dice_score(masks[i], backend.distractor) == 1.0 for i in (20, 21))  # what propagation stops


class LevelsOfObjectsBackend(ObjectsBackend):
    """ObjectsBackend with the level check on, over slices that show the objects: the organ at
    0.5, the distractor at 0.2 (another organ's intensity), the slice's index in its corner."""

    cfg = ModelConfig(cls_threshold=0.5, cam_threshold=0.4, level_check=True, propagate=False)

    def volume(self) -> torch.Tensor:
        x = torch.from_numpy(0.5 * self.organ + 0.2 * self.distractor).float()[:, None]
        x[:, 0, 0, 0] = torch.arange(len(x), dtype=torch.float32)
        return x


def test_the_level_check_asks_again_from_the_neighbour_and_empties_masks_off_the_organ():
    backend = LevelsOfObjectsBackend()
    x = backend.volume()
    out = SliceInferer(backend).predict_volume(x)
    masks = out["logits"] > 0
    # the CAM's wrong boxes (6, 7, 15) are asked again from their neighbours' masks and find the
    # organ; the gate's slices past its end (20, 21) hold only the distractor and are emptied
    assert out["present"][20] and out["present"][21]
    for i in range(len(backend.organ)):
        assert dice_score(masks[i], backend.organ[i]) == 1.0, i
    assert not masks[20:].any()
    assert out["level_check"] == {"fitted": 0, "found_again": 3, "emptied": 2}
    backend.cfg = ModelConfig(cls_threshold=0.5, cam_threshold=0.4, level_check=False, one_run=False, propagate=False)
    unchecked = SliceInferer(backend).predict_volume(x)["logits"] > 0
    assert all(dice_score(unchecked[i], backend.distractor) == 1.0 for i in (6, 7, 15, 20, 21))


@pytest.mark.parametrize("propagate", [False, True], ids=["slice_by_slice", "volume_context"])
def test_the_level_check_sees_a_sampled_scan_whole(propagate):
    # slices sampled from one scan, as a case of a slice folder is: the CAM box on slice 15 is on the
    # distractor, and the nearest sampled slice (12, three slices away) gives the box that finds the organ
    backend = LevelsOfObjectsBackend(wrong_cam=(15,), gate_extra=())
    positions = [4, 6, 9, 12, 15, 18]
    out = SliceInferer(backend).predict_volume(backend.volume()[positions], positions=positions, propagate=propagate)
    masks = out["logits"] > 0
    for j, i in enumerate(positions):
        assert dice_score(masks[j], backend.organ[i]) == 1.0, i
    assert out["level_check"] == {"fitted": 0, "found_again": 1, "emptied": 0}


def test_the_organ_level_is_the_largest_group_of_mask_levels_not_their_median():
    # the surest slices' masks: 10 on the organ (about 0.46), 9 on bone (about 0.97), 3 in between;
    # their median (0.60) is near none of them and would call every mask off the organ
    organ = np.linspace(0.43, 0.49, 10)
    levels = np.concatenate([organ, [0.55, 0.65, 0.70], np.linspace(0.95, 1.0, 9)])
    assert np.abs(np.median(levels) - levels).min() > 0.04
    assert abs(organ_level(levels) - np.median(organ)) <= 0.01
    assert (np.abs(organ - organ_level(levels)) <= LEVEL_CHECK_TOLERANCE).all()
    assert organ_level(np.array([0.3])) == 0.3


class LeakingBackend(LevelsOfObjectsBackend):
    """On slice 8 a strip of another structure (at 0.2) runs from the organ's edge to the slice's;
    the CAM covers both, and "SAM" answers a box that holds most of the strip with the organ and
    the strip together: a mask whose median is still the organ's level."""

    def __init__(self):
        super().__init__(wrong_cam=(), gate_extra=())
        self.strip = np.zeros((S, S), bool)
        self.strip[20:26, 40:] = True

    def volume(self) -> torch.Tensor:
        x = super().volume()
        x[8, 0][torch.from_numpy(self.strip)] = 0.2
        return x

    def classify(self, x):
        probs, cams = super().classify(x)
        for j, i in enumerate(x[:, 0, 0, 0].round().long().tolist()):
            if i == 8:
                cams[j] = torch.from_numpy((self.organ[8] | self.strip).astype(np.float32))
        return probs, cams

    def decode(self, emb, boxes, mask_prompts):
        logits, scores = super().decode(emb, boxes, mask_prompts)
        for j, (e, box) in enumerate(zip(emb, boxes)):
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            if int(e[0]) == 8 and self.strip[y1:y2 + 1, x1:x2 + 1].sum() >= 0.5 * self.strip.sum():
                logits[j][:, torch.from_numpy(self.strip)] = 8.0
        return logits, scores


def test_the_level_check_fits_a_mask_that_reaches_past_the_organ():
    backend = LeakingBackend()
    x = backend.volume()
    out = SliceInferer(backend).predict_volume(x)
    assert dice_score(out["logits"][8] > 0, backend.organ[8]) == 1.0
    assert out["level_check"] == {"fitted": 1, "found_again": 0, "emptied": 0}
    backend.cfg = ModelConfig(cls_threshold=0.5, cam_threshold=0.4, level_check=False, propagate=False)
    unchecked = SliceInferer(backend).predict_volume(x)["logits"][8] > 0
    assert dice_score(unchecked, backend.organ[8] | backend.strip) == 1.0


def test_the_level_check_needs_enough_slices_to_know_the_organ_level():
    backend = LevelsOfObjectsBackend(z=4, organ=range(0, 3), wrong_cam=(1,), gate_extra=())
    masks = SliceInferer(backend).predict_volume(backend.volume())["logits"] > 0
    assert dice_score(masks[1], backend.distractor) == 1.0  # 3 slices with a mask: left as they are


class GateMissBackend(ObjectsBackend):
    """The gate rejects `gate_miss` slices inside the organ. Slices come as HU (their index),
    which `predict_axial` windows to [0, 1] (HU clipped to [0, 255], /255)."""

    def __init__(self, gate_miss=(12,), **kw):
        super().__init__(wrong_cam=(), **kw)
        self.gate_miss = set(gate_miss)

    def classify(self, x):
        probs, cams = super().classify(x * 255)
        zs = (x[:, 0, 0, 0] * 255).round().long().tolist()
        return torch.tensor([0.1 if i in self.gate_miss else float(p) for i, p in zip(zs, probs)]), cams

    def encode(self, x):
        return super().encode(x * 255)


def test_predict_keeps_the_slices_volume_context_walks_into_past_a_gate_miss():
    from sammix.inference.predict import predict_axial

    backend = GateMissBackend(gate_extra=())
    axial = np.arange(len(backend.organ), dtype=np.float32)[:, None, None] * np.ones((1, S, S), np.float32)
    plain, _ = predict_axial(SliceInferer(backend), axial, None)
    assert not plain[12].any()  # slice by slice, the gate's miss is a hole in the organ
    masks, facts = predict_axial(SliceInferer(backend), axial, None, propagate=True)
    assert not facts["present"][12] and facts["segmented"][12]
    for i in range(len(backend.organ)):
        assert dice_score(masks[i], backend.organ[i]) == 1.0, i


# --- prompt candidates: constructed heat maps ---------------------------------------------------


def _blob(cy: float, cx: float, r: float, amp: float) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S]
    return amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))


class TwoOrgansBackend:
    """One slice with the organ (a large disk on the left, pixel value 1) and a neighbour (a small
    disk on the right, 0.5). The CAM is given. "SAM" returns the object that fills most of the box,
    with a predicted IoU of 0.7 for either; the classifier calls a crop organ (0.9) when the organ's
    pixels are in it, else not (0.1)."""

    cfg = ModelConfig(cls_threshold=0.5, cam_threshold=0.4, prompt_candidates=True)
    size = S

    def __init__(self, cam: np.ndarray):
        self.cam = torch.from_numpy(cam.astype(np.float32) / cam.max())
        self.objects = {"organ": _disk(30, 20, 12), "neighbour": _disk(30, 50, 5)}
        self.slice = torch.from_numpy(self.objects["organ"] * 1.0 + self.objects["neighbour"] * 0.5).float()[None, None]

    def classify(self, x):
        organ_seen = torch.tensor([bool((s[0] == 1.0).sum() > 20) for s in x])
        return torch.where(organ_seen, 0.9, 0.1), self.cam[None].expand(len(x), S, S)

    def encode(self, x):
        return torch.zeros(len(x), 1)

    def decode(self, emb, boxes, mask_prompts):
        logits = []
        for box in boxes:
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            inside = np.zeros((S, S), bool)
            inside[y1:y2 + 1, x1:x2 + 1] = True
            mask = max(self.objects.values(), key=lambda m: (m & inside).sum() / m.sum())
            logits.append(torch.from_numpy(np.where(mask, 8.0, -8.0).astype(np.float32))[None].repeat(3, 1, 1))
        return torch.stack(logits), torch.tensor([[0.7, 0.1, 0.1]]).repeat(len(boxes), 1)


def test_prompt_candidates_find_the_organ_when_the_cam_peaks_on_its_neighbour():
    cam = _blob(30, 50, 6, 1.0) + _blob(30, 20, 4, 0.6)  # the CAM's main blob is on the neighbour
    backend = TwoOrgansBackend(cam)
    single = SliceInferer(backend)
    single.cfg = ModelConfig(cam_threshold=0.4)  # the CAM's main blob alone
    assert dice_score(single.predict_masks(backend.slice)[0], backend.objects["neighbour"]) == 1.0
    chosen = SliceInferer(backend).predict(backend.slice)
    assert dice_score(chosen["logits"][0] > 0, backend.objects["organ"]) == 1.0


def test_prompt_candidates_keep_the_cam_answer_when_it_is_already_the_organ():
    backend = TwoOrgansBackend(_blob(30, 20, 9, 1.0) + _blob(30, 50, 3, 0.5))
    out = SliceInferer(backend).predict(backend.slice)
    assert dice_score(out["logits"][0] > 0, backend.objects["organ"]) == 1.0


class LevelsBackend:
    """Records what SAM is given; the CAM is 1 on the organ (the left half), 0 elsewhere."""

    size = S

    def __init__(self, cfg):
        self.cfg, self.encoded = cfg, []

    def classify(self, x):
        cams = torch.zeros(len(x), S, S)
        cams[:, :, : S // 2] = 1.0
        return torch.full((len(x),), 0.9), cams

    def encode(self, x):
        self.encoded.append(x.clone())
        return torch.zeros(len(x), 1)

    def decode(self, emb, boxes, mask_prompts):
        return torch.zeros(len(emb), 3, S, S), torch.full((len(emb), 3), 0.9)


def _organ_at(levels) -> torch.Tensor:
    x = torch.full((len(levels), 1, S, S), 0.05)  # what is not organ
    for i, level in enumerate(levels):
        x[i, :, :, : S // 2] = level
    return x


def test_sam_sees_an_organ_darker_or_brighter_than_any_it_was_trained_on_shifted_into_range():
    backend = LevelsBackend(ModelConfig(cls_threshold=0.5, cam_threshold=0.4, organ_levels=(0.3, 0.5)))
    x = _organ_at([0.17, 0.4, 0.7])
    SliceInferer(backend).predict(x)
    (seen,) = backend.encoded
    organ = seen[:, 0, :, : S // 2].mean((1, 2))
    assert organ.tolist() == pytest.approx([0.3, 0.4, 0.5])  # into the range, no further
    assert seen[:, 0, :, S // 2:].mean((1, 2)).tolist() == pytest.approx([0.18, 0.05, 0.0])  # the slice moves as one


def test_the_true_box_oracle_sees_the_slice_at_the_organ_levels_too():
    backend = LevelsBackend(ModelConfig(cls_threshold=0.5, cam_threshold=0.4, organ_levels=(0.3, 0.5)))
    x = _organ_at([0.17, 0.7])
    SliceInferer(backend).predict(x, boxes=torch.tensor([[0.0, 0.0, S / 2 - 1, S - 1.0]]).repeat(2, 1))
    (seen,) = backend.encoded
    assert seen[:, 0, :, : S // 2].mean((1, 2)).tolist() == pytest.approx([0.3, 0.5])


def test_without_organ_levels_or_with_matching_off_sam_sees_the_slice_as_it_is():
    x = _organ_at([0.17, 0.7])
    for cfg in (ModelConfig(cls_threshold=0.5), ModelConfig(cls_threshold=0.5, organ_levels=(0.3, 0.5), match_level=False)):
        backend = LevelsBackend(cfg)
        SliceInferer(backend).predict(x)
        assert torch.equal(backend.encoded[0], x)


def test_the_organ_level_is_read_from_tissue_not_from_fat_under_the_cam():
    backend = LevelsBackend(ModelConfig(cls_threshold=0.5, organ_levels=(0.3, 0.5)))
    x = _organ_at([0.4])
    x[0, :, S // 3:, : S // 2] = 0.0  # two thirds of the CAM's core on fat (0 under a CT window)
    SliceInferer(backend).predict(x)
    assert torch.equal(backend.encoded[0], x)  # the organ is at 0.4, inside the levels: no shift


class RefineBackend:
    """A "SAM" whose first answer is a square 4 px larger than the organ on every side (it
    reaches past), or nothing on slices whose value is 0; asked through the refining decoder it
    fills the box it is given."""

    cfg = ModelConfig(cls_threshold=0.5, cam_threshold=0.4, refine=True)
    size = S

    def __init__(self):
        self.calls = []

    def classify(self, x):
        return torch.full((len(x),), 0.9), torch.zeros(len(x), S, S)

    def encode(self, x):
        return x[:, :, 0, 0]  # (B,1): 1 where the slice has an organ

    def decode(self, emb, boxes, mask_prompts, refine=False):
        self.calls.append((boxes.clone(), refine))
        logits = torch.full((len(emb), 3, S, S), -1.0)
        for j, box in enumerate(boxes.long().tolist()):
            x1, y1, x2, y2 = box
            if refine:
                logits[j, :, y1:y2 + 1, x1:x2 + 1] = 1.0
            elif emb[j, 0] > 0:
                logits[j, :, 16:48, 16:48] = 1.0
        return logits, torch.full((len(emb), 3), 0.9)


def test_refine_asks_again_with_the_box_of_the_first_mask_through_the_refining_decoder():
    backend = RefineBackend()
    x = torch.zeros(2, 1, S, S)
    x[0] = 1.0  # slice 0 has an organ, slice 1 gets an empty first answer
    out = SliceInferer(backend).predict(x, boxes=torch.tensor([[20.0, 20.0, 43.0, 43.0]]).repeat(2, 1))
    (first, refine0), (second, refine1) = backend.calls
    assert not refine0 and refine1
    assert second.tolist() == [[16.0, 16.0, 47.0, 47.0]]  # the first mask's box; the empty answer is not asked again
    assert (out["logits"][0] > 0).sum() == 32 * 32 and not (out["logits"][1] > 0).any()
    assert out["boxes"].tolist() == first.tolist()  # the prompt that was given stays the slice's box
    backend.cfg = ModelConfig(cls_threshold=0.5, cam_threshold=0.4, propagate=False)
    backend.calls.clear()
    SliceInferer(backend).predict(x, boxes=first)
    assert len(backend.calls) == 1  # off by default: one question


class TwinOrganBackend(LevelsOfObjectsBackend):
    """Past the organ's end, after three slices the gate rejects, it passes two slices (23, 24)
    whose CAM points at another organ at the organ's own intensity (the kidney below a
    non-contrast liver): the level check cannot tell it apart."""

    def __init__(self):
        super().__init__(z=26, wrong_cam=(), gate_extra=(23, 24))

    def volume(self) -> torch.Tensor:
        x = super().volume()
        for i in self.gate_extra:
            x[i, 0][torch.from_numpy(self.distractor)] = 0.5
        return x


def test_a_volume_keeps_the_main_run_of_slices_with_a_mask():
    backend = TwinOrganBackend()
    x = backend.volume()
    out = SliceInferer(backend).predict_volume(x)
    masks = out["logits"] > 0
    for i in range(len(backend.organ)):
        assert dice_score(masks[i], backend.organ[i]) == 1.0, i
    assert out["level_check"]["emptied"] == 0 and out["one_run"] == {"dropped": 1, "slices_emptied": 2}
    backend.cfg = ModelConfig(cls_threshold=0.5, cam_threshold=0.4, one_run=False, propagate=False)
    apart = SliceInferer(backend).predict_volume(x)
    assert apart["one_run"] is None
    assert all(dice_score(apart["logits"][i] > 0, backend.distractor) == 1.0 for i in (23, 24))
    # slices sampled from a scan are not known to show the organ whole: nothing is dropped there
    positions = [4, 9, 14, 19, 23, 24]
    sampled = SliceInferer(TwinOrganBackend()).predict_volume(x[positions], positions=positions)
    assert sampled["one_run"] is None and (sampled["logits"][-2:] > 0).any()


def test_the_main_run_bridges_a_few_slices_without_a_mask():
    logits = -torch.ones(30, 8, 8)
    for i in [*range(3, 12), *range(14, 20), 25]:  # two slices without a mask inside the organ; one apart
        logits[i, 2:6, 2:6] = 1.0
    assert keep_main_run(logits) == {"dropped": 1, "slices_emptied": 1}
    assert (logits > 0).flatten(1).any(1).nonzero().flatten().tolist() == [*range(3, 12), *range(14, 20)]
