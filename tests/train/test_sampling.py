"""Schedule: balancing counts, random extra repeats, single-dataset global batches, rank striding."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from xsam.train.sampling import Schedule

# t = 0.2: f = (0.846, 0.127, 0.027) -> r = (1, 1.26, 2.70): "a" not repeated, "b" and "c" fractional > 1
COUNTS = {"a": 400, "b": 60, "c": 13}
T = 0.2


def make(seed=0, **kw) -> Schedule:
    args = {"counts": COUNTS, "t": T, "batch_per_rank": 2, "world_size": 3, "seed": seed} | kw
    return Schedule(**args)


def unpadded(batches):
    """(dataset -> Counter(index)) of the balancing draws, and of everything incl. padding."""
    draws, full = {}, {}
    for gb in batches:
        real = gb.indices[:len(gb.indices) - gb.pad]
        draws.setdefault(gb.dataset, Counter()).update(real)
        full.setdefault(gb.dataset, Counter()).update(gb.indices)
    return draws, full


def test_repeat_factors_follow_the_formula():
    s = make()
    total = sum(COUNTS.values())
    r = s.repeat_factors()
    for d, n in COUNTS.items():
        assert r[d] == pytest.approx(max(1.0, math.sqrt(T / (n / total))))
    assert r["a"] == 1.0 and 1 < r["b"] < 2 and 2 < r["c"] < 3
    # repeats expand a dataset before the shares are computed
    s2 = make(repeats={"c": 2.0})
    n = dict(COUNTS, c=2 * COUNTS["c"])
    for d in COUNTS:
        assert s2.repeat_factors()[d] == pytest.approx(max(1.0, math.sqrt(T / (n[d] / sum(n.values())))))
        assert s2.multipliers()[d] == pytest.approx(s2.repeat_factors()[d] * (2.0 if d == "c" else 1.0))


@pytest.mark.parametrize("repeats", [None, {"a": 0.5, "c": 1.5}])
def test_counts_per_epoch_match_the_factors(repeats):
    s = make(seed=7, repeats=repeats)
    expected = s.expected_draws()
    mult = s.multipliers()
    g = s.global_batch
    seen_sizes = {d: set() for d in COUNTS}
    totals = Counter()
    epochs = 60
    for epoch in range(epochs):
        batches = s.epoch(epoch)
        draws, full = unpadded(batches)
        for d, n in COUNTS.items():
            k = sum(draws[d].values())
            assert k in (math.floor(expected[d]), math.ceil(expected[d])), (d, k, expected[d])
            seen_sizes[d].add(k)
            totals[d] += k
            # every index floor(m) or floor(m)+1 times, padding included (pad fits in the un-repeated ones)
            lo = math.floor(mult[d])
            assert set(full[d]) == set(range(n)) if lo >= 1 else True
            assert all(lo <= full[d][i] <= lo + 1 for i in range(n)), (d, full[d])
            assert sum(full[d].values()) == math.ceil(k / g) * g
            assert sum(1 for gb in batches if gb.dataset == d) == math.ceil(k / g)
        assert s.steps_per_epoch(epoch) == len(batches) == sum(math.ceil(sum(draws[d].values()) / g) for d in COUNTS)
    for d in COUNTS:
        assert totals[d] / epochs == pytest.approx(expected[d], abs=0.2)  # the Bernoulli part averages out
        if expected[d] != int(expected[d]):
            assert len(seen_sizes[d]) == 2  # both floor and ceil occur


def test_extra_repeats_are_random_not_the_leading_items():
    n = COUNTS["b"]
    picked = Counter()
    epochs = 120
    for seed in range(epochs):
        s = make(seed=seed)
        extras = [i for i, c in Counter(s.draws(0, "b").tolist()).items() if c == 2]
        k = len(extras)
        rest = s.expected_draws()["b"] - n  # ~1.26 * 60 = 75.3 draws -> 15 or 16 extras
        assert math.floor(rest) <= k <= math.ceil(rest)
        assert sorted(extras) != list(range(k))
        picked.update(extras)
    # every sample gets extra repeats sometimes, at about the same rate (p = m - 1 ~ 0.26 each)
    p = make().multipliers()["b"] - 1
    assert set(picked) == set(range(n))
    freq = np.array([picked[i] for i in range(n)]) / epochs
    assert abs(freq.mean() - p) < 0.01
    assert freq.max() < p + 0.2 and freq.min() > p - 0.2  # binomial(120, p): sd 0.04
    assert freq[: n // 4].mean() < 0.4  # the original would give the leading quarter 1.0


def test_global_batches_are_single_dataset_and_ranks_stride_disjointly():
    s = make(seed=3)
    mult = s.multipliers()
    for epoch in range(3):
        batches = s.epoch(epoch)
        per_rank = [s.rank_batches(epoch, r) for r in range(s.world_size)]
        assert all(len(p) == len(batches) for p in per_rank)
        got = {d: Counter() for d in COUNTS}
        for step, gb in enumerate(batches):
            assert len(gb.indices) == s.global_batch
            assert all(0 <= i < COUNTS[gb.dataset] for i in gb.indices)
            slots = []
            for r in range(s.world_size):
                dataset, idx = per_rank[r][step]
                assert dataset == gb.dataset  # every rank works on the same task at every step
                assert len(idx) == s.batch_per_rank
                slots += idx
                got[dataset].update(idx)
            assert slots == gb.indices  # ranks stride: slot r*b .. (r+1)*b
        for d, n in COUNTS.items():  # across ranks: no sample beyond its balancing repeats
            lo = math.floor(mult[d])
            assert all(lo <= got[d][i] <= lo + 1 for i in range(n))
        # datasets are interleaved, not one after the other
        names = [gb.dataset for gb in batches]
        assert names != sorted(names)


def test_deterministic_per_seed_and_epoch():
    a, b = make(seed=5), make(seed=5)
    assert a.epoch(2) == b.epoch(2)
    assert a.rank_batches(2, 1) == b.rank_batches(2, 1)
    assert a.epoch(0) != a.epoch(1)
    assert a.epoch(0) != make(seed=6).epoch(0)
    reordered = Schedule(dict(reversed(list(COUNTS.items()))), t=T, batch_per_rank=2, world_size=3, seed=5)
    assert reordered.epoch(2) == a.epoch(2)  # the order of the counts dict does not matter
    import pickle
    assert pickle.loads(pickle.dumps(a)).epoch(4) == b.epoch(4)


def test_tiny_dataset_is_padded_not_dropped():
    s = Schedule({"tiny": 3, "big": 1000}, t=0.0, batch_per_rank=4, world_size=2, seed=0)
    tiny = [gb for gb in s.epoch(0) if gb.dataset == "tiny"]
    assert len(tiny) == 1 and tiny[0].pad == 5 and len(tiny[0].indices) == 8
    assert set(tiny[0].indices) == {0, 1, 2}
    assert s.repeat_factors() == {"tiny": 1.0, "big": 1.0}  # t = 0: no balancing


def test_bad_arguments():
    with pytest.raises(ValueError):
        Schedule({"a": 0})
    with pytest.raises(ValueError):
        Schedule({"a": 3}, repeats={"b": 2.0})
    with pytest.raises(ValueError):
        make().rank_batches(0, 3)
    assert "z" not in Schedule({"a": 5, "z": 0}).epoch(0)[0].dataset  # empty datasets are skipped
