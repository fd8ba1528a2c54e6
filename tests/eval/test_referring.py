"""ReferringAccumulator: cIoU / gIoU hand cases (LISA empty-union rule), N-acc / T-acc, merging."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xsam.eval.referring import ReferringAccumulator


def mask(*pixels, shape=(4, 4)):
    m = np.zeros(shape, bool)
    for y, x in pixels:
        m[y, x] = True
    return m


def test_hand_case():
    acc = ReferringAccumulator()
    # I = 2, U = 4 -> 0.5
    assert acc.add(mask((0, 0), (0, 1)), mask((0, 0), (0, 1), (1, 0), (1, 1))) == 0.5
    # nothing predicted, nothing to find: empty union counts 1.0 (and adds nothing to cIoU)
    assert acc.add(mask(), mask()) == 1.0
    # something predicted where nothing is: I = 0, U = 3 -> 0
    assert acc.add(mask((3, 3), (3, 2), (2, 3)), mask()) == 0.0
    r = acc.result()
    assert r["ciou"] == pytest.approx(100 * 2 / 7)
    assert r["giou"] == pytest.approx(100 * 1.5 / 3)
    assert set(r) == {"ciou", "giou"} and acc.primary_metric == "ciou"


def test_empty_prediction_and_perfect():
    acc = ReferringAccumulator()
    acc.add(mask(), mask((1, 1)))
    assert acc.result() == {"ciou": 0.0, "giou": 0.0}
    perfect = ReferringAccumulator()
    perfect.add(mask((1, 1), (2, 2)), mask((1, 1), (2, 2)))
    perfect.add(np.uint8(mask((0, 3))), mask((0, 3)))  # non-bool input
    assert perfect.result() == {"ciou": 100.0, "giou": 100.0}
    assert all(math.isnan(v) for v in ReferringAccumulator().result().values())


def test_target_accuracies():
    acc = ReferringAccumulator(target_acc=True)
    acc.add(mask(), mask())  # no target, predicted empty: right
    acc.add(mask((0, 0)), mask())  # no target, predicted something: wrong
    acc.add(mask((1, 1)), mask((2, 2)))  # target, predicted something (even if wrong): right
    acc.add(mask(), mask((2, 2)))  # target, predicted nothing: wrong
    r = acc.result()
    assert r["n_acc"] == pytest.approx(50.0) and r["t_acc"] == pytest.approx(50.0)


def test_merge_equals_single_pass():
    rng = np.random.default_rng(0)
    samples = [(rng.random((9, 11)) < 0.3, rng.random((9, 11)) < 0.3) for _ in range(12)]
    samples.append((mask(shape=(9, 11)), mask(shape=(9, 11))))
    whole, parts = ReferringAccumulator(True), [ReferringAccumulator(True) for _ in range(4)]
    for i, (p, g) in enumerate(samples):
        whole.add(p, g)
        parts[i % 4].add(p, g)
    merged = sum(parts)
    assert merged.result() == pytest.approx(whole.result())
    assert merged.intersection == whole.intersection and merged.union == whole.union


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        ReferringAccumulator().add(mask(), mask(shape=(4, 5)))
    with pytest.raises(ValueError):
        ReferringAccumulator() + ReferringAccumulator(target_acc=True)
