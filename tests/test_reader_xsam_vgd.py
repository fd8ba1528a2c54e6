"""X-SAM's released VGD files (xsam_vgd): a fixture in the release layout, round trip through the converter."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import convert_fixtures, mask_of, read_split

from xsam.data.convert import convert
from xsam.data.fixtures import generate
from xsam.data.fixtures.coco_instances import THING_CATEGORIES
from xsam.data.registry import load_registry
from xsam.data.shards import read_manifest

DS = "fixture_coco_vgd_frozen"
RELEASE = "annotations/coco_vgdseg_val.json"


def test_segments_prompts_and_label_space_equal_the_release(tmp_path):
    made, out, outcomes = convert_fixtures(tmp_path, ["xsam_vgd"])
    assert [o.status for o in outcomes] == ["converted"] and outcomes[0].manifest.num_quarantined == 0
    truth = made[DS].truth["val"]
    got = read_split(out, DS, "val")
    assert set(got) == set(truth)
    manifest = read_manifest(str(Path(out) / "_meta" / DS / "val" / "manifest.json"))
    assert manifest.categories == [{"id": c["id"], "name": c["name"]} for c in THING_CATEGORIES]  # `categories`
    assert manifest.task == "vgd"
    empty_records = dropped_prompts = 0
    for image_id, t in truth.items():
        sample = got[image_id][0]
        assert (sample.image.width, sample.image.height, sample.image.file_name) == (t["width"], t["height"],
                                                                                     t["file_name"])
        assert {s.id: s.category_id for s in sample.segments} == {k: v[0] for k, v in t["segments"].items()}
        for seg in sample.segments:
            mask = t["segments"][seg.id][1]
            np.testing.assert_array_equal(mask_of(seg.mask), mask)
            assert seg.iscrowd == 0 and seg.area == int(mask.sum())
        got_prompts = {(p.segment_id, p.type.value): mask_of(p.mask) for p in sample.visual_prompts}
        assert set(got_prompts) == set(t["prompts"])  # stored prompts, none redrawn, empty ones dropped
        for key, m in got_prompts.items():
            np.testing.assert_array_equal(m, t["prompts"][key])
        order = [(p.segment_id, p.type.value) for p in sample.visual_prompts]
        assert order == sorted(order, key=lambda k: ([s.id for s in sample.segments].index(k[0]),
                                                     ["point", "scribble", "box", "mask"].index(k[1])))
        empty_records += not sample.segments
        dropped_prompts += 4 * len(sample.segments) - len(sample.visual_prompts)
    assert empty_records == 1  # the crowd-only image: a record without annotations
    assert dropped_prompts == 1  # the empty scribble prompt


@pytest.fixture()
def fx(tmp_path):
    generate(tmp_path / "fx", ["xsam_vgd"])
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems
    path = tmp_path / "fx" / "data" / "xsam_vgd" / RELEASE
    return tmp_path, entries, path, json.loads(path.read_text())


def _quarantined(tmp, entries, doc, path):
    path.write_text(json.dumps(doc))
    out = str(tmp / "out")
    (o,) = convert([entries[DS]], str(tmp / "fx" / "data"), out, log=lambda _: None)
    assert o.status == "converted", o.error
    lines = (Path(out) / "_meta" / DS / "val" / "quarantine.jsonl").read_text().splitlines()
    return o, [json.loads(x) for x in lines]


@pytest.mark.parametrize("mutate,field,reason", [
    (lambda r: r["annotations"][0].update(category_id=999), "0.annotations.0.category_id", "unknown category_id"),
    (lambda r: r["annotations"][0]["visual_prompts"].update(blob_visual_prompt={}),
     "0.annotations.0.visual_prompts.blob_visual_prompt", "unknown visual prompt"),
    (lambda r: r["annotations"][0]["visual_prompts"]["box_visual_prompt"].update(size=[3, 3]),
     "0.annotations.0.visual_prompts.box_visual_prompt.size", "RLE size"),
    (lambda r: r.update(image_size=[r["image_size"][0] + 1, r["image_size"][1]]), "image.size", "annotations say"),
    (lambda r: r.pop("image_file"), "0.image_file", "malformed"),
])
def test_bad_record_is_quarantined_naming_the_field(fx, mutate, field, reason):
    tmp, entries, path, doc = fx
    mutate(doc[0])
    o, (q,) = _quarantined(tmp, entries, doc, path)
    assert q["source_id"] == str(doc[0]["image_id"]) and q["field"] == field and reason in q["reason"]
    assert o.manifest.num_samples == len(doc) - 1


def test_image_listed_twice_is_refused(fx):
    tmp, entries, path, doc = fx
    doc.append(doc[1])
    o, qs = _quarantined(tmp, entries, doc, path)
    assert [q["source_id"] for q in qs] == [str(doc[1]["image_id"])] * 2
    assert o.manifest.num_samples == len(doc) - 2


def test_missing_categories_file_fails_the_dataset_naming_it(fx):
    tmp, entries, path, _ = fx
    (path.parent / "instances_val.json").unlink()
    (o,) = convert([entries[DS]], str(tmp / "fx" / "data"), str(tmp / "out"), log=lambda _: None)
    assert o.status == "failed" and "instances_val.json" in o.error
