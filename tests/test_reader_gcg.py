"""GCG readers (gcg_grandf, gcg_refcocog, gcg_flickr, gcg_eval): captions, phrase spans <-> segments,
masks pixel for pixel against the fixture generator's truth, and their format-specific bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import convert_fixtures, mask_of, read_split
from xsam.data.convert import convert
from xsam.data.fixtures import generate
from xsam.data.registry import load_registry

FORMATS = ["gcg_grandf", "gcg_refcocog", "gcg_flickr", "gcg_eval"]
DATASETS = ["fixture_gcg_grandf", "fixture_gcg_psg", "fixture_gcg_refcocog", "fixture_gcg_flickr", "fixture_gcg_eval"]


def test_gcg_captions_phrases_and_masks_equal_the_source(tmp_path):
    made, out, outcomes = convert_fixtures(tmp_path, FORMATS)
    assert sorted(o.dataset for o in outcomes if o.status == "converted") == sorted(
        [d for d in DATASETS for _ in made[d].truth]), outcomes
    assert all(o.manifest.num_quarantined == 0 for o in outcomes)
    checked_phrases = 0
    for name in DATASETS:
        for split, truth in made[name].truth.items():
            got = read_split(out, name, split)
            assert set(got) == set(truth), name
            for source_id, t in truth.items():
                sample, image, ext = got[source_id]
                assert ext == "jpg" and image[:3] == b"\xff\xd8\xff"
                assert sample.task.value == "gcg" and sample.label_space is None
                assert (sample.image.width, sample.image.height, sample.image.file_name) == (
                    t["width"], t["height"], t["file_name"])
                assert sample.gcg.caption == t["caption"]
                phrases = [(p.start, p.end, p.text, p.segment_ids) for p in sample.gcg.phrases]
                assert phrases == t["phrases"], (name, source_id)
                for p in sample.gcg.phrases:
                    assert sample.gcg.caption[p.start:p.end] == p.text
                    checked_phrases += 1
                assert sorted(s.id for s in sample.segments) == sorted(t["segments"])
                for seg in sample.segments:
                    mask = t["segments"][seg.id]
                    np.testing.assert_array_equal(mask_of(seg.mask), mask)
                    assert seg.category_id is None and seg.area == int(mask.sum())
                    ys, xs = np.nonzero(mask)
                    assert seg.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
                assert sample.referring == [] and sample.visual_prompts == []
    assert checked_phrases > 40


def test_phrase_details_of_each_format(tmp_path):
    """Spot checks of what each format adds: multi-mask phrases, repeated sentences, shared spans."""
    _, out, _ = convert_fixtures(tmp_path, FORMATS)
    grandf = read_split(out, "fixture_gcg_grandf", "train")
    multi = [p for s, _, _ in grandf.values() for p in s.gcg.phrases if p.text.lower() == "two dogs"]
    assert multi and all(len(p.segment_ids) == 2 for p in multi)
    refcocog = read_split(out, "fixture_gcg_refcocog", "train")
    first = refcocog["COCO_train2014_000000000100.jpg_0"][0].gcg
    assert [(p.start, p.end, p.text) for p in first.phrases] == [(0, 5, "A dog"), (13, 18, "a dog")]
    flickr = read_split(out, "fixture_gcg_flickr", "train")
    assert len({s.image.file_name for s, _, _ in flickr.values()}) == 3  # two captions per picture
    shared = [p for s, _, _ in flickr.values() for p in s.gcg.phrases if len(p.segment_ids) > 1]
    assert shared  # annotations grounded by the same span share one phrase
    val = read_split(out, "fixture_gcg_eval", "val")
    assert all(s.gcg.phrases == [] and s.segments for s, _, _ in val.values())


# -- bad input ----------------------------------------------------------------------------------


@pytest.fixture()
def fx(tmp_path):
    generate(tmp_path / "fx", FORMATS)
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems
    return tmp_path, entries, tmp_path / "fx" / "data"


def _edit(path: Path, mutate) -> object:
    doc = json.loads(path.read_text(encoding="utf-8"))
    mutate(doc)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return doc


def _run(tmp, entries, names):
    out = str(tmp / "out")
    outcomes = convert([entries[n] for n in names], str(tmp / "fx" / "data"), out, log=lambda _: None)
    return out, {(o.dataset, o.split): o for o in outcomes}


def _quarantined(tmp, entries, name, split, expect_read, disjoint=True):
    """Convert one dataset; check the counts reconcile; return its quarantine lines."""
    out, outcomes = _run(tmp, entries, [name])
    o = outcomes[(name, split)]
    assert o.status == "converted", o.error
    lines = [json.loads(x) for x in (Path(out) / "_meta" / name / split / "quarantine.jsonl").read_text().splitlines()]
    assert o.manifest.num_read == expect_read
    assert o.manifest.num_samples + len(lines) == expect_read
    if disjoint:  # (a duplicate id is quarantined while its first record converts)
        assert set(read_split(out, name, split)).isdisjoint(q["source_id"] for q in lines)
    return lines


def test_grandf_span_not_holding_its_phrase_is_quarantined(fx):
    tmp, entries, data = fx
    path = data / "gcg_grandf" / "annotations" / "GranDf_HA_GCG_train.json"
    doc = _edit(path, lambda d: next(iter(d[1]["groundings"].values()))["token_positives"].__setitem__(0, 1))
    (q,) = _quarantined(tmp, entries, "fixture_gcg_grandf", "train", 5)
    phrase = next(iter(doc[1]["groundings"]))
    assert q["source_id"] == doc[1]["image_id"] and "not the phrase" in q["reason"]
    assert q["field"] == f"1.groundings.{phrase}.token_positives"
    assert q["file"].endswith("GranDf_HA_GCG_train.json")


def test_grandf_span_outside_the_caption_is_quarantined(fx):
    tmp, entries, data = fx
    path = data / "gcg_grandf" / "annotations" / "GranDf_HA_GCG_train.json"
    doc = _edit(path, lambda d: next(iter(d[2]["groundings"].values())).update(token_positives=[3, 999]))
    (q,) = _quarantined(tmp, entries, "fixture_gcg_grandf", "train", 5)
    assert q["source_id"] == doc[2]["image_id"] and "not inside the caption" in q["reason"]
    assert q["field"].startswith("2.groundings.") and q["field"].endswith(".token_positives")


def test_grandf_invalid_rle_is_quarantined_naming_the_mask(fx):
    tmp, entries, data = fx
    path = data / "gcg_grandf" / "annotations" / "GranDf_HA_GCG_train.json"

    def corrupt(d):
        rle = next(iter(d[3]["groundings"].values()))["rle_masks"][0]
        rle["counts"] = rle["counts"][: len(rle["counts"]) // 2]  # runs no longer cover the image

    doc = _edit(path, corrupt)
    (q,) = _quarantined(tmp, entries, "fixture_gcg_grandf", "train", 5)
    phrase = next(iter(doc[3]["groundings"]))
    assert q["source_id"] == doc[3]["image_id"] and "invalid RLE" in q["reason"]
    assert q["field"] == f"3.groundings.{phrase}.rle_masks.0.counts"


def test_grandf_rle_of_another_size_and_duplicate_ids_are_quarantined(fx):
    tmp, entries, data = fx
    path = data / "gcg_grandf" / "annotations" / "GranDf_HA_GCG_train.json"

    def mutate(d):
        rle = next(iter(d[0]["groundings"].values()))["rle_masks"][0]
        rle["size"] = [rle["size"][0] + 1, rle["size"][1]]
        d[4]["image_id"] = d[2]["image_id"]

    doc = _edit(path, mutate)
    lines = {q["field"]: q for q in _quarantined(tmp, entries, "fixture_gcg_grandf", "train", 5, False)}
    phrase = next(iter(doc[0]["groundings"]))
    assert "image size" in lines[f"0.groundings.{phrase}.rle_masks.0.size"]["reason"]
    assert "duplicate source id" in lines["4.image_id"]["reason"]


def test_grandf_non_utf8_phrase_is_quarantined(fx):
    tmp, entries, data = fx
    path = data / "gcg_grandf" / "annotations" / "GranDf_HA_GCG_train.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    phrase = next(iter(doc[1]["groundings"]))
    key = json.dumps(phrase).encode()  # as the file spells it (non-ASCII escaped)
    raw = path.read_bytes()
    assert key + b": {" in raw
    path.write_bytes(raw.replace(key + b": {", key[:-1] + b'\xff": {', 1))
    (q,) = _quarantined(tmp, entries, "fixture_gcg_grandf", "train", 5)
    assert q["source_id"] == doc[1]["image_id"] and "non-UTF-8" in q["reason"]
    assert q["field"].startswith("1.groundings.")


def test_refcocog_ref_missing_from_the_caption_is_skipped_as_glamm_does(fx):
    """GLaMM (and X-SAM) skip a ref whose sentence is not in the caption and keep the others; a record
    left with no ref is quarantined. The caption loses its surrounding quotes first, as in GLaMM."""
    tmp, entries, data = fx
    path = data / "gcg_refcocog" / "annotations" / "RefCOCOg_GCG_train.json"

    def mutate(d):
        rec1, rec2 = next(iter(d[1].values())), next(iter(d[2].values()))
        rec1["refs"][1]["sentence"] = "a purple elephant"
        rec1["caption"] = f'"{rec1["caption"]}"'
        for ref in rec2["refs"]:
            ref["sentence"] = "a purple elephant"

    doc = _edit(path, mutate)
    (key1, rec1), (key2, _) = next(iter(doc[1].items())), next(iter(doc[2].items()))
    out, outcomes = _run(tmp, entries, ["fixture_gcg_refcocog"])
    m = outcomes[("fixture_gcg_refcocog", "train")].manifest
    assert (m.num_read, m.num_samples, m.num_quarantined) == (4, 3, 1)
    # the skipped ref of the kept record (the refs of the quarantined record are not counted twice)
    assert m.excluded == {"RefCOCOg-GCG ref whose sentence is not in the caption (skipped, as GLaMM does)": 1}
    lines = [json.loads(x) for x in (Path(out) / "_meta" / "fixture_gcg_refcocog" / "train" / "quarantine.jsonl")
             .read_text().splitlines()]
    assert [(q["source_id"], q["field"]) for q in lines] == [(key2, f"2.{key2}.refs.0.sentence")]
    assert "no ref sentence is in the caption" in lines[0]["reason"]
    gcg = read_split(out, "fixture_gcg_refcocog", "train")[key1][0].gcg
    assert gcg.caption == rec1["caption"][1:-1]
    kept = [r["sentence"] for j, r in enumerate(rec1["refs"]) if j != 1]
    assert sorted(p.text.lower() for p in gcg.phrases) == sorted(s.lower() for s in kept)
    assert all(gcg.caption[p.start:p.end] == p.text for p in gcg.phrases)


def test_grandf_offsets_apply_to_the_caption_without_its_quotes(fx):
    """GLaMM strips the caption's surrounding double quotes and spaces before using token_positives."""
    tmp, entries, data = fx
    path = data / "gcg_grandf" / "annotations" / "GranDf_HA_GCG_train.json"
    doc = _edit(path, lambda d: d[1].update(caption=f'"{d[1]["caption"]}"'))
    out, outcomes = _run(tmp, entries, ["fixture_gcg_grandf"])
    assert outcomes[("fixture_gcg_grandf", "train")].manifest.num_quarantined == 0
    gcg = read_split(out, "fixture_gcg_grandf", "train")[str(doc[1]["image_id"])][0].gcg
    assert gcg.caption == doc[1]["caption"][1:-1]
    spans = sorted(tuple(g["token_positives"]) for g in doc[1]["groundings"].values())
    assert [(p.start, p.end) for p in gcg.phrases] == spans
    assert all(gcg.caption[p.start:p.end] == p.text for p in gcg.phrases)


