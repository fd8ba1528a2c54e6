"""COCO instances reader: masks pixel for pixel against the generator's truth, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import convert_fixtures, mask_of, read_split

from xsam.data.convert import convert
from xsam.data.fixtures import generate
from xsam.data.fixtures.coco_instances import THING_CATEGORIES
from xsam.data.registry import load_registry
from xsam.eval.instance import InstanceAccumulator, segment_ground_truth

DS = "fixture_coco_instances"


def _kind(segmentation):
    if isinstance(segmentation, list):
        return "polygon"
    return "rle" if isinstance(segmentation["counts"], list) else "compressed_rle"


def test_instances_masks_equal_source_pixel_for_pixel(tmp_path):
    made, out, outcomes = convert_fixtures(tmp_path, ["coco_instances"])
    assert all(o.status == "converted" for o in outcomes), outcomes
    source = json.loads((tmp_path / "fx/data/coco_instances/annotations/instances_train.json").read_text())
    kinds = {(_kind(a["segmentation"]), a["iscrowd"]) for a in source["annotations"]}
    assert kinds >= {("polygon", 0), ("rle", 0), ("compressed_rle", 0), ("rle", 1)}  # every encoding is tested
    for o in outcomes:
        assert o.manifest.categories == [{"id": c["id"], "name": c["name"]} for c in THING_CATEGORIES]
        assert o.manifest.num_quarantined == 0
    for split, truth in made[DS].truth.items():
        got = read_split(out, DS, split)
        assert set(got) == set(truth)
        assert any(not t["segments"] for t in truth.values())  # an image without annotations is a sample
        for image_id, t in truth.items():
            sample, image, ext = got[image_id]
            assert ext == "jpg" and image[:3] == b"\xff\xd8\xff"
            assert (sample.image.id, sample.image.file_name) == (image_id, f"{int(image_id):012d}.jpg")
            assert (sample.image.width, sample.image.height) == (t["width"], t["height"])
            assert sample.task.value == "instance_seg" and sample.label_space == "fixture_coco_instances"
            assert sample.provenance.source_file == f"annotations/instances_{split}.json"
            assert {s.id for s in sample.segments} == set(t["segments"])
            for seg in sample.segments:
                cat, crowd, mask = t["segments"][seg.id]
                assert (seg.category_id, seg.iscrowd) == (cat, crowd)
                assert seg.mask.size == (t["height"], t["width"])
                np.testing.assert_array_equal(mask_of(seg.mask), mask)
                assert seg.area == int(mask.sum()) == seg.source_area  # the fixture's `area` is the pixel count
                ys, xs = np.nonzero(mask)
                assert seg.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert not sample.visual_prompts and sample.ignore_mask is None


# -- bad input -----------------------------------------------------------------------------------------

@pytest.fixture()
def fx(tmp_path):
    generate(tmp_path / "fx", ["coco_instances", "coco_vgd"])
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems
    path = tmp_path / "fx" / "data" / "coco_instances" / "annotations" / "instances_train.json"
    return tmp_path, entries, path, json.loads(path.read_text())


def _run(tmp_path, entries, names=(DS,)):
    out = str(tmp_path / "out")
    outcomes = convert([entries[n] for n in names], str(tmp_path / "fx" / "data"), out, log=lambda _: None)
    return out, {(o.dataset, o.split): o for o in outcomes}


def _quarantined(out, split="train"):
    return [json.loads(line) for line in (Path(out) / "_meta" / DS / split / "quarantine.jsonl").read_text().splitlines()]


def _annotation(doc, kind, crowd=0):
    """(index, annotation) of the first annotation with that encoding."""
    return next((i, a) for i, a in enumerate(doc["annotations"])
                if _kind(a["segmentation"]) == kind and a["iscrowd"] == crowd)


def _expect_one(tmp_path, entries, path, doc, source_id, reason, field=None, num_read=5,
                file="instances_train.json"):
    path.write_text(json.dumps(doc))
    out, outcomes = _run(tmp_path, entries)
    m = outcomes[(DS, "train")].manifest
    assert outcomes[(DS, "train")].status == "converted"
    assert (m.num_read, m.num_samples, m.num_quarantined) == (num_read, num_read - 1, 1)
    (q,) = _quarantined(out)
    assert q["source_id"] == str(source_id), q
    assert reason in q["reason"], q
    assert q["field"] == field, q
    assert q["file"] and q["file"].endswith(file), q
    got = read_split(out, DS, "train")
    assert str(source_id) not in got and len(got) == num_read - 1
    assert outcomes[(DS, "val")].manifest.num_quarantined == 0


def test_invalid_compressed_rle_is_quarantined_naming_the_field(fx):
    tmp, entries, path, doc = fx
    i, ann = _annotation(doc, "compressed_rle")
    ann["segmentation"]["counts"] = ann["segmentation"]["counts"][:-3]  # runs no longer cover the image
    _expect_one(tmp, entries, path, doc, ann["image_id"], "invalid RLE", f"annotations.{i}.segmentation.counts")


def test_uncompressed_rle_with_wrong_total_is_quarantined(fx):
    tmp, entries, path, doc = fx
    i, ann = _annotation(doc, "rle", crowd=1)
    ann["segmentation"]["counts"].append(7)
    _expect_one(tmp, entries, path, doc, ann["image_id"], "counts sum to", f"annotations.{i}.segmentation.counts")


def test_degenerate_polygon_is_quarantined(fx):
    tmp, entries, path, doc = fx
    i, ann = _annotation(doc, "polygon")
    ann["segmentation"][0] = [1.0, 2.0, 3.0, 4.0]
    _expect_one(tmp, entries, path, doc, ann["image_id"], "invalid polygon", f"annotations.{i}.segmentation.0")


def test_missing_segmentation_and_unknown_category_are_quarantined_at_planning(fx):
    tmp, entries, path, doc = fx
    i, ann = _annotation(doc, "polygon")
    del ann["segmentation"]
    _expect_one(tmp, entries, path, doc, ann["image_id"], "malformed annotation", f"annotations.{i}.segmentation")
    doc = json.loads(path.read_text())
    doc["annotations"][i]["segmentation"] = [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]
    doc["annotations"][i]["category_id"] = 999
    _expect_one(tmp, entries, path, doc, ann["image_id"], "unknown category_id 999", f"annotations.{i}.category_id")


def test_annotation_of_a_missing_image_is_quarantined(fx):
    tmp, entries, path, doc = fx
    orphan = dict(doc["annotations"][0], id=987654, image_id=4242)
    doc["annotations"].append(orphan)
    # 5 images + one quarantined record for the 1 annotation of the unknown image 4242
    _expect_one(tmp, entries, path, doc, 4242, "no entry in images", f"annotations.{len(doc['annotations']) - 1}.image_id",
                num_read=6)


def test_image_size_mismatch_is_quarantined(fx):
    tmp, entries, path, doc = fx
    doc["images"][1]["width"] += 3
    _expect_one(tmp, entries, path, doc, doc["images"][1]["id"], "but annotations say", "image.size",
                file=doc["images"][1]["file_name"])


def test_missing_annotation_file_fails_only_its_dataset(fx):
    tmp, entries, path, _ = fx
    path.unlink()
    _out, outcomes = _run(tmp, entries, (DS, "fixture_coco_vgd"))
    assert outcomes[(DS, "train")].status == "failed"
    assert "instances_train.json" in outcomes[(DS, "train")].error
    assert outcomes[(DS, "val")].status == "converted"
    assert all(outcomes[("fixture_coco_vgd", s)].status == "converted" for s in ("train", "val"))


def test_malformed_category_fails_the_dataset_naming_the_field(fx):
    tmp, entries, path, doc = fx
    doc["categories"][2]["name"] = None
    path.write_text(json.dumps(doc))
    _, outcomes = _run(tmp, entries)
    o = outcomes[(DS, "train")]
    assert o.status == "failed" and "categories.2.name" in o.error and "instances_train.json" in o.error
    assert outcomes[(DS, "val")].status == "converted"


def test_duplicate_image_ids_refuse_every_entry(fx):
    tmp, entries, path, doc = fx
    dup, old = doc["images"][2]["id"], doc["images"][3]["id"]
    doc["images"][3]["id"] = dup
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != old]  # else they are orphans
    path.write_text(json.dumps(doc))
    out, outcomes = _run(tmp, entries)
    m = outcomes[(DS, "train")].manifest
    assert (m.num_read, m.num_samples, m.num_quarantined) == (5, 3, 2)
    quarantined = _quarantined(out)
    assert [q["source_id"] for q in quarantined] == [str(dup)] * 2
    assert {q["field"] for q in quarantined} == {"images.2.id", "images.3.id"}
    assert str(dup) not in read_split(out, DS, "train")


def test_lvis_image_records_without_file_name_resolve_through_coco_url(fx):
    tmp, entries, path, doc = fx
    for img in doc["images"]:
        img["coco_url"] = f"http://images.cocodataset.org/train/{img.pop('file_name')}"
    path.write_text(json.dumps(doc))
    entry = entries[DS]
    splits = {**entry.splits, "train": {**entry.splits["train"], "images": "images"}}  # the COCO root
    _, outcomes = _run(tmp, {DS: entry.model_copy(update={"splits": splits})})
    assert outcomes[(DS, "train")].manifest.num_samples == 5
    got = read_split(str(tmp / "out"), DS, "train")
    assert {s.image.file_name for s, _, _ in got.values()} == {f"train/{int(i):012d}.jpg" for i in got}


def test_source_area_is_kept_and_decides_coco_size_ranges(fx):
    """COCO's small / medium / large split uses the annotation's own `area` (pycocotools reads it from
    the GT file): the shard keeps it beside the mask's pixel count, and the AP ground truth uses it."""
    tmp, entries, path, doc = fx
    i, ann = _annotation(doc, "polygon")
    doc["annotations"][i]["area"] = 96.0 ** 2 + 1  # "large", whatever the polygon's pixel count
    doc["annotations"][_annotation(doc, "compressed_rle")[0]].pop("area")
    path.write_text(json.dumps(doc))
    out, outcomes = _run(tmp, entries)
    assert outcomes[(DS, "train")].manifest.num_quarantined == 0
    segments = {s.id: s for sample, _, _ in read_split(out, DS, "train").values() for s in sample.segments}
    seg = segments[ann["id"]]
    assert seg.source_area == 96.0 ** 2 + 1 and seg.area < 96 ** 2  # fixture images are at most 96 x 80
    assert segments[_annotation(doc, "compressed_rle")[1]["id"]].source_area is None  # no `area` in the source
    gt = segment_ground_truth(seg)
    assert gt["area"] == 96.0 ** 2 + 1
    by_area = {}
    for name, g in (("source", gt), ("pixels", {**gt, "area": None})):
        acc = InstanceAccumulator([seg.category_id])
        acc.add([g], [{"mask": g["mask"], "category_id": seg.category_id, "score": 0.9}])
        by_area[name] = acc.result()
    assert by_area["source"]["APl"] == pytest.approx(100.0) and np.isnan(by_area["source"]["APs"])
    pixel_range = "APs" if seg.area < 32 ** 2 else "APm"
    assert by_area["pixels"][pixel_range] == pytest.approx(100.0) and np.isnan(by_area["pixels"]["APl"])
    doc["annotations"][i]["area"] = -1
    path.write_text(json.dumps(doc))
    _, outcomes = _run(tmp, entries)
    assert outcomes[(DS, "train")].manifest.num_quarantined == 1  # a negative area is refused, naming it
