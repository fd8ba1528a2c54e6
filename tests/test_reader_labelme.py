import json
from pathlib import Path

import numpy as np
import pytest

from helpers import mask_of, read_split
from xsam.data import storage
from xsam.data.convert import convert, serial_executor
from xsam.data.fixtures import generate
from xsam.data.registry import load_registry
from xsam.data.shards import meta_dir, split_dir

NAME = "fixture_reason_seg"


def _convert(tmp: Path, mutate=None):
    """Generate the ReasonSeg fixture, let `mutate(ReasonSeg folder, truth)` break it, convert."""
    made = generate(tmp / "fx", ["labelme"])
    if mutate:
        mutate(tmp / "fx" / "data" / "labelme" / "ReasonSeg", made[NAME].truth)
    entries, problems = load_registry(tmp / "fx" / "registry")
    assert not problems, problems
    out = str(tmp / "out")
    outcomes = convert(list(entries.values()), str(tmp / "fx" / "data"), out, executor=serial_executor,
                       log=lambda _: None)
    return made[NAME].truth, out, {o.split: o for o in outcomes}


def _quarantine(out: str, split: str) -> list[dict]:
    text = storage.read_bytes(storage.join(meta_dir(out, NAME, split), "quarantine.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def test_labelme_targets_ignore_region_and_explanations_match_the_truth(tmp_path):
    truth, out, outcomes = _convert(tmp_path)
    assert all(o.status == "converted" for o in outcomes.values()), outcomes
    explained = 0
    for split, expected in truth.items():
        got = read_split(out, NAME, split)
        assert set(got) == set(expected)
        for name, t in expected.items():
            sample, image, ext = got[name]
            assert ext == "jpg" and image[:3] == b"\xff\xd8\xff"
            assert sample.task.value == "reasoning_seg"
            assert (sample.image.file_name, sample.image.width, sample.image.height) == (name, t["width"], t["height"])
            assert [s.id for s in sample.segments] == list(range(1, len(t["targets"]) + 1))
            for seg, mask in zip(sample.segments, t["targets"]):
                assert seg.category_id is None and seg.area == int(mask.sum())
                np.testing.assert_array_equal(mask_of(seg.mask), mask)
            [query] = sample.reasoning
            assert (query.queries, query.is_sentence, query.explanation) == (
                t["queries"], t["is_sentence"], t["explanation"])
            assert query.segment_ids == [s.id for s in sample.segments]
            if t["ignore"] is None:
                assert sample.ignore_mask is None
            else:
                np.testing.assert_array_equal(mask_of(sample.ignore_mask), t["ignore"])
            explained += t["explanation"] is not None
    assert explained == 3


@pytest.mark.parametrize("edit, field", [
    # a byte that is neither UTF-8 nor cp1252 (0x81 is undefined there): the file is refused
    (lambda raw: raw.replace(b'"text": ["', b'"text": ["caf\x81 ', 1), None),
    (lambda raw: raw.replace(b'"is_sentence": ', b'"is_sentence": "maybe", "x": ', 1), "is_sentence"),
    (lambda raw: raw.replace(b'"shape_type": "polygon"', b'"shape_type": "circle"', 1), "shapes.{i}.shape_type"),
    (lambda raw: raw[: len(raw) // 2], None),  # truncated JSON
])
def test_malformed_labelme_json_is_quarantined_at_convert_time_naming_the_field(tmp_path, edit, field):
    state = {}

    def corrupt(root, truth):
        name = next(n for n in sorted(truth["val"]) if b'"text": [' in (root / "val" / (n[:-4] + ".json")).read_bytes())
        path = root / "val" / (name[:-4] + ".json")
        raw = path.read_bytes()
        doc = json.loads(raw)
        state.update(name=name, path=str(path), i=[s["shape_type"] for s in doc["shapes"]].index("polygon"))
        path.write_bytes(edit(raw))

    truth, out, outcomes = _convert(tmp_path, corrupt)
    assert outcomes["val"].status == "converted"
    [q] = _quarantine(out, "val")
    assert q["source_id"] == state["name"] and q["file"] == state["path"]
    assert q["field"] == (field.format(i=state["i"]) if field else None)
    assert set(read_split(out, NAME, "val")) == set(truth["val"]) - {state["name"]}
    m = outcomes["val"].manifest
    assert (m.num_read, m.num_samples, m.num_quarantined) == (len(truth["val"]), len(truth["val"]) - 1, 1)


def test_unpaired_files_and_a_wrong_image_size_are_quarantined(tmp_path):
    state = {}

    def break_pairs(root, truth):
        names = sorted(truth["train"])
        (root / "train" / (names[0][:-4] + ".json")).unlink()  # image without its LabelMe JSON
        (root / "train" / names[1]).unlink()  # LabelMe JSON without its image
        path = root / "train" / (names[2][:-4] + ".json")
        doc = json.loads(path.read_text())
        doc["imageWidth"] += 1
        path.write_text(json.dumps(doc))
        state["names"] = names

    _, out, _ = _convert(tmp_path, break_pairs)
    n = state["names"]
    got = {q["source_id"]: q for q in _quarantine(out, "train")}
    assert set(got) == {n[0], n[1][:-4] + ".json", n[2]}
    assert "no LabelMe JSON" in got[n[0]]["reason"] and got[n[0]]["file"].endswith(n[0])
    assert "without an image" in got[n[1][:-4] + ".json"]["reason"]
    assert got[n[2]]["field"] == "image.size"
    assert set(read_split(out, NAME, "train")) == set(n[3:])


def test_missing_explanations_file_fails_its_split_only(tmp_path):
    truth, out, outcomes = _convert(tmp_path, lambda root, _: (root / "explanatory" / "train.json").unlink())
    assert outcomes["train"].status == "failed" and "explanatory/train.json" in outcomes["train"].error
    assert outcomes["val"].status == "converted"
    assert set(read_split(out, NAME, "val")) == set(truth["val"])


def test_malformed_explanation_record_quarantines_its_image(tmp_path):
    state = {}

    def bad_explanation(root, truth):
        path = root / "explanatory" / "train.json"
        records = json.loads(path.read_text())
        records[1]["outputs"] = 42
        state["name"] = records[1]["image"]
        path.write_text(json.dumps(records))

    _, out, _ = _convert(tmp_path, bad_explanation)
    [q] = _quarantine(out, "train")
    assert (q["source_id"], q["field"]) == (state["name"], "1.outputs")
    assert q["file"].endswith("explanatory/train.json")


def test_cp1252_file_is_read_and_smaller_shapes_paint_over_larger_ones(tmp_path):
    """LISA's reading of a ReasonSeg JSON: cp1252 when it is not UTF-8, shapes painted largest first."""
    state = {}

    def rewrite(root, truth):
        name = sorted(truth["val"])[0]
        w, h = truth["val"][name]["width"], truth["val"][name]["height"]
        rect = [{"label": label, "points": [[x0, y0], [x1, y1]], "shape_type": "rectangle"}
                for label, (x0, y0, x1, y1) in (("ignore", (2, 2, 30, 30)), ("target", (10, 10, 20, 20)),
                                                ("target", (24, 4, 40, 36)), ("ignore", (26, 8, 32, 14)),
                                                ("target", (3, 3, 8, 8)), ("ignore", (1, 1, 12, 12)))]
        doc = {"text": ["the \u201clid\u201d of the caf\u00e9 box"], "is_sentence": True, "shapes": rect,
               "imageHeight": h, "imageWidth": w}
        (root / "val" / (name[:-4] + ".json")).write_bytes(json.dumps(doc, ensure_ascii=False).encode("cp1252"))
        state.update(name=name, w=w, h=h)

    _, out, outcomes = _convert(tmp_path, rewrite)
    assert outcomes["val"].manifest.num_quarantined == 0
    sample = read_split(out, NAME, "val")[state["name"]][0]
    assert sample.reasoning[0].queries == ["the \u201clid\u201d of the caf\u00e9 box"]

    def box(x0, y0, x1, y1):  # pycocotools' raster of a rectangle polygon: pixels x0..x1-1, y0..y1-1
        m = np.zeros((state["h"], state["w"]), bool)
        m[y0:y1, x0:x1] = True
        return m

    # target (10..20) inside the larger ignore (2..30) stays target; the small ignore (26..32, 8..14) cuts
    # the larger target (24..40); the small target (3..8) inside the ignore (1..12), itself inside the
    # larger ignore, is painted last and stays target
    t1, t2, t3 = box(10, 10, 20, 20), box(24, 4, 40, 36) & ~box(26, 8, 32, 14), box(3, 3, 8, 8)
    ignore = (box(2, 2, 30, 30) | box(26, 8, 32, 14) | box(1, 1, 12, 12)) & ~t1 & ~t2 & ~t3
    assert [s.id for s in sample.segments] == [1, 2, 3] and sample.reasoning[0].segment_ids == [1, 2, 3]
    for seg, expected in zip(sample.segments, (t1, t2, t3)):
        np.testing.assert_array_equal(mask_of(seg.mask), expected)
        assert seg.area == int(expected.sum())
    np.testing.assert_array_equal(mask_of(sample.ignore_mask), ignore)
