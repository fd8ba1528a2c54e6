"""PSALM COCO-Interactive reader: segments and visual prompts pixel for pixel, and its bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import convert_fixtures, mask_of, read_split
from xsam.data.convert import convert
from xsam.data.fixtures import generate
from xsam.data.registry import load_registry

DS = "fixture_coco_interactive"
ANNOTATIONS = "annotations/coco_interactive_val2017_psalm.json"


def test_segments_and_prompts_equal_the_source(tmp_path):
    made, out, outcomes = convert_fixtures(tmp_path, ["psalm_interactive"])
    assert [o.status for o in outcomes] == ["converted"] and outcomes[0].manifest.num_quarantined == 0
    truth = made[DS].truth["val"]
    got = read_split(out, DS, "val")
    assert set(got) == set(truth)
    types_seen = set()
    for image_id, t in truth.items():
        sample, image, ext = got[image_id]
        assert ext == "jpg" and image[:3] == b"\xff\xd8\xff"
        assert sample.task.value == "interactive" and sample.label_space == "fixture_coco_instances"
        assert (sample.image.id, sample.image.file_name) == (image_id, t["file_name"])
        assert (sample.image.width, sample.image.height) == (t["width"], t["height"])
        assert [s.id for s in sample.segments] == list(t["segments"])
        for seg in sample.segments:
            cat, crowd, mask = t["segments"][seg.id]
            assert (seg.category_id, seg.iscrowd, seg.area) == (cat, crowd, int(mask.sum()))
            np.testing.assert_array_equal(mask_of(seg.mask), mask)
            ys, xs = np.nonzero(mask)
            assert seg.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        got_prompts = {(p.segment_id, p.type.value): p for p in sample.visual_prompts}
        assert len(got_prompts) == len(sample.visual_prompts)  # one per (annotation, type)
        assert set(got_prompts) == set(t["prompts"])
        for key, p in got_prompts.items():
            np.testing.assert_array_equal(mask_of(p.mask), t["prompts"][key])
            types_seen.add(p.type.value)
        assert sample.gcg is None and sample.referring == []
    assert types_seen == {"point", "scribble", "box", "mask"}
    assert any(crowd for t in truth.values() for _, crowd, _ in t["segments"].values())  # uncompressed RLE read


@pytest.fixture()
def fx(tmp_path):
    generate(tmp_path / "fx", ["psalm_interactive"])
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems
    path = tmp_path / "fx" / "data" / "psalm_interactive" / ANNOTATIONS
    return tmp_path, entries, path, json.loads(path.read_text())


def _run(tmp, entries, doc=None, path=None):
    if doc is not None:
        path.write_text(json.dumps(doc))
    out = str(tmp / "out")
    (outcome,) = convert([entries[DS]], str(tmp / "fx" / "data"), out, log=lambda _: None)
    return out, outcome


def _one_quarantined(tmp, entries, doc, path):
    out, o = _run(tmp, entries, doc, path)
    assert o.status == "converted", o.error
    assert (o.manifest.num_read, o.manifest.num_samples, o.manifest.num_quarantined) == (4, 3, 1)
    (q,) = [json.loads(x) for x in (Path(out) / "_meta" / DS / "val" / "quarantine.jsonl").read_text().splitlines()]
    assert q["source_id"] not in read_split(out, DS, "val")
    return q


@pytest.mark.parametrize("kind", ["point", "scribble", "mask"])
def test_invalid_prompt_rle_is_quarantined_naming_the_prompt(fx, kind):
    tmp, entries, path, doc = fx
    prompt = doc[2]["anns"][0][f"{kind}_visual_prompt_mask"]
    prompt["counts"] = prompt["counts"] + "0"  # one run too many
    q = _one_quarantined(tmp, entries, doc, path)
    assert q["source_id"] == str(doc[2]["image_info"]["id"]) and "invalid RLE" in q["reason"]
    assert q["field"] == f"2.anns.0.{kind}_visual_prompt_mask.counts"
    assert q["file"] == ANNOTATIONS


def test_prompt_of_another_size_is_quarantined(fx):
    tmp, entries, path, doc = fx
    doc[0]["anns"][0]["box_visual_prompt_mask"]["size"] = [3, 3]
    q = _one_quarantined(tmp, entries, doc, path)
    assert q["field"] == "0.anns.0.box_visual_prompt_mask.size"


@pytest.mark.parametrize("mutate,field", [
    (lambda e: e["image_info"].update(height="tall"), "3.image_info.height"),
    (lambda e: e["anns"][1].pop("category_id"), "3.anns.1.category_id"),
    (lambda e: e["anns"][1].update(id=e["anns"][0]["id"]), "3.anns.1.id"),
    (lambda e: e.update(image="../../outside.jpg"), "3.image"),
])
def test_malformed_entry_is_quarantined_naming_the_field(fx, mutate, field):
    tmp, entries, path, doc = fx
    mutate(doc[3])
    q = _one_quarantined(tmp, entries, doc, path)
    assert q["source_id"] == str(doc[3]["image_info"]["id"]) and q["field"] == field


def test_image_listed_twice_is_merged_into_one_sample(fx):
    tmp, entries, path, doc = fx
    split = {**doc[1], "anns": doc[1]["anns"][1:]}
    doc[1]["anns"] = doc[1]["anns"][:1]
    doc.append(split)
    out, o = _run(tmp, entries, doc, path)
    assert (o.manifest.num_read, o.manifest.num_samples) == (4, 4)
    sample = read_split(out, DS, "val")[str(doc[1]["image_info"]["id"])][0]
    assert [s.id for s in sample.segments] == [a["id"] for a in doc[1]["anns"] + split["anns"]]


def test_missing_annotation_file_fails_the_dataset_naming_it(fx):
    tmp, entries, path, _ = fx
    path.unlink()
    _, o = _run(tmp, entries)
    assert o.status == "failed" and path.name in o.error


def test_dilation_is_xsams_discs_and_can_be_turned_off(fx):
    from xsam.data.fixtures.interactive import _discs
    from xsam.data.readers.interactive import dilate_discs

    rng = np.random.default_rng(0)
    for radius in (1, 5, 10):
        mask = rng.random((23, 31)) < 0.02
        mask[0, 0] = mask[22, 30] = True  # discs clipped at the borders
        np.testing.assert_array_equal(dilate_discs(mask, radius), _discs(mask, radius))
    assert not dilate_discs(np.zeros((4, 4), bool), 10).any()
    tmp, entries, _path, doc = fx
    raw = entries[DS].model_copy(update={"options": {"point_radius": 0, "scribble_radius": 0}})
    (o,) = convert([raw], str(tmp / "fx" / "data"), str(tmp / "raw"), log=lambda _: None)
    assert o.status == "converted"
    sample = read_split(str(tmp / "raw"), DS, "val")[str(doc[0]["image_info"]["id"])][0]
    stored = {p.type.value: mask_of(p.mask) for p in sample.visual_prompts if p.segment_id == doc[0]["anns"][0]["id"]}
    from pycocotools import mask as mask_utils
    point = mask_utils.decode(doc[0]["anns"][0]["point_visual_prompt_mask"]).astype(bool)
    np.testing.assert_array_equal(stored["point"], point)  # as stored in the source
