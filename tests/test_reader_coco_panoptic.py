import numpy as np

from helpers import convert_fixtures, mask_of, read_split
from xsam.data import masks


def test_panoptic_masks_equal_source_pixel_for_pixel(tmp_path):
    made, out, outcomes = convert_fixtures(tmp_path, ["coco_panoptic"])
    assert all(o.status == "converted" for o in outcomes), outcomes
    for split, truth in made["fixture_coco_panoptic"].truth.items():
        got = read_split(out, "fixture_coco_panoptic", split)
        assert set(got) == set(truth)
        for image_id, t in truth.items():
            sample, image, ext = got[image_id]
            assert ext == "jpg" and image[:3] == b"\xff\xd8\xff"
            assert (sample.image.width, sample.image.height) == (t["width"], t["height"])
            assert sample.task.value == "generic_seg" and sample.label_space == "fixture_coco_panoptic"
            assert {s.id for s in sample.segments} == set(t["segments"])
            for seg in sample.segments:
                cat, crowd, mask = t["segments"][seg.id]
                assert (seg.category_id, seg.iscrowd) == (cat, crowd)
                np.testing.assert_array_equal(mask_of(seg.mask), mask)
                assert seg.area == int(mask.sum())
                ys, xs = np.nonzero(mask)
                assert seg.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_semantic_view_merges_segments_by_category(tmp_path):
    made, out, _ = convert_fixtures(tmp_path, ["coco_panoptic"])
    truth = made["fixture_coco_semantic"].truth["val"]
    got = read_split(out, "fixture_coco_semantic", "val")
    for image_id, t in truth.items():
        sample = got[image_id][0]
        assert sorted(s.category_id for s in sample.segments) == sorted(t["segments"])
        for seg in sample.segments:
            np.testing.assert_array_equal(mask_of(seg.mask), t["segments"][seg.category_id][2])


def test_rle_roundtrip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < 0.4
        rle = masks.encode(m)
        np.testing.assert_array_equal(masks.decode(rle).astype(bool), m)
        assert masks.rle_from_source(rle, *m.shape, field="x") == rle