def test_refcocog_bad_polygon_and_malformed_record(fx):
    tmp, entries, data = fx
    path = data / "gcg_refcocog" / "annotations" / "RefCOCOg_GCG_train.json"

    def mutate(d):
        next(iter(d[3].values()))["refs"][0]["segmentation"] = [[1.0, 2.0, 3.0]]
        d[2] = {"a": {}, "b": {}}

    doc = _edit(path, mutate)
    lines = {q["source_id"]: q for q in _quarantined(tmp, entries, "fixture_gcg_refcocog", "train", 4)}
    key = next(iter(doc[3]))
    assert lines[key]["field"] == f"3.{key}.refs.0.segmentation.0" and "invalid polygon" in lines[key]["reason"]
    assert lines["record[2]"]["field"] == "2"


def test_flickr_bad_span_and_orphan_annotations(fx):
    tmp, entries, data = fx
    path = data / "gcg_flickr" / "annotations" / "flickr_mergedGT_GCG_train.json"

    def mutate(d):
        d["annotations"][2]["tokens_positive"] = [[5, 4]]
        d["annotations"][-1]["image_id"] = 999

    doc = _edit(path, mutate)
    lines = {q["source_id"]: q for q in _quarantined(tmp, entries, "fixture_gcg_flickr", "train", 7)}
    bad = str(doc["annotations"][2]["image_id"])
    assert lines[bad]["field"] == "annotations.2.tokens_positive.0"
    assert lines["999"]["field"] == f"annotations.{len(doc['annotations']) - 1}.image_id"


