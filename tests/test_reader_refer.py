import json
import os
import pickle
from pathlib import Path

import numpy as np
from helpers import mask_of, read_split

from xsam.data import safe_pickle, storage
from xsam.data.convert import convert, serial_executor
from xsam.data.fixtures import generate
from xsam.data.fixtures.refer import _py2, py2_pickle
from xsam.data.readers.refer import ReferReader
from xsam.data.registry import load_registry
from xsam.data.shards import meta_dir, read_manifest

REFS_P = "refcoco/refs(unc).p"


class _TouchOnLoad:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


def _convert(tmp: Path, mutate=None):
    """Generate the refer fixtures, let `mutate(source_root)` break them, convert in process."""
    made = generate(tmp / "fx", ["refer"])
    if mutate:
        mutate(tmp / "fx" / "data" / "refer")
    entries, problems = load_registry(tmp / "fx" / "registry")
    assert not problems, problems
    out = str(tmp / "out")
    outcomes = convert(list(entries.values()), str(tmp / "fx" / "data"), out, executor=serial_executor,
                       log=lambda _: None)
    return made, out, {(o.dataset, o.split): o for o in outcomes}


def _quarantine(out: str, dataset: str, split: str) -> list[dict]:
    text = storage.read_bytes(storage.join(meta_dir(out, dataset, split), "quarantine.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def _rewrite_refs(root: Path, edit) -> None:
    """Load the Python 2 refs pickle, let `edit(refs)` change it, write it back as Python 2 would."""
    path = root / REFS_P
    refs = safe_pickle.loads(path.read_bytes(), str(path))
    edit(refs)
    path.write_bytes(py2_pickle(_py2(refs)))


def _check_against_truth(made, out):
    for name in ("fixture_refcoco", "fixture_grefcoco"):
        for split, truth in made[name].truth.items():
            got = read_split(out, name, split)
            assert set(got) == set(truth) and truth
            for image_id, t in truth.items():
                sample, image, ext = got[image_id]
                assert ext == "jpg" and image[:3] == b"\xff\xd8\xff"
                assert sample.task.value == ("gres" if name == "fixture_grefcoco" else "referring_seg")
                assert (sample.image.file_name, sample.image.width, sample.image.height) == (
                    t["file_name"], t["width"], t["height"])
                # every annotation of the image is a segment, referred to or not
                assert [s.id for s in sample.segments] == list(t["segments"])
                for seg in sample.segments:
                    cat, crowd, mask = t["segments"][seg.id]
                    assert (seg.category_id, seg.iscrowd, seg.area) == (cat, crowd, int(mask.sum()))
                    np.testing.assert_array_equal(mask_of(seg.mask), mask)
                    ys, xs = np.nonzero(mask)
                    assert seg.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
                assert [(r.ref_id, r.sentences, r.segment_ids) for r in sample.referring] == t["referring"]


def test_refcoco_pickle_and_grefcoco_json_match_the_truth(tmp_path):
    made, out, outcomes = _convert(tmp_path)
    assert all(o.status == "converted" for o in outcomes.values()), outcomes
    _check_against_truth(made, out)
    # Python 2 byte strings came out as text, UTF-8 included
    sample = read_split(out, "fixture_refcoco", "train")["480000"][0]
    assert sample.referring[0].sentences[0] == "the café sign"
    # gRefCOCO: a multi-target expression, no-target expressions counted, not kept
    got = read_split(out, "fixture_grefcoco", "testA")
    assert any(len(r.segment_ids) == 2 for s, _, _ in got.values() for r in s.referring)
    grefs = json.loads((tmp_path / "fx/data/refer/grefcoco/grefs(unc).json").read_text())
    for split, images_without in (("val", 1), ("testA", 0)):
        manifest = outcomes[("fixture_grefcoco", split)].manifest
        assert manifest.excluded["no_target_expression"] == sum(
            r["no_target"] for r in grefs if r["split"] == split) > 0
        assert manifest.excluded.get("image_without_target_expression", 0) == images_without
        assert manifest.num_quarantined == 0
    assert outcomes[("fixture_refcoco", "train")].manifest.categories[0] == {"id": 1, "name": "person"}


def test_refs_told_apart_by_content_not_by_name(tmp_path):
    """The RefCOCO refs written as JSON under the pickle's name read the same."""
    def to_json(root):
        path = root / REFS_P
        path.write_text(json.dumps(safe_pickle.loads(path.read_bytes(), str(path))), encoding="utf-8")

    made, out, outcomes = _convert(tmp_path, to_json)
    assert outcomes[("fixture_refcoco", "train")].status == "converted"
    _check_against_truth(made, out)


def test_ann_id_of_another_image_quarantines_the_image_naming_the_field(tmp_path):
    def point_elsewhere(refs):
        refs[1]["ann_id"] = 424242

    made, out, outcomes = _convert(tmp_path, lambda root: _rewrite_refs(root, point_elsewhere))
    assert outcomes[("fixture_refcoco", "train")].status == "converted"
    [q] = _quarantine(out, "fixture_refcoco", "train")
    assert (q["source_id"], q["field"]) == ("480000", "refs.1.ann_id")
    assert "424242" in q["reason"] and q["file"].endswith(REFS_P)
    got = read_split(out, "fixture_refcoco", "train")
    assert set(got) == set(made["fixture_refcoco"].truth["train"]) - {"480000"}
    manifest = read_manifest(storage.join(meta_dir(out, "fixture_refcoco", "train"), "manifest.json"))
    assert (manifest.num_read, manifest.num_samples, manifest.num_quarantined) == (3, 2, 1)


def test_non_utf8_sentence_in_the_python2_pickle_is_quarantined(tmp_path):
    seen = {}

    def latin1(refs):
        refs[4]["sentences"][0]["sent"] = "caf\udce9"  # the lone byte 0xE9: Latin-1, not UTF-8
        seen.update(image_id=str(refs[4]["image_id"]), split=refs[4]["split"])

    made, out, _ = _convert(tmp_path, lambda root: _rewrite_refs(root, latin1))
    assert b"caf\xe9" in (tmp_path / "fx/data/refer" / REFS_P).read_bytes()
    [q] = _quarantine(out, "fixture_refcoco", seen["split"])
    assert (q["source_id"], q["field"]) == (seen["image_id"], "refs.4.sentences.0.sent")
    assert "UTF-8" in q["reason"]
    got = read_split(out, "fixture_refcoco", seen["split"])
    assert set(got) == set(made["fixture_refcoco"].truth[seen["split"]]) - {seen["image_id"]}


def test_malicious_refs_pickle_fails_only_its_dataset_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    evil = pickle.dumps([_TouchOnLoad(target)], protocol=2)

    _, _, outcomes = _convert(tmp_path, lambda root: (root / REFS_P).write_bytes(evil))
    assert not target.exists()
    for split in ("train", "val"):
        o = outcomes[("fixture_refcoco", split)]
        assert o.status == "failed" and f"{os.system.__module__}.system" in o.error and "refs(unc).p" in o.error
    assert outcomes[("fixture_grefcoco", "val")].status == "converted"


def test_missing_instances_file_fails_naming_it(tmp_path):
    _, _, outcomes = _convert(tmp_path, lambda root: (root / "grefcoco/instances.json").unlink())
    o = outcomes[("fixture_grefcoco", "val")]
    assert o.status == "failed" and "grefcoco/instances.json" in o.error
    assert outcomes[("fixture_refcoco", "train")].status == "converted"


def _plan(tmp: Path, dataset: str, split: str, mutate=None):
    """Generate the refer fixtures, let `mutate(source_root)` change them, plan one split (no conversion)."""
    if not (tmp / "fx").exists():
        generate(tmp / "fx", ["refer"])
    if mutate:
        mutate(tmp / "fx" / "data" / "refer")
    entries, problems = load_registry(tmp / "fx" / "registry")
    assert not problems, problems
    return ReferReader(entries[dataset], split, str(tmp / "fx" / "data")).plan()


def test_json_refs_with_a_byte_order_mark_are_read_as_json(tmp_path):
    """A refs file saved as UTF-8 JSON with a BOM (EF BB BF, as some editors write) plans exactly as
    the Python 2 pickle it was made from; it is not taken for a pickle."""
    before = _plan(tmp_path, "fixture_refcoco", "train")

    def to_bom_json(root):
        path = root / REFS_P
        refs = safe_pickle.loads(path.read_bytes(), str(path))
        path.write_bytes(json.dumps(refs, ensure_ascii=False, indent=1).encode("utf-8-sig"))

    after = _plan(tmp_path, "fixture_refcoco", "train", to_bom_json)
    assert (tmp_path / "fx/data/refer" / REFS_P).read_bytes()[:4] == b"\xef\xbb\xbf["
    assert before.items and not after.quarantined
    assert [(i.key, i.payload) for i in after.items] == [(i.key, i.payload) for i in before.items]


def test_an_image_id_with_two_entries_in_instances_is_quarantined_on_both(tmp_path):
    """instances.json listing one image id twice (another file name): which entry the masks belong to is
    unknown, so both entries are refused, each naming its field; the other images are planned."""
    before = _plan(tmp_path, "fixture_refcoco", "train")
    dup = before.items[0].source_id
    seen = {}

    def duplicate(root):
        path = root / "refcoco/instances.json"
        doc = json.loads(path.read_text())
        first = next(i for i, img in enumerate(doc["images"]) if str(img["id"]) == dup)
        doc["images"].append({**doc["images"][first], "file_name": "another.jpg"})
        seen.update(first=first, last=len(doc["images"]) - 1, file=str(path))
        path.write_text(json.dumps(doc))

    after = _plan(tmp_path, "fixture_refcoco", "train", duplicate)
    assert [i.source_id for i in after.items] == [i.source_id for i in before.items[1:]]
    assert sorted((q.source_id, q.field, q.file) for q in after.quarantined) == [
        (dup, f"images.{seen['first']}.id", seen["file"]), (dup, f"images.{seen['last']}.id", seen["file"])]
    assert all("used by 2 image entries" in q.reason for q in after.quarantined)
