"""Splits by case (never by slice) and the seeded choice of the k labelled slices."""

from __future__ import annotations

import numpy as np

from sammix.errors import SammixError


def split_cases(case_ids, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0) -> dict[str, list[str]]:
    """Deterministic train/val/test split of the unique case ids (input order does not matter).

    With 3 or more cases, val and test each get at least one case (when their fraction is > 0)
    and train keeps at least one."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val, test and val + test < 1, got {val_fraction}, {test_fraction}")
    cases = sorted({str(c) for c in case_ids})
    n = len(cases)
    order = [cases[i] for i in np.random.default_rng(seed).permutation(n)]
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
    while n_test + n_val > max(n - 1, 0):  # keep a training case
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def sample_labeled(cache, candidate_indices, k: int, seed: int = 0) -> list[int]:
    """k slice indices with a mask showing the organ, spread over cases (round robin over a seeded
    shuffle of the cases, a seeded shuffle of slices within each); sorted, deterministic. k = 0:
    every such slice.

    `cache`: anything with per-slice `has_mask`, `labels` and `case` arrays (a SliceCache)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    candidates = np.unique(np.asarray(candidate_indices, dtype=np.int64))
    eligible = candidates[cache.has_mask[candidates] & (cache.labels[candidates] > 0)]
    k = k or len(eligible)
    if len(eligible) < k:
        organ = getattr(getattr(cache, "prep", None), "organ", "organ")
        raise SammixError(f"asked for {k} labelled slices but only {len(eligible)} slices with a "
                          f"{organ} mask are available ({len(candidates)} candidates)")
    rng = np.random.default_rng(seed)
    by_case: dict[str, list[int]] = {}
    for i in eligible:
        by_case.setdefault(str(cache.case[i]), []).append(int(i))
    cases = sorted(by_case)
    queues = [list(rng.permutation(by_case[cases[j]])) for j in rng.permutation(len(cases))]
    chosen: list[int] = []
    while len(chosen) < k:
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(int(queue.pop()))
    return sorted(chosen)
