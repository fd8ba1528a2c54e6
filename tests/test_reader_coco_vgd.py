"""COCO-VGD reader: instances + four deterministic visual prompts per non-crowd segment."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import mask_of, read_split

from xsam.data.convert import convert
from xsam.data.fixtures import generate
from xsam.data.readers.coco_vgd import prompt_rng
from xsam.data.registry import load_registry
from xsam.data.shards import read_manifest
from xsam.data.visual_prompts import all_prompts

DS = "fixture_coco_vgd"
TYPES = ["point", "scribble", "box", "mask"]


@pytest.fixture()
def fx(tmp_path):
    made = generate(tmp_path / "fx", ["coco_vgd"])
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems
    return tmp_path, made[DS], entries[DS]


def _convert(tmp_path, entry, out_name):
    out = str(tmp_path / out_name)
    outcomes = convert([entry], str(tmp_path / "fx" / "data"), out, log=lambda _: None)
    assert all(o.status == "converted" for o in outcomes), outcomes
    return out


def _prompts(out, split):
    """source_id -> [(type, segment_id, counts)] of every prompt."""
    return {sid: [(p.type.value, p.segment_id, p.mask.counts) for p in s.visual_prompts]
            for sid, (s, _, _) in read_split(out, DS, split).items()}


def test_every_non_crowd_segment_has_four_prompts_on_its_object(fx):
    tmp, made, entry = fx
    out = _convert(tmp, entry, "out")
    crowd_seen = False
    for split, truth in made.truth.items():
        got = read_split(out, DS, split)
        assert set(got) == set(truth)
        for image_id, t in truth.items():
            sample = got[image_id][0]
            assert sample.task.value == "vgd"
            assert {s.id for s in sample.segments} == set(t["segments"])
            by_segment = {}
            for p in sample.visual_prompts:
                by_segment.setdefault(p.segment_id, []).append(p)
            for seg in sample.segments:
                _cat, crowd, mask = t["segments"][seg.id]
                np.testing.assert_array_equal(mask_of(seg.mask), mask)
                if crowd:
                    crowd_seen = True
                    assert seg.id not in by_segment  # crowd regions get no prompts
                    continue
                prompts = by_segment.pop(seg.id)
                assert [p.type.value for p in prompts] == TYPES
                for p in prompts:
                    prompt = mask_of(p.mask)
                    assert prompt.shape == (t["height"], t["width"]) and prompt.any(), p.type
                    if p.type.value in ("point", "box", "mask"):
                        assert (prompt & mask).any(), p.type
                # the documented derivation: rasterisers fed by the (seed, dataset, split, image, segment) rng
                expected = all_prompts(mask, prompt_rng(1024, DS, split, image_id, seg.id))
                for p in prompts:
                    np.testing.assert_array_equal(mask_of(p.mask), expected[p.type.value])
            assert not by_segment  # no prompt points at a missing segment
    assert crowd_seen


def test_prompts_are_identical_across_conversions_and_independent_of_the_other_images(fx):
    tmp, _, entry = fx
    first = _convert(tmp, entry, "out1")
    second = _convert(tmp, entry, "out2")
    for split in ("train", "val"):
        assert _prompts(first, split) == _prompts(second, split)
        m1 = read_manifest(str(Path(first) / "_meta" / DS / split / "manifest.json"))
        m2 = read_manifest(str(Path(second) / "_meta" / DS / split / "manifest.json"))
        assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]  # byte-identical shards
    # keep one image in the source: its prompts do not move (no dependence on order or neighbours)
    path = tmp / "fx" / "data" / "coco_vgd" / "annotations" / "instances_train.json"
    doc = json.loads(path.read_text())
    keep = doc["images"][0]["id"]
    doc["images"] = doc["images"][:1]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] == keep]
    path.write_text(json.dumps(doc))
    alone = _convert(tmp, entry, "out3")
    assert _prompts(alone, "train") == {str(keep): _prompts(first, "train")[str(keep)]}


def test_the_seed_option_changes_the_random_prompts_only(fx):
    tmp, _, entry = fx
    base = _prompts(_convert(tmp, entry, "out1"), "train")
    reseeded = entry.model_copy(update={"options": {"seed": 7}})
    other = _prompts(_convert(tmp, reseeded, "out2"), "train")
    pairs = [(a, b) for sid in base for a, b in zip(base[sid], other[sid], strict=True)]
    assert pairs and all(a[:2] == b[:2] for a, b in pairs)
    assert all(a == b for a, b in pairs if a[0] == "mask")  # the mask prompt draws nothing
    assert any(a != b for a, b in pairs if a[0] == "point")


def test_invalid_rle_in_a_vgd_source_is_quarantined(fx):
    tmp, _, entry = fx
    path = tmp / "fx" / "data" / "coco_vgd" / "annotations" / "instances_val.json"
    doc = json.loads(path.read_text())
    i, ann = next((i, a) for i, a in enumerate(doc["annotations"]) if isinstance(a["segmentation"], dict))
    ann["segmentation"]["size"] = [3, 4]
    path.write_text(json.dumps(doc))
    out = _convert(tmp, entry, "out")
    lines = (Path(out) / "_meta" / DS / "val" / "quarantine.jsonl").read_text().splitlines()
    (q,) = [json.loads(line) for line in lines]
    assert q["source_id"] == str(ann["image_id"]) and q["field"] == f"annotations.{i}.segmentation.size"
    assert "RLE size [3, 4] != image size" in q["reason"]
    assert str(ann["image_id"]) not in read_split(out, DS, "val")
