"""Visual prompt rasterisers: the geometric properties of each prompt type on hand-made masks."""

import numpy as np
import pytest
from scipy import ndimage

from xsam.data import visual_prompts as vp

EIGHT = np.ones((3, 3), bool)


def rect(shape, r0, c0, r1, c1, base=None):
    m = np.zeros(shape, bool) if base is None else base.copy()
    m[r0:r1, c0:c1] = True
    return m


def disc_at(shape, r, c, radius):
    y, x = np.ogrid[:shape[0], :shape[1]]
    return (y - r) ** 2 + (x - c) ** 2 <= radius * radius


def parts(mask):
    labels, n = ndimage.label(mask, structure=EIGHT)
    return [labels == k for k in range(1, n + 1)]


def box_of(mask):
    rows, cols = np.nonzero(mask)
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


@pytest.mark.parametrize("seed", range(8))
def test_point_is_a_radius_10_disc_centred_inside_the_component(seed):
    mask = rect((100, 120), 30, 40, 60, 80)
    mask[40:50, 50:70] = False  # a hole the disc centre may not land in
    prompt = vp.point_prompt(mask, np.random.default_rng(seed))
    assert prompt.dtype == bool and prompt.shape == mask.shape
    rows, cols = np.nonzero(prompt)
    r, c = round(rows.mean()), round(cols.mean())
    np.testing.assert_array_equal(prompt, disc_at(mask.shape, r, c, 10))
    assert mask[r, c]


def test_point_one_disc_per_component_and_none_for_specks():
    mask = rect((100, 160), 10, 10, 40, 40)
    mask = rect(mask.shape, 60, 100, 90, 150, mask)
    mask[80:82, 20:22] = True  # 4 px: no prompt
    prompt = vp.point_prompt(mask, np.random.default_rng(3))
    discs = parts(prompt)
    assert len(discs) == 2
    for d in discs:
        assert d.sum() == disc_at((41, 41), 20, 20, 10).sum()  # whole discs (away from the border)
        rows, cols = np.nonzero(d)
        assert mask[round(rows.mean()), round(cols.mean())]
    assert not prompt[70:95, 10:35].any()


def test_tiny_objects_still_get_prompts():
    mask = np.zeros((50, 50), bool)
    mask[20:22, 30:32] = True  # one 4 px component: the fallback uses it
    rng = np.random.default_rng(0)
    for name, prompt in vp.all_prompts(mask, rng).items():
        assert prompt.any(), name
        assert (prompt & mask).any(), name


@pytest.mark.parametrize("seed", range(10))
def test_box_is_the_component_box_scaled_09_to_11(seed):
    mask = np.zeros((120, 140), bool)
    mask[30:70, 40:100] = disc_at((40, 60), 20, 30, 25)  # an ellipse-ish blob with box 40 x 60
    r0, c0, r1, c1 = box_of(mask)
    prompt = vp.box_prompt(mask, np.random.default_rng(seed))
    (only,) = parts(prompt)
    b0, d0, b1, d1 = box_of(only)
    assert only.sum() == (b1 - b0) * (d1 - d0)  # filled rectangle
    h, w = r1 - r0, c1 - c0
    assert 0.9 * h - 1 <= b1 - b0 <= 1.1 * h + 1 and 0.9 * w - 1 <= d1 - d0 <= 1.1 * w + 1
    assert abs((b0 + b1) - (r0 + r1)) <= 1 and abs((d0 + d1) - (c0 + c1)) <= 1  # same centre
    assert abs((b1 - b0) / h - (d1 - d0) / w) < 0.06  # one factor for both sides


def test_box_one_per_component_and_clipped_to_the_image():
    mask = rect((80, 80), 0, 0, 30, 30)  # touches the top-left border
    mask = rect(mask.shape, 50, 50, 70, 78, mask)
    corners = []
    for seed in range(8):
        prompt = vp.box_prompt(mask, np.random.default_rng(seed))
        boxes = parts(prompt)
        assert len(boxes) == 2
        corners.append(box_of(boxes[0])[:2])
        for b in boxes:
            assert b.sum() == np.prod([e - s for s, e in zip(box_of(b)[:2], box_of(b)[2:])])
    assert (0, 0) in corners  # a grown box is cut at the border
    assert all(r <= 2 and c <= 2 for r, c in corners)  # a shrunk one moves in by <= 5% of 30 px


