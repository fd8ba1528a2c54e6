"""SemanticAccumulator: hand-made cases, void pixels, detectron2 conventions, merging."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xsam.eval.semantic import SemanticAccumulator


def _reference(preds, gts, n, ignore=255):
    """Per-class loop, straight from the definitions (detectron2 SemSegEvaluator conventions)."""
    tp, pos_gt, pos_pred = np.zeros(n), np.zeros(n), np.zeros(n)
    for p, g in zip(preds, gts):
        keep = g != ignore
        p, g = p[keep], g[keep]
        for c in range(n):
            tp[c] += np.sum((p == c) & (g == c))
            pos_gt[c] += np.sum(g == c)
            pos_pred[c] += np.sum(p == c)
    valid = pos_gt > 0
    iou = tp[valid] / (pos_gt + pos_pred - tp)[valid]
    acc = tp[valid] / pos_gt[valid]
    w = pos_gt[valid] / pos_gt.sum()
    return {"mIoU": 100 * iou.mean(), "fwIoU": 100 * (w * iou).sum(), "mACC": 100 * acc.mean(),
            "pACC": 100 * tp.sum() / pos_gt.sum()}


def test_hand_case_with_void_and_predicted_only_class():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 0, 0, 1], [0, 2, 1, 2]])  # the 2 on the void pixel does not count
    acc = SemanticAccumulator(3, class_names=["a", "b", "c"])
    acc.add(pred, gt)
    r = acc.result()
    # class a: TP 3, GT 4, PRED 4 -> IoU 3/5; class b: TP 2, GT 3, PRED 2 -> IoU 2/3;
    # class c: no GT pixel -> left out of the means although predicted once
    assert r["mIoU"] == pytest.approx(100 * (3 / 5 + 2 / 3) / 2)
    assert r["mACC"] == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)
    assert r["pACC"] == pytest.approx(100 * 5 / 7)
    assert r["fwIoU"] == pytest.approx(100 * (4 / 7 * 3 / 5 + 3 / 7 * 2 / 3))
    per = acc.per_class_iou()
    assert per["a"] == pytest.approx(60.0) and per["b"] == pytest.approx(200 / 3) and math.isnan(per["c"])
    assert acc.primary_metric == "mIoU" and set(r) == set(acc.metric_names)


def test_perfect_and_all_void():
    gt = np.array([[0, 1], [2, 255]])
    acc = SemanticAccumulator(4)
    acc.add(gt.copy() % 4, gt)  # the void pixel predicted as class 3: ignored
    assert acc.result() == {"mIoU": 100.0, "fwIoU": 100.0, "mACC": 100.0, "pACC": 100.0}
    empty = SemanticAccumulator(4)
    empty.add(np.zeros((2, 2), int), np.full((2, 2), 255))
    assert all(math.isnan(v) for v in empty.result().values())


def test_wrong_prediction_everywhere_is_zero():
    acc = SemanticAccumulator(2)
    acc.add(np.ones((3, 3), int), np.zeros((3, 3), int))
    r = acc.result()
    assert r["mIoU"] == 0.0 and r["pACC"] == 0.0 and r["mACC"] == 0.0


def test_random_against_reference_and_merge():
    rng = np.random.default_rng(0)
    n = 6
    gts = [rng.integers(0, n - 1, (17, 23)) for _ in range(6)]  # class n-1 never in GT
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255
    preds = [rng.integers(0, n, g.shape) for g in gts]
    whole = SemanticAccumulator(n)
    parts = [SemanticAccumulator(n) for _ in range(3)]
    for i, (p, g) in enumerate(zip(preds, gts)):
        whole.add(p, g)
        parts[i % 3].add(p, g)
    ref = _reference(preds, gts, n)
    for k, v in ref.items():
        assert whole.result()[k] == pytest.approx(v, abs=1e-9)
    merged = sum(parts)
    np.testing.assert_array_equal(merged.conf, whole.conf)
    assert merged.result() == whole.result()


def test_rejects_bad_input():
    acc = SemanticAccumulator(3)
    with pytest.raises(ValueError):
        acc.add(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError):
        acc.add(np.zeros((2, 2), int), np.full((2, 2), 7))  # GT label out of range, not void
    with pytest.raises(ValueError):
        acc.add(np.full((2, 2), 3), np.zeros((2, 2), int))
    with pytest.raises(ValueError):
        SemanticAccumulator(3) + SemanticAccumulator(4)
