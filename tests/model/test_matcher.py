"""HungarianMatcher against brute force, and point_sample against a hand-written bilinear read."""

import itertools
import math

import pytest
import torch

from xsam.model.matcher import HungarianMatcher, point_sample


def _bilinear(img: torch.Tensor, x: float, y: float) -> float:
    """Read img [H, W] at normalised (x, y), align_corners=False, zero outside: written by hand."""
    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    total = 0.0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * float(img[yy, xx])
    return total


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _reference_cost(logits, masks, labels, tmasks, coords, wc=2.0, wm=5.0, wd=5.0):
    """[Q, N] cost computed pair by pair, point by point, with scalar maths."""
    q_count, n_count = logits.shape[0], labels.shape[0]
    probs = torch.softmax(logits.double(), -1)
    pred = [[_bilinear(masks[q], float(x), float(y)) for x, y in coords] for q in range(q_count)]
    tgt = [[_bilinear(tmasks[t].double(), float(x), float(y)) for x, y in coords] for t in range(n_count)]
    cost = torch.zeros(q_count, n_count, dtype=torch.float64)
    for q in range(q_count):
        for t in range(n_count):
            bce = sum(-(tv * math.log(_sig(pv)) + (1 - tv) * math.log(1 - _sig(pv)))
                      for pv, tv in zip(pred[q], tgt[t])) / len(coords)
            inter = sum(_sig(pv) * tv for pv, tv in zip(pred[q], tgt[t]))
            denom = sum(_sig(pv) for pv in pred[q]) + sum(tgt[t])
            dice = 1 - (2 * inter + 1) / (denom + 1)
            cost[q, t] = -wc * probs[q, labels[t]] + wm * bce + wd * dice
    return cost


def _brute_force_min(cost: torch.Tensor) -> float:
    q_count, n_count = cost.shape
    best = math.inf
    if n_count <= q_count:  # each target to a distinct query
        for qs in itertools.permutations(range(q_count), n_count):
            best = min(best, sum(float(cost[q, t]) for t, q in enumerate(qs)))
    else:  # each query to a distinct target
        for ts in itertools.permutations(range(n_count), q_count):
            best = min(best, sum(float(cost[q, t]) for q, t in enumerate(ts)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_minimum(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    q_count = int(torch.randint(1, 7, (1,), generator=g))
    n_count = int(torch.randint(1, 5, (1,), generator=g))
    k = 3
    logits = torch.randn(1, q_count, k + 1, generator=g) * 2
    masks = torch.randn(1, q_count, 6, 6, generator=g) * 3
    labels = torch.randint(0, k, (n_count,), generator=g)
    tmasks = torch.rand(n_count, 12, 12, generator=g) > 0.5
    matcher = HungarianMatcher(num_points=40)
    (index_q, index_t), = matcher(logits, masks, [{"labels": labels, "masks": tmasks}],
                                  generator=torch.Generator().manual_seed(seed))
    coords = torch.rand(1, 40, 2, generator=torch.Generator().manual_seed(seed))[0]  # the same draw

    cost = _reference_cost(logits[0], masks[0], labels, tmasks, coords)
    assert torch.allclose(matcher.cost_matrix(logits[0], masks[0], labels, tmasks, coords).double(), cost,
                          atol=1e-4)
    n = min(q_count, n_count)
    assert len(index_q) == len(index_t) == n
    assert index_q.dtype == index_t.dtype == torch.int64
    assert len(set(index_q.tolist())) == n and len(set(index_t.tolist())) == n
    assert torch.all(index_q < q_count) and torch.all(index_t < n_count)
    matched = sum(float(cost[q, t]) for q, t in zip(index_q.tolist(), index_t.tolist()))
    assert matched == pytest.approx(_brute_force_min(cost), abs=1e-4)


def test_more_targets_than_queries_and_obvious_assignment():
    # 2 queries, each a perfect copy (class and mask) of a different target among 3
    tm = torch.zeros(3, 16, 16)
    tm[0, :8] = 1
    tm[1, 8:] = 1
    tm[2, :, :8] = 1
    labels = torch.tensor([0, 1, 1])
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 0, 1] = 10  # query 0 is target 1 (class 1, bottom half)
    logits[0, 1, 0] = 10  # query 1 is target 0 (class 0, top half)
    masks = torch.stack([tm[1], tm[0]])[None] * 40 - 20
    (index_q, index_t), = HungarianMatcher(num_points=200)(logits, masks, [{"labels": labels, "masks": tm}])
    assert dict(zip(index_q.tolist(), index_t.tolist())) == {0: 1, 1: 0}


def test_no_targets_gives_empty_indices():
    matcher = HungarianMatcher(num_points=16)
    logits, masks = torch.randn(2, 4, 3), torch.randn(2, 4, 8, 8)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16)},
               {"labels": torch.tensor([1]), "masks": torch.ones(1, 16, 16)}]
    out = matcher(logits, masks, targets)
    assert len(out) == 2
    assert out[0][0].numel() == 0 and out[0][1].numel() == 0
    assert out[0][0].dtype == torch.int64
    assert len(out[1][0]) == 1 and out[1][1].tolist() == [0]


def test_batch_size_mismatch_raises():
    with pytest.raises(ValueError):
        HungarianMatcher()(torch.randn(2, 3, 3), torch.randn(2, 3, 4, 4),
                           [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}])


def test_point_sample_matches_hand_bilinear():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 5, 7, generator=g)
    coords = torch.rand(2, 11, 2, generator=g)
    coords[0, 0] = torch.tensor([0.0, 0.0])  # the frame corner (zero padding half weight)
    out = point_sample(img, coords)
    assert out.shape == (2, 3, 11)
    for b in range(2):
        for c in range(3):
            for p in range(11):
                x, y = coords[b, p].tolist()
                assert float(out[b, c, p]) == pytest.approx(_bilinear(img[b, c], x, y), abs=1e-5)


def test_point_sample_reads_pixel_centres_exactly():
    img = torch.arange(12.0).reshape(1, 1, 3, 4)
    # centre of pixel (row 1, col 2) is x = 2.5 / 4, y = 1.5 / 3
    out = point_sample(img, torch.tensor([[[2.5 / 4, 1.5 / 3], [0.5 / 4, 0.5 / 3]]]))
    assert out[0, 0].tolist() == pytest.approx([6.0, 0.0], abs=1e-5)