@pytest.mark.parametrize("seed", range(10))
def test_scribble_is_a_thick_stroke_across_the_object(seed):
    mask = rect((200, 200), 60, 50, 140, 150)  # 80 x 100 box, centroid (99.5, 99.5)
    prompt = vp.scribble_prompt(mask, np.random.default_rng(seed))
    assert prompt.dtype == bool and prompt.shape == mask.shape
    assert len(parts(prompt)) == 1  # one connected stroke
    assert ndimage.binary_erosion(prompt, structure=vp.disc(4)).any()  # about radius 5 thick
    rows, cols = np.nonzero(prompt)
    # columns: inside the widest jittered box (1.2 x 100 around the centre) plus the stroke radius
    assert cols.min() >= 99.5 - 60 - 6 and cols.max() <= 99.5 + 60 + 6
    assert cols.max() - cols.min() >= 0.5 * 100 - 2  # the IoU >= 0.5 box is at least half as wide
    # rows: inside the jittered box, moved by the sine wobble (<= 20 px) and the radius
    assert rows.min() >= 99.5 - 48 - 26 and rows.max() <= 99.5 + 48 + 26
    # the diagonal's middle crosses the centre column within the wobble amplitude
    centre_rows = np.nonzero(prompt[:, 100])[0]
    assert len(centre_rows) and np.abs(centre_rows - 99.5).min() <= 26


def test_scribble_one_stroke_per_component():
    mask = rect((200, 300), 40, 20, 120, 110)
    mask = rect(mask.shape, 40, 190, 120, 280, mask)
    prompt = vp.scribble_prompt(mask, np.random.default_rng(1))
    assert prompt[:, :150].any() and prompt[:, 150:].any()
    assert not prompt[:, 140:160].any()  # the strokes stay near their own component


def test_mask_prompt_is_close_to_the_mask():
    mask = disc_at((100, 100), 50, 50, 20)
    mask[50, 50] = False  # a one-pixel hole: smoothed away
    prompt = vp.mask_prompt(mask, np.random.default_rng(0))
    assert prompt[50, 50]
    assert prompt[mask].all()  # covers the mask
    assert not (prompt & ~vp.dilate(mask, 6)).any()  # grows it by a few pixels at most
    iou = (prompt & mask).sum() / (prompt | mask).sum()
    assert iou > 0.75
    # the threshold (the blurred image's mean) grows with the object's share of the image: a large
    # object's prompt is slightly eroded instead of grown
    big = rect((100, 100), 10, 10, 90, 90)
    big_prompt = vp.mask_prompt(big)
    assert not (big_prompt & ~big).any() and (big_prompt & big).sum() / big.sum() > 0.9


def test_empty_and_full_masks():
    rng = np.random.default_rng(0)
    empty = np.zeros((30, 40), bool)
    assert not any(p.any() for p in vp.all_prompts(empty, rng).values())
    full = np.ones((30, 40), bool)
    np.testing.assert_array_equal(vp.mask_prompt(full), full)
    assert all(p.any() for p in vp.all_prompts(full, rng).values())


def test_same_generator_state_same_prompts():
    mask = rect((90, 90), 20, 20, 70, 60)
    mask = rect(mask.shape, 75, 70, 88, 88, mask)
    a = vp.all_prompts(mask, np.random.default_rng(42))
    b = vp.all_prompts(mask, np.random.default_rng(42))
    c = vp.all_prompts(mask, np.random.default_rng(43))
    for name in vp.PROMPTS:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[n], c[n]) for n in ("point", "scribble", "box"))


def test_dilate_matches_a_full_image_dilation():
    rng = np.random.default_rng(5)
    seeds = rng.random((60, 70)) < 0.01
    for radius in (1, 5, 10):
        full = ndimage.binary_dilation(seeds, structure=vp.disc(radius))
        np.testing.assert_array_equal(vp.dilate(seeds, radius), full)
