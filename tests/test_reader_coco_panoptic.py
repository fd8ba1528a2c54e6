import json
import os

import numpy as np
from helpers import convert_fixtures, mask_of, read_split

from xsam.data import masks
from xsam.data.readers.coco_panoptic import CocoPanopticReader
from xsam.data.registry import RegistryEntry


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


# -- duplicates in a tiny hand-written panoptic JSON (planning only) ---------------------------------
def _panoptic_reader(tmp_path, images, annotations):
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": 1, "name": "person", "isthing": 1}]}
    (tmp_path / "panoptic_val.json").write_text(json.dumps(doc))
    entry = RegistryEntry(name="tiny_panoptic", task="generic_seg", format="coco_panoptic", license="x",
                          citation="x", splits={"val": {"annotations": "panoptic_val.json", "images": "img",
                                                        "masks": "png"}})
    return CocoPanopticReader(entry, "val", str(tmp_path)), str(tmp_path / "panoptic_val.json")


def _img(i, name):
    return {"id": i, "file_name": name, "width": 4, "height": 3}


def _ann(i, png):
    return {"image_id": i, "file_name": png, "segments_info": [{"id": 1, "category_id": 1}]}


def test_an_image_listed_twice_is_quarantined_on_every_entry(tmp_path):
    """Two image entries with one id (which one the mask belongs to is unknown), and two annotation
    records for one image: every entry is refused naming file and field; the clean image is planned."""
    reader, file = _panoptic_reader(
        tmp_path,
        images=[_img(1, "a.jpg"), _img(2, "b.jpg"), _img(1, "c.jpg"), _img(3, "d.jpg")],
        annotations=[_ann(1, "a.png"), _ann(2, "b.png"), _ann(3, "d1.png"), _ann(3, "d2.png")])
    plan = reader.plan()
    assert [item.source_id for item in plan.items] == ["2"]
    assert plan.items[0].files[1].endswith("b.png")
    got = sorted((q.source_id, q.field, q.file) for q in plan.quarantined)
    assert got == [("1", "images.0.id", file), ("1", "images.2.id", file),
                   ("3", "annotations.2.image_id", file), ("3", "annotations.3.image_id", file)]
    assert all("image id 1 is used by 2 image entries" == q.reason for q in plan.quarantined if q.source_id == "1")
    assert all("2 annotation records" in q.reason for q in plan.quarantined if q.source_id == "3")


def test_a_symlinked_image_pointing_outside_the_data_root_is_refused(tmp_path):
    """Symlinks are resolved before the escape check: an image file that links outside its folder is
    quarantined naming the field; an images folder that is itself a link (a common layout) still works,
    and so does a link that stays inside the folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"not yours")
    (tmp_path / "data").mkdir()
    (tmp_path / "real_images").mkdir()
    (tmp_path / "data" / "img").symlink_to(tmp_path / "real_images")  # the whole folder linked: fine
    (tmp_path / "real_images" / "b.jpg").write_bytes(b"")
    (tmp_path / "real_images" / "a.jpg").symlink_to(outside / "secret.jpg")
    (tmp_path / "real_images" / "c.jpg").symlink_to("b.jpg")  # stays inside: fine
    (tmp_path / "real_images" / "sub").symlink_to(outside)  # a linked sub-folder
    reader, file = _panoptic_reader(
        tmp_path / "data", images=[_img(1, "a.jpg"), _img(2, "b.jpg"), _img(3, "c.jpg"), _img(4, "sub/secret.jpg")],
        annotations=[_ann(i, f"{i}.png") for i in (1, 2, 3, 4)])
    plan = reader.plan()
    assert [item.source_id for item in plan.items] == ["2", "3"]
    got = sorted((q.source_id, q.field, q.file) for q in plan.quarantined)
    assert got == [("1", "images[id=1].file_name", file), ("4", "images[id=4].file_name", file)]
    assert all("escapes the data root through a symlink" in q.reason and os.path.realpath(outside / "secret.jpg") in q.reason
               for q in plan.quarantined)
