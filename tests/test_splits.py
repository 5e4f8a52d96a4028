"""Case-level splits and the seeded choice of k labelled slices."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sammix.config import PrepConfig
from sammix.data.cache import prepare_dataset
from sammix.data.splits import sample_labeled, split_cases
from sammix.errors import SammixError


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 20, 85])
def test_split_is_a_partition_of_cases(n):
    cases = [f"case{i:03d}" for i in range(n)]
    parts = split_cases(cases, 0.15, 0.15, seed=3)
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == cases
    assert not (set(parts["train"]) & set(parts["val"])) and not (set(parts["train"]) & set(parts["test"]))
    assert not (set(parts["val"]) & set(parts["test"]))
    assert len(parts["train"]) >= 1
    if n >= 3:
        assert len(parts["val"]) >= 1 and len(parts["test"]) >= 1
    if n == 85:
        assert len(parts["test"]) == 13 and len(parts["val"]) == 13


def test_split_is_deterministic_and_ignores_order_and_repeats():
    cases = [f"p{i}" for i in range(30)]
    by_slice = [c for c in cases for _ in range(5)]  # case ids as they come, once per slice
    a = split_cases(cases, seed=1)
    assert a == split_cases(list(reversed(by_slice)), seed=1)
    assert a != split_cases(cases, seed=2)
    assert split_cases(cases, 0.0, 0.2, seed=0)["val"] == []


def _fake_cache(per_case: dict[str, list[int]]):
    """labels per slice for each case; slices with label 9 have no mask."""
    labels, has_mask, case = [], [], []
    for name, values in per_case.items():
        for v in values:
            labels.append(1 if v == 1 else 0)
            has_mask.append(v != 9)
            case.append(name)
    return SimpleNamespace(labels=np.array(labels, np.uint8), has_mask=np.array(has_mask),
                           case=np.array(case), prep=PrepConfig())


def test_sampler_is_seeded_spread_and_only_picks_labelled_organ_slices():
    cache = _fake_cache({f"c{i}": [0, 1, 1, 1, 9, 1, 0] for i in range(6)})
    everything = np.arange(len(cache.labels))
    pick = sample_labeled(cache, everything, 6, seed=0)
    assert pick == sorted(pick) and len(set(pick)) == 6
    assert pick == sample_labeled(cache, everything, 6, seed=0)
    assert pick != sample_labeled(cache, everything, 6, seed=1)
    assert all(cache.labels[i] == 1 and cache.has_mask[i] for i in pick)
    assert len({cache.case[i] for i in pick}) == 6  # one per case before any case gets a second
    counts = np.unique(cache.case[sample_labeled(cache, everything, 9, seed=0)], return_counts=True)[1]
    assert sorted(counts) == [1, 1, 1, 2, 2, 2]

    train = np.flatnonzero(np.isin(cache.case, ["c0", "c1"]))
    assert set(cache.case[sample_labeled(cache, train, 8, seed=5)]) == {"c0", "c1"}
    with pytest.raises(SammixError, match="only 8 slices"):
        sample_labeled(cache, train, 9, seed=0)
    eligible = train[cache.has_mask[train] & (cache.labels[train] == 1)]
    assert sample_labeled(cache, train, 0, seed=0) == sorted(eligible)  # k = 0: every one


def test_sampler_on_a_real_cache_respects_the_split(synthetic_root, tmp_path):
    cache = prepare_dataset(synthetic_root("lits", n_cases=5), PrepConfig(size=16), cache_dir=tmp_path,
                            progress=False)
    parts = split_cases(cache.cases(), seed=0)
    train = cache.indices_for_cases(parts["train"])
    pick = sample_labeled(cache, train, 5, seed=0)
    assert set(cache.case[pick]) <= set(parts["train"])
    assert all(cache.masks(pick).reshape(5, -1).any(axis=1))
