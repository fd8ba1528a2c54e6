"""Post-processing on hand-made logits with known answers, and the un-padding geometry.

The original's rules (panoptic fusion, semantic resize order, interactive pick, GCG painting) have
their own hand-made cases in test_postprocess_protocol.py."""

import math

import pytest
import torch

from xsam.model import postprocess as pp

L = 20.0


def _masks(q, size, regions):
    """[q, size, size] logits: +L inside each query's low-res region (a tuple of slices), -L outside."""
    m = torch.full((q, size, size), -L)
    for i, region in enumerate(regions):
        if region is not None:
            m[i][region] = L
    return m


def _cls(probs):
    """Class logits whose softmax is exactly `probs` (rows sum to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


# ------------------------------------------------------------------ geometry


def test_stripes_land_at_the_right_place_after_crop_and_resize():
    m = _masks(3, 4, [(1, slice(None)), (slice(None), 1), (3, slice(None))])  # frame 32 x 32 at stride 8
    # image occupies the top-left 20 x 32 of the padded frame; original image is 25 x 40 (x 1.25)
    out = pp.resize_to_original(m, (20, 32), (25, 40)) > 0
    assert out.shape == (3, 25, 40)
    rows = torch.zeros(25, dtype=torch.bool)
    rows[10:20] = True  # frame rows 8..15 -> original rows 10..19
    assert torch.equal(out[0], rows[:, None].expand(25, 40))
    cols = torch.zeros(40, dtype=torch.bool)
    cols[10:20] = True  # frame cols 8..15 -> original cols 10..19
    assert torch.equal(out[1], cols[None].expand(25, 40))
    assert not out[2].any()  # frame rows 24..31 are padding: cropped away


def test_block_in_a_tall_image():
    m = _masks(1, 4, [(slice(2, 4), slice(0, 2))])  # frame rows 16..31, cols 0..15
    out = pp.referring(_cls([[0.9, 0.1]]), m, (32, 16), (64, 32))  # width 16 of 32 is image
    assert out.shape == (64, 32)
    assert out[40:60, 4:28].all()  # interior of rows 32..63, cols 0..31
    assert not out[:30].any()
    assert out.sum() > 0.9 * 32 * 32


def test_scaled_size_must_fit():
    with pytest.raises(ValueError):
        pp.resize_to_original(torch.zeros(1, 4, 4), (40, 16), (40, 16))


# ------------------------------------------------------------------ instance / vgd / semantic


def test_instance_score_is_class_prob_times_mean_mask_prob():
    cls = _cls([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    masks = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 3.0), torch.full((4, 4), -1.0)])
    out = pp.instance(cls, masks, (32, 24), (16, 12), top_k=4)
    s1, s3 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-3.0))
    # pairs by class prob: (q1,c1) .7, (q0,c0) .6, (q2,c0) .5, (q2,c1) .4; q2's mask is empty -> 0
    assert out["scores"].tolist() == pytest.approx([0.7 * s3, 0.6 * s1, 0.0, 0.0], abs=1e-5)
    assert out["labels"].tolist()[:2] == [1, 0]
    assert out["masks"].shape == (4, 16, 12) and out["masks"].dtype == torch.bool
    assert out["masks"][0].all() and out["masks"][1].all() and not out["masks"][2:].any()
    assert len(pp.instance(cls, masks, (32, 24), (16, 12), top_k=2)["scores"]) == 2
    assert len(pp.instance(cls, masks, (32, 24), (16, 12), top_k=100)["scores"]) == 6  # capped at Q * K pairs
    assert len(pp.instance(cls, masks, (32, 24), (16, 12))["scores"]) == 3  # default: Q pairs, as the original
    vgd = pp.vgd(cls, masks, (32, 24), (16, 12), top_k=4)
    assert torch.equal(vgd["scores"], out["scores"]) and torch.equal(vgd["masks"], out["masks"])


def test_instance_mean_is_inside_the_binary_mask_only():
    m = torch.full((1, 4, 4), -L)
    m[0, :, :2] = 2.0  # left half: logit 2 (inside), right half -L
    out = pp.instance(_cls([[0.5, 0.5]]), m, (32, 32), (32, 32), top_k=1)
    inside = out["masks"][0]
    assert inside[:, :12].all() and not inside[:, 16:].any()  # the zero crossing is left of 16
    prob = pp.resize_to_original(m, (32, 32), (32, 32))[0].sigmoid()
    assert out["scores"][0].item() == pytest.approx(0.5 * prob[inside].mean().item(), rel=1e-5)
    assert out["scores"][0].item() > 0.5 * 0.8  # ~sigmoid(2) = 0.88, not diluted by the outside


def test_semantic_argmax_of_weighted_masks():
    cls = _cls([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.01, 0.01, 0.98]])
    masks = _masks(3, 4, [(slice(None), slice(0, 2)), (slice(None), slice(2, 4)), (slice(None), slice(None))])
    seg = pp.semantic(cls, masks, (32, 32), (8, 8))
    assert seg.dtype == torch.int64 and seg.shape == (8, 8)
    assert seg[:, :4].eq(0).all() and seg[:, 4:].eq(1).all()  # q2 is background: ignored


# ------------------------------------------------------------------ referring / gres / gcg / interactive


def _three_stripes():
    return _masks(3, 4, [(0, slice(None)), (1, slice(None)), (2, slice(None))])  # rows 0..7, 8..15, 16..23


def test_referring_best_query():
    cls = _cls([[0.3, 0.7], [0.9, 0.1], [0.6, 0.4]])
    out = pp.referring(cls, _three_stripes(), (32, 32), (32, 32))
    assert out.dtype == torch.bool and out[8:16].all() and out.sum() == 8 * 32


def test_gres_union_and_fallback():
    masks = _three_stripes()
    out = pp.gres(_cls([[0.7, 0.3], [0.65, 0.35], [0.3, 0.7]]), masks, (32, 32), (32, 32))
    assert out[:16].all() and out.sum() == 16 * 32  # q0 and q1 (>= 0.6), not q2
    low = pp.gres(_cls([[0.5, 0.5], [0.55, 0.45], [0.3, 0.7]]), masks, (32, 32), (32, 32))
    assert low[8:16].all() and low.sum() == 8 * 32  # none >= 0.6 -> the max (q1) only
    assert pp.gres(_cls([[0.5, 0.5], [0.55, 0.45], [0.3, 0.7]]), masks, (32, 32), (32, 32),
                   threshold=0.5).sum() == 16 * 32


def test_gcg_best_query_per_phrase():
    cls = _cls([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.7, 0.2, 0.1]])  # phrase 0 -> q2, phrase 1 -> q0
    out = pp.gcg(cls, _three_stripes(), (32, 32), (32, 32))
    assert out.shape == (2, 32, 32) and out.dtype == torch.bool
    assert out[0, 16:24].all() and out[0].sum() == 8 * 32
    assert out[1, 0:8].all() and out[1].sum() == 8 * 32
