"""InteractiveAccumulator: per prompt type mIoU / cIoU, pooled numbers, merging."""

from __future__ import annotations

import numpy as np
import pytest

from xsam.data.schema import PromptType
from xsam.eval.interactive import InteractiveAccumulator


def _m(n, shape=(1, 8)):
    m = np.zeros(shape, bool)
    m[0, :n] = True
    return m


def test_per_type_and_pooled():
    acc = InteractiveAccumulator()
    acc.add(_m(2), _m(4), "point")  # IoU 0.5, I 2, U 4
    acc.add(_m(4), _m(4), PromptType.point)  # IoU 1, I 4, U 4
    acc.add(_m(0), _m(2), "box")  # IoU 0, I 0, U 2
    r = acc.result()
    assert r["point/miou"] == pytest.approx(75.0)
    assert r["point/ciou"] == pytest.approx(100 * 6 / 8)
    assert r["box/miou"] == 0.0 and r["box/ciou"] == 0.0
    assert "scribble/miou" not in r and "mask/miou" not in r  # only types with samples
    assert r["miou"] == pytest.approx(50.0) and r["ciou"] == pytest.approx(60.0)
    assert set(r) <= set(acc.metric_names) and acc.primary_metric in r


def test_merge_equals_single_pass_and_bad_type():
    rng = np.random.default_rng(1)
    types = ["point", "scribble", "box", "mask"]
    samples = [(rng.random((5, 5)) < 0.5, rng.random((5, 5)) < 0.5, types[i % 4]) for i in range(10)]
    whole, a, b = InteractiveAccumulator(), InteractiveAccumulator(), InteractiveAccumulator()
    for i, (p, g, t) in enumerate(samples):
        whole.add(p, g, t)
        (a if i < 5 else b).add(p, g, t)
    assert (a + b).result() == pytest.approx(whole.result())
    with pytest.raises(ValueError):
        whole.add(_m(1), _m(1), "lasso")
