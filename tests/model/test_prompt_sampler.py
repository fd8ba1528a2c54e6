import torch

from xsam.model.prompt_sampler import VisualPromptSampler

G, D, FRAME = 4, 3, 32  # 4x4 token map, 32x32 mask frame: each quadrant = 2x2 tokens = 16x16 pixels
QUADRANTS = [(slice(0, 16), slice(0, 16)), (slice(0, 16), slice(16, 32)),
             (slice(16, 32), slice(0, 16)), (slice(16, 32), slice(16, 32))]


def quadrant_map(values):
    """values [4, D] (TL, TR, BL, BR) -> token map [G, G, D] constant per quadrant."""
    tmap = torch.empty(G, G, D)
    tmap[:2, :2], tmap[:2, 2:], tmap[2:, :2], tmap[2:, 2:] = values
    return tmap


def test_full_quadrant_mask_returns_the_quadrant_value():
    sampler = VisualPromptSampler(num_points=64)
    for q, (rows, cols) in enumerate(QUADRANTS):
        values = torch.rand(4, D) * 2 - 1
        values[q] = torch.tensor([5.0, 6.0, 7.0])  # the prompted quadrant holds the largest value
        mask = torch.zeros(1, FRAME, FRAME, dtype=torch.bool)
        mask[0, rows, cols] = True
        out = sampler(quadrant_map(values), mask, generator=torch.Generator().manual_seed(q))
        torch.testing.assert_close(out, values[q:q + 1], rtol=0, atol=1e-6)


def test_quadrant_interior_exact_for_any_values():
    # align_corners=True: pixel col c -> token coordinate c * (G - 1) / FRAME; cols <= 10 (<= 0.94) read the
    # TL/BL token column only, cols >= 22 (>= 2.06) the TR/BR column only: one quadrant each
    sampler = VisualPromptSampler(num_points=32)
    values = torch.randn(4, D)
    masks = torch.zeros(4, FRAME, FRAME, dtype=torch.bool)
    masks[0, :11, :11] = True
    masks[1, :11, 22:] = True
    masks[2, 22:, :11] = True
    masks[3, 22:, 22:] = True
    out = sampler(quadrant_map(values), masks, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, values, rtol=1e-6, atol=1e-6)
    # and a mask in a different resolution (same frame) gives the same answer
    small = masks[:, ::4, ::4].clone()  # 8x8
    out_small = sampler(quadrant_map(values), small, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_small, values, rtol=1e-6, atol=1e-6)


def test_max_pool_not_mean():
    sampler = VisualPromptSampler(num_points=256)
    tmap = torch.zeros(G, G, 1)
    tmap[0, 0] = 10.0
    mask = torch.ones(1, FRAME, FRAME, dtype=torch.bool)  # whole frame
    out = sampler(tmap, mask, generator=torch.Generator().manual_seed(0))
    assert out.item() > 5.0  # a mean over the frame would be < 1


def test_points_lie_inside_the_mask_and_determinism():
    sampler = VisualPromptSampler(num_points=16)
    gen = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 20, 28, generator=gen) > 0.7
    pts = sampler.sample_points(masks, torch.Generator().manual_seed(0))
    assert pts.shape == (3, 16, 2)
    cols = ((pts[..., 0] + 1) / 2 * 28).round().long()
    rows = ((pts[..., 1] + 1) / 2 * 20).round().long()
    r_idx = torch.arange(3)[:, None].expand(3, 16)
    assert masks[r_idx, rows, cols].all()

    tmap = torch.randn(G, G, 8)
    a = sampler(tmap, masks, generator=torch.Generator().manual_seed(0))
    b = sampler(tmap, masks, generator=torch.Generator().manual_seed(0))
    c = sampler(tmap, masks, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_empty_mask_uses_frame_centre_and_shapes():
    sampler = VisualPromptSampler(num_points=8)
    tmap = torch.arange(G * G * 2, dtype=torch.float32).reshape(G, G, 2)
    masks = torch.zeros(2, FRAME, FRAME, dtype=torch.uint8)
    masks[1, 0, 0] = 1  # a single pixel: the top-left corner token (border padding, no dimming)
    out = sampler(tmap, masks)
    centre = tmap[1:3, 1:3].reshape(4, 2).mean(0)  # bilinear at (1.5, 1.5) in token coordinates
    torch.testing.assert_close(out[0], centre)
    torch.testing.assert_close(out[1], tmap[0, 0])
    assert sampler(tmap, torch.zeros(0, FRAME, FRAME, dtype=torch.bool)).shape == (0, 2)


def _pixels(points, h, w):
    """normalised points [P, 2] -> list of (row, col) of an [h, w] mask (inverse of sample_points)."""
    cols = ((points[:, 0] + 1) / 2 * w).round().long()
    rows = ((points[:, 1] + 1) / 2 * h).round().long()
    return list(zip(rows.tolist(), cols.tolist()))


def test_points_without_replacement_when_the_mask_has_enough_pixels():
    # X-SAM's rand_sample_repeat: n > P -> P distinct pixels; n == P -> every pixel; n < P -> every pixel
    # at least once, the rest repeated
    sampler = VisualPromptSampler(num_points=16)
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0, 2:10, 2:10] = True  # 64 pixels
    masks[1, 0:4, 0:4] = True  # 16 pixels
    masks[2, 5, 3:8] = True  # 5 pixels
    for seed in range(20):
        pts = sampler.sample_points(masks, torch.Generator().manual_seed(seed))
        big, exact, small = (_pixels(pts[i], 12, 12) for i in range(3))
        assert len(set(big)) == 16 and all(masks[0, r, c] for r, c in big)
        assert set(exact) == {(r, c) for r in range(4) for c in range(4)}
        assert set(small) == {(5, c) for c in range(3, 8)}


def test_align_corners_convention_of_the_reference():
    # X-SAM: (row, col) -> (col / Wm, row / Hm) -> grid_sample(align_corners=True): token coordinate
    # col * (G - 1) / Wm. Col 16 of 32 -> 1.5 (the pixel-centre / align_corners=False rule gives 1.5625).
    sampler = VisualPromptSampler(num_points=1)
    tmap = torch.arange(G, dtype=torch.float32).reshape(1, G, 1).expand(G, G, 1).contiguous()  # value = column
    mask = torch.zeros(1, FRAME, FRAME, dtype=torch.bool)
    mask[0, 7, 16] = True
    assert sampler(tmap, mask).item() == 1.5
