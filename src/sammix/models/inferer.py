"""The one path from slices to masks: gate -> CAM -> prompts -> SAM -> mask.

`SliceInferer` runs that chain over any `Backend`: `SamMix` itself (PyTorch, autograd GradCAM:
training's validation, `evaluate`, `experiment`) or `inference.engine.Engine` (LoRA merged, or
ONNX Runtime fp32/int8: `predict`). Whatever the backend, the prompts, the choice among SAM's
masks and the slice loops are this module's, so what `evaluate` scores is what `predict` writes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Protocol

import numpy as np
import torch
from scipy import ndimage

from sammix.config import ModelConfig
from sammix.models.cam import TISSUE_LEVEL, CamPrompts, candidate_boxes, main_component
from sammix.masks import box_covered, dice_score, expand_box, mask_to_box

# --slice-step: a slice between two that SAM saw is interpolated only where their masks agree this well
INTERPOLATE_MIN_DICE = 0.9
# volume context (`SliceInferer._propagate`)
PROPAGATE_GROW = 0.1  # a neighbour's mask box grown by this share of its size (+2 px) on each side
PROPAGATE_MIN_AREA = 0.001  # share of the slice: a smaller mask means the organ has ended
PROPAGATE_MIN_SCORE = 0.7  # SAM's predicted IoU below which a slice the gate rejects ends the organ
PROPAGATE_END_SCORE = 0.4  # SAM's predicted IoU below which any slice ends the organ
# a slice whose organ probability is below this share of the seed's and whose mask outgrows its
# neighbour's by more than PROPAGATE_END_GROWTH ends the organ (toward its ends it only shrinks)
PROPAGATE_END_PROB = 0.5
PROPAGATE_END_GROWTH = 1.2
CANDIDATES_PER_THRESHOLD = 3  # prompt candidates: CAM components tried at each threshold
LEVEL_CAM = 0.5  # the organ's level in a slice: the median intensity where its CAM is at least this
# the level check of volumes (`SliceInferer._check_levels`): a mask whose median intensity is this far
# (in the model's input scale; 20 HU at the default window width of 255 HU) from the organ's level in
# the volume's surest slices is on another structure
LEVEL_CHECK_TOLERANCE = 0.08
LEVEL_CHECK_MIN_SLICES = 5  # fewer slices with a mask than this: no level to check against
# a mask found again is prompted with its neighbour's mask box at each of these sizes (share of the
# box added on each side; toward the organ's ends the organ shrinks, more so across a gap in the slices)
LEVEL_CHECK_SIZES = (-0.3, -0.15, 0.0, PROPAGATE_GROW)
# a mask at the organ's level whose part at that level (on the slice median-filtered over this many
# pixels) has a box that covers less than this share of the mask's box reaches past the organ
LEVEL_FIT_SMOOTH = 5
LEVEL_FIT_SHARE = 0.5
# a volume's masks: runs of slices with a mask this many slices or fewer apart are one run (`keep_main_run`)
ONE_RUN_GAP = 2


class Backend(Protocol):
    """What the inferer needs of a model. Tensors come back on the CPU, float32."""

    cfg: ModelConfig  # prompt kind, gate and CAM thresholds, mask-prompt mode
    size: int  # slice side S

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices (B,1,S,S) in [0,1] -> organ probabilities (B,) and CAMs (B,S,S) in [0,1]."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B,1,S,S) in [0,1] -> SAM image embeddings."""

    def decode(self, emb: torch.Tensor, boxes: torch.Tensor, mask_prompts: torch.Tensor | None,
               refine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings + boxes (B,4) -> SAM's three mask logits (B,3,S,S) and predicted IoUs (B,3);
        `refine`: through the refining decoder (`SamMix.refining_decoder`)."""


def best_of_three(logits: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's answer: of its three masks (B,3,S,S), the one with the highest predicted IoU (B,3)
    -> logits (B,S,S), score (B,)."""
    best = scores.argmax(dim=1)
    rows = torch.arange(len(best), device=best.device)
    return logits[rows, best], scores[rows, best]


def keep_inside(x: torch.Tensor, box) -> torch.Tensor:
    """A slice (1,S,S) zeroed outside an xyxy box (all zeros for None): the crops the classifier
    was trained to call organ or not (`Trainer._crop`)."""
    kept = torch.zeros_like(x)
    if box is not None:
        x1, y1, x2, y2 = (int(v) for v in box)
        kept[..., y1:y2 + 1, x1:x2 + 1] = x[..., y1:y2 + 1, x1:x2 + 1]
    return kept


def _at_level(image: torch.Tensor, found: torch.Tensor, organ: float) -> bool:
    """Whether a mask is on the organ: its median intensity within LEVEL_CHECK_TOLERANCE of the
    organ's level."""
    return bool(found.any()) and abs(float(image[found].median()) - organ) <= LEVEL_CHECK_TOLERANCE


def with_mask(logits: torch.Tensor) -> np.ndarray:
    """Which slices of mask logits (Z,S,S) hold a mask: (Z,) bool."""
    return (logits > 0).flatten(1).any(1).numpy()


def organ_level(levels: np.ndarray) -> float:
    """The organ's level from the median intensities of the masks of a volume's surest slices: the
    median of the largest group of them within LEVEL_CHECK_TOLERANCE of one of them. Their plain
    median is no level at all where the masks fall into two groups (the organ in some slices, bone
    or contrast in others) and would call every mask off the organ."""
    near = np.abs(levels[:, None] - levels[None, :]) <= LEVEL_CHECK_TOLERANCE
    return float(np.median(levels[near[int(np.argmax(near.sum(1)))]]))


def keep_main_run(logits: torch.Tensor) -> dict:
    """The organ spans one run of slices: of the masks of a volume's slices (logits (Z,S,S), in
    place) only the run of slices with a mask that holds most mask pixels is kept, its runs
    joined across up to ONE_RUN_GAP slices without one. What the gate passed and SAM found far
    below or above the organ, on the kidney or the colon at the organ's intensity, goes. (Keeping
    the largest 3D piece instead also cut the organ where a scan's crop or a few bad slices split
    it: docs/results.md.) Returns how many runs were dropped and how many slices they emptied."""
    has = with_mask(logits)
    at = np.flatnonzero(has)
    runs = np.split(at, np.flatnonzero(np.diff(at) > ONE_RUN_GAP + 1) + 1) if len(at) else []
    if len(runs) < 2:
        return {"dropped": 0, "slices_emptied": 0}
    pixels = [int((logits[r[0]:r[-1] + 1] > 0).sum()) for r in runs]
    main = runs[int(np.argmax(pixels))]
    logits[:main[0]] = 0.0
    logits[main[-1] + 1:] = 0.0
    return {"dropped": len(runs) - 1, "slices_emptied": int(len(at) - has[main[0]:main[-1] + 1].sum())}


def _runs(present: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive True as (first, last) index pairs."""
    edges = np.diff(np.concatenate([[0], present.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))


def _blend(logits: torch.Tensor, a: int, b: int) -> None:
    """The slices strictly between slices a and b of `logits` (Z,S,S) get theirs blended
    linearly in z."""
    lo, hi = min(a, b), max(a, b)
    t = torch.linspace(0.0, 1.0, hi - lo + 1)[1:-1, None, None]
    logits[lo + 1:hi] = (1 - t) * logits[lo] + t * logits[hi]


class SliceInferer:
    """gate -> CAM -> prompts -> SAM -> mask over a `Backend`, for batches of slices
    (`predict`) and for the ordered slices of a volume (`predict_volume`)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.cfg = backend.cfg
        self.size = int(backend.size)
        self.full_box = self.cfg.prompt == "full_box"  # SAM-PP baselines: whole-image box, no classifier
        self.prompter = CamPrompts(self.cfg.cam_threshold, mask_mode=self.cfg.mask_prompt)
        self.levels = self.cfg.organ_levels if self.cfg.match_level else None
        self.times: dict[str, float] = defaultdict(float)

    def _whole_box(self, n: int) -> torch.Tensor:
        return torch.tensor([0.0, 0.0, self.size - 1.0, self.size - 1.0]).repeat(n, 1)

    # -- the stages -----------------------------------------------------------------------------
    def gate(self, x: torch.Tensor, gate: bool = True):
        """Slices (B,1,S,S) -> organ probabilities (B,), present (B,) bool, CAMs (B,S,S) or None
        (the whole-image-box baselines have no classifier: every slice is present)."""
        if self.full_box:
            return torch.ones(len(x)), torch.ones(len(x), dtype=torch.bool), None
        probs, cams = self.backend.classify(x.float().contiguous())
        present = probs >= self.cfg.cls_threshold if gate else torch.ones_like(probs, dtype=torch.bool)
        return probs, present, cams

    def segment(self, x: torch.Tensor, cams: torch.Tensor | None, boxes: torch.Tensor | None = None):
        """Slices (P,1,S,S) and their CAMs -> SAM's best-mask logits (P,S,S), scores (P,) and the
        boxes it was prompted with (P,4). Given `boxes`, SAM is prompted with them instead."""
        start = time.perf_counter()
        mask_prompts = None
        if boxes is None:
            if self.full_box:
                boxes = self._whole_box(len(x))
            else:
                boxes, mask_prompts = self.prompter.prompts(cams)
        self.times["prompts"] += time.perf_counter() - start
        emb = self.backend.encode(self.sam_input(x, cams))
        if self.cfg.prompt_candidates and cams is not None and mask_prompts is None and not self.full_box:
            return self._choose(x, emb, cams)
        logits, scores = self._answer(emb, boxes.float(), mask_prompts)
        return logits, scores, boxes

    def _answer(self, emb: torch.Tensor, boxes: torch.Tensor, mask_prompts: torch.Tensor | None = None):
        """SAM's best mask logits (P,S,S) and scores (P,) for embeddings (P,...) and boxes (P,4).
        With `ModelConfig.refine`, SAM is asked again with the box of each non-empty answer,
        through the refining decoder: the first answer finds the organ around a loose CAM box, the
        second outlines it inside a box that fits."""
        logits, scores = best_of_three(*self.backend.decode(emb, boxes, mask_prompts))
        if not self.cfg.refine:
            return logits, scores
        found = [mask_to_box(m) for m in (logits > 0).numpy()]
        rows = [j for j, b in enumerate(found) if b is not None]
        if rows:
            fitted = torch.from_numpy(np.stack([found[j] for j in rows])).float()
            logits[rows], scores[rows] = best_of_three(*self.backend.decode(emb[rows], fitted, None, refine=True))
        return logits, scores

    def sam_input(self, x: torch.Tensor, cams: torch.Tensor | None) -> torch.Tensor:
        """What SAM sees of slices (P,1,S,S): with organ levels (`ModelConfig.organ_levels`, from
        the labelled slices), a slice whose organ (the median of the tissue under its CAM core,
        LEVEL_CAM) is darker or brighter than the levels SAM was trained on is shifted into that
        range, no further.
        A scan without contrast agent, whose liver is 50 HU darker than a portal-venous one, is
        the case (docs/results.md); the classifier always sees the slice as it is."""
        x = x.float()
        if self.levels is None or cams is None:
            return x.contiguous()
        core = (cams >= LEVEL_CAM) & (x[:, 0] >= TISSUE_LEVEL)  # the organ is tissue: fat at 0 is not its level
        level = torch.where(core, x[:, 0], float("nan")).flatten(1).nanmedian(dim=1).values
        shift = torch.nan_to_num(level.clamp(*self.levels) - level)  # no core: no level, no shift
        return (x + shift.view(-1, 1, 1, 1)).clamp(0, 1).contiguous()

    def _embed_slice(self, x: torch.Tensor, cams: torch.Tensor, i: int) -> torch.Tensor:
        """SAM's embedding (1,...) of slice i of (Z,1,S,S), as SAM sees it (`sam_input`): the
        volume stages ask SAM again about one slice at a time."""
        return self.backend.encode(self.sam_input(x[i:i + 1], cams[i:i + 1]))

    def _choose(self, x: torch.Tensor, emb: torch.Tensor, cams: torch.Tensor):
        """`segment` with prompt candidates (`ModelConfig.prompt_candidates`): for each slice, SAM
        answers every box its CAM could mean (`cam.candidate_boxes`) on the slice's one embedding;
        each answer is worth SAM's predicted IoU times the classifier's probability that the
        organ is in the slice zeroed outside the answer's box, and the best one is kept."""
        logits, scores, boxes = [], [], []
        for i in range(len(emb)):
            tried = torch.from_numpy(candidate_boxes(cams[i].numpy(), per_threshold=CANDIDATES_PER_THRESHOLD))
            l, s = self._answer(emb[i:i + 1].expand(len(tried), *emb.shape[1:]), tried.float())
            crops = torch.stack([keep_inside(x[i], mask_to_box(l[j] > 0)) for j in range(len(tried))])
            evidence = self.backend.classify(crops)[0]
            k = int(torch.argmax(s * evidence))
            logits.append(l[k])
            scores.append(s[k])
            boxes.append(tried[k])
        return torch.stack(logits), torch.stack(scores), torch.stack(boxes)

    # -- batches --------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, gate: bool = True, boxes: torch.Tensor | None = None) -> dict:
        """Slices (B,1,S,S) -> {"probs", "present" (B,), "cams" (B,S,S) or None, "index" (P,) of
        the present slices, "logits" (P,S,S), "scores" (P,), "boxes" (P,4)}. Slices the gate
        calls organ-free skip SAM. Given `boxes` (B,4) (the ground-truth-box oracle), SAM is
        prompted with them on every slice, with no gate; it sees each slice as the CAM prompt's
        SAM does (`sam_input`), so the oracle changes the box and nothing else."""
        if boxes is None:
            probs, present, cams = self.gate(x, gate)
        else:
            probs, present = torch.ones(len(x)), torch.ones(len(x), dtype=torch.bool)
            cams = self.gate(x, gate=False)[2] if self.levels is not None else None
        index = present.nonzero().flatten()
        out = {"probs": probs, "present": present, "cams": cams, "index": index,
               "logits": torch.zeros(0, self.size, self.size), "scores": torch.zeros(0), "boxes": torch.zeros(0, 4)}
        if len(index):
            out["logits"], out["scores"], out["boxes"] = self.segment(
                x[index], None if cams is None else cams[index], None if boxes is None else boxes[index])
        return out

    def predict_masks(self, x: torch.Tensor, gate: bool = True, boxes: torch.Tensor | None = None) -> np.ndarray:
        """(B,1,S,S) -> bool masks (B,S,S)."""
        out = self.predict(x, gate, boxes)
        masks = np.zeros((x.shape[0], self.size, self.size), dtype=bool)
        masks[out["index"].numpy()] = (out["logits"] > 0).numpy()
        return masks

    # -- volumes --------------------------------------------------------------------------------
    def predict_volume(self, x: torch.Tensor, gate: bool = True, slice_step: int = 1, batch_size: int = 8,
                       progress=None, propagate: bool | None = None, positions=None) -> dict:
        """The ordered slices (Z,1,S,S) of one volume -> {"logits" (Z,S,S), "probs", "present",
        "segmented" (Z,) bool: the slices SAM saw, "boxes" (Z,4): the box each was prompted with
        (NaN where SAM did not run), "level_check" and "one_run": what those changed}.
        `positions` (Z,): the slices' indices in the scan, ascending (default: adjacent); where
        they jump, the scan was sampled, and stepping and volume context, which need neighbours,
        run on each run of adjacent slices apart, while the level check sees the whole scan.
        Where the slices are adjacent (a volume, not a sample of one) and at least
        LEVEL_CHECK_MIN_SLICES, the masks' main run of slices alone is kept (`keep_main_run`,
        `ModelConfig.one_run`): only there is the organ known to be one run.

        The gate and CAMs of the whole volume come first. Then, on each run of at least
        LEVEL_CHECK_MIN_SLICES adjacent slices, `propagate` (default: the run's
        `ModelConfig.propagate`) walks from the surest slice (`_propagate`, which takes
        `slice_step` too), and the present slices beyond the walk's ends get SAM with CAM prompts,
        as every present slice does without it; with `slice_step` > 1, in each run of consecutive organ
        slices SAM sees every slice_step-th slice and the last; a slice between two that SAM saw
        gets their mask logits blended linearly in z where the two masks agree (Dice >=
        INTERPOLATE_MIN_DICE), and otherwise SAM sees the middle slice and each half is treated
        the same way, down to neighbours."""
        if slice_step < 1:
            raise ValueError(f"slice_step must be >= 1, got {slice_step}")
        z = x.shape[0]
        probs, present, cams = torch.zeros(z), torch.zeros(z, dtype=torch.bool), None
        for start in range(0, z, batch_size):
            p, keep, c = self.gate(x[start:start + batch_size], gate)
            probs[start:start + len(p)], present[start:start + len(p)] = p, keep
            if c is not None:
                cams = torch.empty(z, self.size, self.size) if cams is None else cams
                cams[start:start + len(c)] = c
        present = present.numpy()
        propagate = self.cfg.propagate if propagate is None else propagate
        boxes = torch.full((z, 4), float("nan"))
        logits, segmented = torch.zeros(z, self.size, self.size), np.zeros(z, bool)
        positions = np.arange(z) if positions is None else np.asarray(positions)
        for run in np.split(np.arange(z), np.flatnonzero(np.diff(positions) != 1) + 1):
            a, b = run[0], run[-1] + 1
            part = None if cams is None else cams[a:b]
            passed = present[a:b].copy()
            if propagate and part is not None and passed.any() and b - a >= LEVEL_CHECK_MIN_SLICES:
                logits[a:b], segmented[a:b] = self._propagate(x[a:b], part, probs[a:b].numpy(), passed,
                                                              boxes[a:b], slice_step, progress)
                # beyond the walk's ends the slices the gate passes get their CAM prompts: the walk
                # also ends where SAM doubts a drifting mask, short of the organ's end, and the level
                # check and the main run judge those masks as they judge any CAM mask
                walked = np.flatnonzero(with_mask(logits[a:b]))
                if len(walked):
                    passed[walked[0]:walked[-1] + 1] = False
            if passed.any():
                cam, seen = self._stepped(x[a:b], part, passed, slice_step, batch_size, boxes[a:b], progress)
                rows = torch.from_numpy(passed)  # CAM masks fall only on the slices the gate passed
                logits[a:b][rows] = cam[rows]
                segmented[a:b] |= seen
        checked = apart = None
        if self.cfg.level_check and cams is not None:
            checked = self._check_levels(x, cams, probs.numpy(), logits, boxes)
        if self.cfg.one_run and z >= LEVEL_CHECK_MIN_SLICES and np.all(np.diff(positions) == 1):
            apart = keep_main_run(logits)
        if progress is not None:
            progress.update(z - int(segmented.sum()))
        return {"logits": logits, "probs": probs.numpy(), "present": present, "segmented": segmented,
                "boxes": boxes.numpy(), "level_check": checked, "one_run": apart}

    def _check_levels(self, x, cams, probs: np.ndarray, logits: torch.Tensor, boxes: torch.Tensor) -> dict | None:
        """The level check of a volume's masks, in place: within one scan the organ has one
        intensity, and a mask on the kidney, the bowel, bone or fat has another.

        The organ's level (`organ_level`) is read from each mask's median intensity, over the
        slices with a mask whose organ probability is at least the median of theirs. A mask within
        LEVEL_CHECK_TOLERANCE of it is on the organ, and is fitted to it (`_fit_to_level`). A mask
        further away is off the organ: next to a slice whose mask is on it, SAM is asked again
        with that neighbour's mask box at LEVEL_CHECK_SIZES, and its best-scored answer at the
        organ's level is kept, which makes the slice a neighbour in turn; every other off-level
        mask is emptied. The slices are taken in order: a neighbour may be several slices away
        where the scan was sampled (`predict_volume`'s `positions`). So slices the gate passed
        below or above the organ lose their masks, and a slice whose CAM box fell on another
        structure inside the organ's extent is prompted from the slice next to it. Returns the
        counts of masks fitted, found again and emptied (None where the volume has too few masks
        to check)."""
        masks = logits > 0
        has = masks.flatten(1).any(1).numpy()
        if has.sum() < LEVEL_CHECK_MIN_SLICES:
            return None
        level = np.full(len(x), np.nan)
        for i in np.flatnonzero(has):
            level[i] = float(x[i, 0][masks[i]].median())
        core = has & (probs >= np.median(probs[has]))
        organ = organ_level(level[core])
        on = has & (np.abs(level - organ) <= LEVEL_CHECK_TOLERANCE)
        off = set(np.flatnonzero(has & ~on).tolist())
        counts = {"fitted": self._fit_to_level(x, cams, logits, boxes, np.flatnonzero(on), organ),
                  "found_again": 0, "emptied": len(off)}
        frontier = sorted(i for i in off if (i > 0 and on[i - 1]) or (i + 1 < len(x) and on[i + 1]))
        while frontier:
            i = frontier.pop(0)
            off.discard(i)
            near = mask_to_box(logits[i - 1 if i > 0 and on[i - 1] else i + 1] > 0)
            tried = torch.from_numpy(np.stack([expand_box(near, size, self.size, pixels=2.0 * (size > 0))
                                               for size in LEVEL_CHECK_SIZES])).float()
            emb = self._embed_slice(x, cams, i)
            answers, scores = self._answer(emb.expand(len(tried), *emb.shape[1:]), tried)
            fits = [j for j in range(len(tried)) if _at_level(x[i, 0], answers[j] > 0, organ)]
            if fits:
                best = max(fits, key=lambda j: float(scores[j]))
                logits[i], boxes[i], on[i] = answers[best], tried[best], True
                counts["found_again"] += 1
                counts["emptied"] -= 1
                frontier.extend(j for j in (i - 1, i + 1) if j in off and j not in frontier)
            else:
                logits[i] = 0.0
        for i in off:
            logits[i] = 0.0
        return counts

    def _fit_to_level(self, x, cams, logits: torch.Tensor, boxes: torch.Tensor, slices, organ: float) -> int:
        """Masks at the organ's level that reach past the organ, asked again, in place. A mask
        that takes in the organ and the colon or fat beside it can have its median at the organ's
        level; its part at that level (the largest, opened by 3x3; its box grown by 2 px) has
        a box that covers less than LEVEL_FIT_SHARE of the mask's, and SAM asked with that box
        answers the organ alone. The answer is kept where it is at the organ's level. Returns how
        many masks were fitted."""
        fitted = 0
        for i in slices:
            mask, image = (logits[i] > 0).numpy(), x[i, 0].numpy()
            level = np.abs(ndimage.median_filter(image, LEVEL_FIT_SMOOTH) - organ) <= LEVEL_CHECK_TOLERANCE
            part = main_component(ndimage.binary_opening(mask & level, np.ones((3, 3), bool)).astype(np.float32), 0.5)
            if part is None:
                continue
            box = expand_box(mask_to_box(part), 0.0, self.size, pixels=2.0)  # the filters' erosion back
            if box_covered(mask_to_box(mask), box) >= LEVEL_FIT_SHARE:
                continue
            box = torch.from_numpy(box)
            emb = self._embed_slice(x, cams, i)
            answer, _ = self._answer(emb, box[None].float())
            if _at_level(x[i, 0], answer[0] > 0, organ):
                logits[i], boxes[i] = answer[0], box
                fitted += 1
        return fitted

    def _stepped(self, x, cams, present, slice_step: int, batch_size: int, boxes: torch.Tensor, progress):
        z = x.shape[0]
        logits = torch.zeros(z, self.size, self.size)
        segmented = np.zeros(z, bool)

        def run_sam(indices: list[int]) -> None:
            for i in range(0, len(indices), batch_size):
                chunk = torch.tensor(indices[i:i + batch_size], dtype=torch.long)
                logits[chunk], _, boxes[chunk] = self.segment(x[chunk], None if cams is None else cams[chunk])
                segmented[chunk.numpy()] = True
                if progress is not None:
                    progress.update(len(chunk))

        anchors = [[*range(first, last + 1, slice_step), last] for first, last in _runs(present)]
        run_sam(sorted({i for run in anchors for i in run}))
        gaps = [(a, b) for run in anchors for a, b in zip(run, run[1:]) if b - a > 1]
        while gaps:
            middles = []
            for a, b in gaps:
                if dice_score(logits[a] > 0, logits[b] > 0) >= INTERPOLATE_MIN_DICE:
                    _blend(logits, a, b)
                else:
                    middles.append((a, (a + b) // 2, b))
            run_sam([m for _, m, _ in middles])
            gaps = [g for a, m, b in middles for g in ((a, m), (m, b)) if g[1] - g[0] > 1]
        return logits, segmented

    def _propagate(self, x, cams, probs: np.ndarray, present: np.ndarray, boxes: torch.Tensor,
                   slice_step: int, progress):
        """Volume context: SAM from the slice the model is surest of, outwards.

        The seed is the present slice with the highest organ probability in the longest run of
        present slices, segmented as `segment` does it (its CAM prompt, or prompt candidates).
        Each neighbour is then prompted with the box of the mask next to it (`_follow`). The walk
        stops where `_follow` sees the organ end, and the slices beyond are left empty here (for
        `predict_volume`'s CAM path).

        With `slice_step` N > 1 the walk jumps N slices at a time, prompted with the box grown N
        times as much; where the mask it finds agrees with the one it jumped from (Dice >=
        INTERPOLATE_MIN_DICE) the slices between get their logits blended linearly in z; otherwise
        it tries half the jump, down to the next slice. After a slice whose mask differs from its
        neighbour's the walk goes on slice by slice, until two neighbours agree again."""
        z = x.shape[0]
        logits = torch.zeros(z, self.size, self.size)
        segmented = np.zeros(z, bool)
        first, last = max(_runs(present), key=lambda r: r[1] - r[0])
        seed = first + int(np.argmax(probs[first:last + 1]))

        embedded: dict[int, torch.Tensor] = {}  # the last few slices' embeddings: a jump that failed is walked again

        def sam(i: int, boxes: list) -> list[tuple[torch.Tensor, float]]:
            emb = embedded.pop(i, None)
            if emb is None:
                emb = self._embed_slice(x, cams, i)
            embedded[i] = emb
            if len(embedded) > slice_step:
                del embedded[next(iter(embedded))]
            out = self._answer(emb.expand(len(boxes), *emb.shape[1:]), torch.from_numpy(np.stack(boxes)).float())
            if progress is not None and not segmented[i]:
                progress.update(1)
            segmented[i] = True
            return [(out[0][k], float(out[1][k])) for k in range(len(boxes))]

        logits[seed:seed + 1], _, boxes[seed:seed + 1] = self.segment(x[seed:seed + 1], cams[seed:seed + 1])
        segmented[seed] = True
        if progress is not None:
            progress.update(1)
        for step in (1, -1):
            prev, n = seed, slice_step
            while 0 <= prev + step < z:
                n = min(n, z - 1 - prev if step > 0 else prev)  # jump no further than the volume's edge
                target = prev + step * n
                doubted = probs[target] < PROPAGATE_END_PROB * probs[seed]
                got = self._follow(target, logits[prev] > 0, n, cams, doubted, present[target], sam)
                if got is None and n == 1:
                    break  # the organ has ended
                agree = got is not None and dice_score(got[0] > 0, logits[prev] > 0) >= INTERPOLATE_MIN_DICE
                if got is not None and (agree or n == 1):
                    logits[target], boxes[target] = got
                    _blend(logits, prev, target)
                    prev, n = target, slice_step if agree else 1  # where the mask changes fast, slice by slice
                    continue
                # a jump that found no organ, or another mask: a shorter one
                n //= 2
        return logits, segmented

    def _follow(self, i: int, near: torch.Tensor, distance: int, cams, doubted: bool, present: bool, sam):
        """Slice i prompted from the mask `near` of a slice `distance` away -> (logits, box), or
        None where the organ has ended.

        The prompt is the box of `near` grown by PROPAGATE_GROW for each slice of the distance;
        where the gate passes the slice, SAM's answer to the CAM box is the check: when the
        propagated mask has lost the organ (it overlaps `near` less than the CAM answer does),
        the CAM answer is taken. The organ has ended at a slice whose mask is smaller than
        PROPAGATE_MIN_AREA of the slice, whose mask SAM scores below PROPAGATE_END_SCORE (SAM no
        longer sees one object there: a classifier that passes organ-free slices of an unfamiliar
        scanner cannot end the walk, SAM's own doubt can), that the gate rejects while SAM's
        score is below PROPAGATE_MIN_SCORE, or whose mask outgrows `near` by more than
        PROPAGATE_END_GROWTH where the organ probability is below PROPAGATE_END_PROB of the
        seed's (`doubted`; SAM, confident, has moved on to the next organ)."""
        box = mask_to_box(near)
        if box is None:
            return None
        grown = expand_box(box, PROPAGATE_GROW * distance, self.size, pixels=2.0 * distance)
        if present:
            cam_box = self.prompter.prompts(cams[i:i + 1])[0][0].numpy()
            (mine, score), (cam_mask, cam_score) = sam(i, [grown, cam_box])
            if dice_score(cam_mask > 0, near) > dice_score(mine > 0, near):
                mine, score, grown = cam_mask, cam_score, cam_box
        else:
            ((mine, score),) = sam(i, [grown])
        area = int((mine > 0).sum())
        grew = doubted and area > PROPAGATE_END_GROWTH * int(near.sum())
        if area < PROPAGATE_MIN_AREA * self.size * self.size or score < PROPAGATE_END_SCORE \
                or (not present and score < PROPAGATE_MIN_SCORE) or grew:
            return None
        return mine, torch.from_numpy(grown)
