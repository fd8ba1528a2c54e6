"""ms_deform_attn against an explicit bilinear-interpolation reference, gradients, and MSDeformAttn."""

import math

import pytest
import torch

from xsam.model.msdeform_attn import MSDeformAttn, ms_deform_attn

SHAPES = [(3, 5), (2, 2), (4, 3)]  # different sizes and aspect ratios


def reference(value, shapes, locations, weights):
    """Slow loop: bilinear interpolation (align_corners=False semantics, zeros outside the map)."""
    b, _, nheads, dh = value.shape
    _, lq, _, _, n_points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, lq, nheads, dh, dtype=value.dtype)

    def pixel(bi, lvl, hi, y, x):
        h, w = shapes[lvl]
        if 0 <= y < h and 0 <= x < w:
            return value[bi, starts[lvl] + y * w + x, hi]
        return torch.zeros(dh, dtype=value.dtype)

    for bi in range(b):
        for q in range(lq):
            for hi in range(nheads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        lx, ly = locations[bi, q, hi, lvl, p].tolist()
                        x = lx * w - 0.5  # pixel-centre coordinates
                        y = ly * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = ((1 - fx) * (1 - fy) * pixel(bi, lvl, hi, y0, x0)
                                  + fx * (1 - fy) * pixel(bi, lvl, hi, y0, x0 + 1)
                                  + (1 - fx) * fy * pixel(bi, lvl, hi, y0 + 1, x0)
                                  + fx * fy * pixel(bi, lvl, hi, y0 + 1, x0 + 1))
                        out[bi, q, hi] += weights[bi, q, hi, lvl, p] * sample
    return out.flatten(2)


def random_inputs(b=2, lq=4, nheads=2, dh=3, n_points=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, nheads, dh, generator=g, dtype=dtype)
    # locations in [-0.3, 1.3]: a good share falls outside [0, 1] (partially or fully in the zero padding)
    locations = torch.rand(b, lq, nheads, len(SHAPES), n_points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(b, lq, nheads, len(SHAPES), n_points, generator=g, dtype=dtype)
    return value, locations, weights


def test_matches_reference_with_out_of_range_locations():
    value, locations, weights = random_inputs()
    assert ((locations < 0) | (locations > 1)).any()
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    out = ms_deform_attn(value, shapes, locations, weights)
    assert out.shape == (2, 4, 2 * 3)
    torch.testing.assert_close(out, reference(value, SHAPES, locations, weights), atol=1e-5, rtol=1e-5)


def test_matches_reference_float32_and_python_shapes():
    value, locations, weights = random_inputs(dtype=torch.float32, seed=1)
    out = ms_deform_attn(value, SHAPES, locations, weights)
    torch.testing.assert_close(out, reference(value, SHAPES, locations, weights), atol=1e-5, rtol=1e-5)


def test_exact_pixel_centres_and_far_outside():
    """A location at a pixel centre reads that pixel exactly; far outside reads zero."""
    value, _, _ = random_inputs(b=1, lq=2, nheads=1, dh=2, n_points=1)
    locations = torch.zeros(1, 2, 1, len(SHAPES), 1, 2, dtype=torch.float64)
    h, w = SHAPES[2]
    locations[0, 0, 0, :, 0] = torch.tensor([(1 + 0.5) / w, (2 + 0.5) / h])  # level 2: pixel (y=2, x=1)
    locations[0, 1, 0, :, 0] = torch.tensor([5.0, -4.0])
    weights = torch.zeros(1, 2, 1, len(SHAPES), 1, dtype=torch.float64)
    weights[:, :, :, 2] = 1.0
    out = ms_deform_attn(value, SHAPES, locations, weights)
    start = SHAPES[0][0] * SHAPES[0][1] + SHAPES[1][0] * SHAPES[1][1]
    torch.testing.assert_close(out[0, 0], value[0, start + 2 * w + 1, 0])
    assert torch.equal(out[0, 1], torch.zeros(2, dtype=torch.float64))


def test_gradcheck_value_locations_weights():
    value, locations, weights = random_inputs(b=1, lq=2, nheads=2, dh=2, n_points=2, seed=3)
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a), (value, locations, weights),
                                     eps=1e-6, atol=1e-5)


def test_rejects_inconsistent_shapes():
    value, locations, weights = random_inputs()
    with pytest.raises(ValueError):
        ms_deform_attn(value[:, :-1], SHAPES, locations, weights)


def test_module_gradients_reach_offsets_and_weights():
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=8, n_levels=len(SHAPES), n_heads=2, n_points=2)
    # Deformable-DETR init: zero offset / weight projections, uniform attention weights.
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0
    s = sum(h * w for h, w in SHAPES)
    src = torch.randn(2, s, 8)
    query = torch.randn(2, 5, 8)
    ref = torch.rand(2, 5, len(SHAPES), 2)
    out = m(query, ref, src, torch.tensor(SHAPES))
    assert out.shape == (2, 5, 8)
    out.square().sum().backward()
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        assert getattr(m, name).weight.grad.abs().sum() > 0, name


def test_module_matches_manual_composition():
    """MSDeformAttn = output_proj(ms_deform_attn(value_proj, ref + offset / (W, H), softmax weights))."""
    torch.manual_seed(1)
    m = MSDeformAttn(d_model=4, n_levels=len(SHAPES), n_heads=2, n_points=2).double()
    with torch.no_grad():
        m.sampling_offsets.weight.normal_()
        m.attention_weights.weight.normal_()
    s = sum(h * w for h, w in SHAPES)
    src = torch.randn(1, s, 4, dtype=torch.float64)
    query = torch.randn(1, 3, 4, dtype=torch.float64)
    ref = torch.rand(1, 3, len(SHAPES), 2, dtype=torch.float64)
    out = m(query, ref, src, SHAPES)

    value = m.value_proj(src).view(1, s, 2, 2)
    off = m.sampling_offsets(query).view(1, 3, 2, len(SHAPES), 2, 2)
    aw = m.attention_weights(query).view(1, 3, 2, -1).softmax(-1).view(1, 3, 2, len(SHAPES), 2)
    loc = torch.empty_like(off)
    for lvl, (h, w) in enumerate(SHAPES):
        loc[:, :, :, lvl, :, 0] = ref[:, :, None, lvl, None, 0] + off[:, :, :, lvl, :, 0] / w
        loc[:, :, :, lvl, :, 1] = ref[:, :, None, lvl, None, 1] + off[:, :, :, lvl, :, 1] / h
    expected = m.output_proj(reference(value.detach(), SHAPES, loc.detach(), aw.detach()))
    torch.testing.assert_close(out.detach(), expected.detach(), atol=1e-8, rtol=1e-8)