def test_flickr_invalid_sam_mask_is_quarantined(fx):
    tmp, entries, data = fx
    path = data / "gcg_flickr" / "annotations" / "flickr_mergedGT_GCG_train.json"
    doc = _edit(path, lambda d: d["annotations"][0]["sam_mask"].update(counts="\x01\x02"))
    (q,) = _quarantined(tmp, entries, "fixture_gcg_flickr", "train", 6)
    assert q["source_id"] == str(doc["annotations"][0]["image_id"])
    assert q["field"] == "annotations.0.sam_mask.counts" and "invalid RLE" in q["reason"]


def test_eval_image_in_one_file_only_is_quarantined(fx):
    tmp, entries, data = fx
    ann = data / "gcg_eval" / "annotations"

    def drop_caption(d):
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != d["images"][0]["id"]]
        d["images"] = d["images"][1:]

    caps = _edit(ann / "val_gcg_coco_caption_gt.json", drop_caption)
    masks = _edit(ann / "val_gcg_coco_mask_gt.json", lambda d: d["images"].pop(2))
    lines = {q["source_id"]: q for q in _quarantined(tmp, entries, "fixture_gcg_eval", "val", 3)}
    no_caption, no_mask = f"sa_{9000}", f"sa_{9002}"
    assert caps and masks
    assert "not in the caption file" in lines[no_caption]["reason"]
    assert lines[no_caption]["file"].endswith("val_gcg_coco_caption_gt.json")
    assert "not in the mask file" in lines[no_mask]["reason"]
    assert lines[no_mask]["file"].endswith("val_gcg_coco_mask_gt.json")


def test_missing_annotation_file_fails_only_that_dataset(fx):
    tmp, entries, data = fx
    (data / "gcg_eval" / "annotations" / "test_gcg_coco_caption_gt.json").unlink()
    (data / "gcg_grandf" / "annotations" / "OpenPsgGCG_train.json").unlink()
    _, outcomes = _run(tmp, entries, ["fixture_gcg_eval", "fixture_gcg_psg", "fixture_gcg_grandf"])
    assert outcomes[("fixture_gcg_eval", "test")].status == "failed"
    assert "test_gcg_coco_caption_gt.json" in outcomes[("fixture_gcg_eval", "test")].error
    assert outcomes[("fixture_gcg_psg", "train")].status == "failed"
    assert "OpenPsgGCG_train.json" in outcomes[("fixture_gcg_psg", "train")].error
    assert outcomes[("fixture_gcg_eval", "val")].manifest.num_samples == 3
    assert outcomes[("fixture_gcg_grandf", "train")].manifest.num_samples == 5
