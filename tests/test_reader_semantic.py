"""Semantic label-map readers (semantic_png, ade20k): pixel-exact segments and ignore masks, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import convert_fixtures, mask_of, read_split
from PIL import Image

from xsam.data.convert import convert
from xsam.data.fixtures import generate
from xsam.data.fixtures.ade20k_tables import object_info_csv, object_info_txt
from xsam.data.fixtures.semantic import ADE_CATEGORIES, PNG_CATEGORIES
from xsam.data.readers.ade20k_names import ADE20K_150_NAMES
from xsam.data.readers.semantic import parse_object_info
from xsam.data.registry import load_registry
from xsam.data.shards import read_manifest

PNG, ADE = "fixture_semantic_png", "fixture_ade20k"


def _check_split(got, truth, task="semantic_seg"):
    assert set(got) == set(truth)
    for stem, t in truth.items():
        sample, _image, ext = got[stem]
        assert sample.task.value == task and sample.image.id == stem
        assert sample.image.file_name == f"{stem}.{ext}"
        assert (sample.image.width, sample.image.height) == (t["width"], t["height"])
        assert [s.id for s in sample.segments] == sorted(t["segments"])
        for seg in sample.segments:
            assert seg.category_id == seg.id and seg.iscrowd == 0
            np.testing.assert_array_equal(mask_of(seg.mask), t["segments"][seg.id])
            assert seg.area == int(t["segments"][seg.id].sum())
        if t["ignore"] is None:
            assert sample.ignore_mask is None
        else:
            np.testing.assert_array_equal(mask_of(sample.ignore_mask), t["ignore"])


def test_label_maps_equal_source_pixel_for_pixel(tmp_path):
    made, out, outcomes = convert_fixtures(tmp_path, ["semantic_png", "ade20k"])
    assert all(o.status == "converted" and o.manifest.num_quarantined == 0 for o in outcomes), outcomes
    manifests = {(o.dataset, o.split): o.manifest for o in outcomes}
    assert manifests[(PNG, "val")].categories == PNG_CATEGORIES
    # train reads objectInfo150.csv, val objectInfo150.txt: the same 150 names
    assert manifests[(ADE, "val")].categories == manifests[(ADE, "train")].categories == ADE_CATEGORIES
    for name in (PNG, ADE):
        for split, truth in made[name].truth.items():
            got = read_split(out, name, split)
            _check_split(got, truth)
            assert any(t["ignore"] is not None for t in truth.values())
            assert any(t["ignore"] is None for t in truth.values())
    png = read_split(out, PNG, "val")
    assert png["scene_0001"][2] == "png" and png["scene_0000"][2] == "jpg"
    assert png["scene_0000"][0].provenance.source_file == "labels/val/scene_0000.png"
    ade = read_split(out, ADE, "val")
    assert all(sample.label_space == "fixture_ade20k" and 0 not in [s.id for s in sample.segments]
               for sample, _, _ in ade.values())


# -- bad input -----------------------------------------------------------------------------------------

@pytest.fixture()
def fx(tmp_path):
    made = generate(tmp_path / "fx", ["semantic_png", "ade20k"])
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems
    return tmp_path, made, entries, tmp_path / "fx" / "data"


def _run(tmp_path, entries, names=(PNG, ADE)):
    out = str(tmp_path / "out")
    outcomes = convert([entries[n] for n in names], str(tmp_path / "fx" / "data"), out, log=lambda _: None)
    return out, {(o.dataset, o.split): o for o in outcomes}


def _only_quarantined(out, dataset, split, num_read):
    m = read_split_manifest(out, dataset, split)
    assert (m.num_read, m.num_samples, m.num_quarantined) == (num_read, num_read - 1, 1)
    lines = (Path(out) / "_meta" / dataset / split / "quarantine.jsonl").read_text().splitlines()
    (q,) = [json.loads(line) for line in lines]
    assert q["source_id"] not in read_split(out, dataset, split)
    return q


def read_split_manifest(out, dataset, split):
    return read_manifest(str(Path(out) / "_meta" / dataset / split / "manifest.json"))


def _relabel(path: Path, fn):
    label = np.array(Image.open(path))
    Image.fromarray(fn(label)).save(path)


def test_label_value_outside_the_label_space_is_quarantined(fx):
    tmp, _, entries, data = fx
    label = data / "semantic_png" / "labels" / "val" / "scene_0002.png"
    _relabel(label, lambda a: np.where(np.arange(a.shape[1])[None, :] < 3, 200, a).astype(np.uint8))
    ade_label = data / "ade20k" / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000003.png"
    _relabel(ade_label, lambda a: np.where(np.arange(a.shape[0])[:, None] < 2, 255, a).astype(np.uint8))
    out, outcomes = _run(tmp, entries)
    q = _only_quarantined(out, PNG, "val", 4)
    assert q["source_id"] == "scene_0002" and q["field"] == "label.values" and q["file"].endswith("scene_0002.png")
    assert "[200]" in q["reason"]
    q = _only_quarantined(out, ADE, "val", 3)  # 255 is not ADE's ignore value: 0 is
    assert q["source_id"] == "ADE_val_00000003" and "[255]" in q["reason"]
    assert outcomes[(ADE, "train")].manifest.num_quarantined == 0


def test_missing_label_png_is_quarantined_and_orphan_labels_counted(fx):
    tmp, _, entries, data = fx
    labels = data / "semantic_png" / "labels" / "val"
    (labels / "scene_0003.png").unlink()
    (labels / "unused_0009.png").write_bytes((labels / "scene_0000.png").read_bytes())
    out, outcomes = _run(tmp, entries, (PNG,))
    q = _only_quarantined(out, PNG, "val", 4)
    assert q["source_id"] == "scene_0003" and q["reason"] == "label PNG missing"
    assert q["file"].endswith("labels/val/scene_0003.png")
    assert outcomes[(PNG, "val")].manifest.excluded == {"label PNG without image": 1}


def test_label_size_or_channels_mismatch_is_quarantined(fx):
    tmp, _, entries, data = fx
    folder = data / "ade20k" / "ADEChallengeData2016" / "annotations" / "validation"
    _relabel(folder / "ADE_val_00000001.png", lambda a: a[:-1])
    _relabel(folder / "ADE_val_00000002.png", lambda a: np.stack([a, a, a], -1))
    out, outcomes = _run(tmp, entries, (ADE,))
    m = outcomes[(ADE, "val")].manifest
    assert (m.num_read, m.num_samples, m.num_quarantined) == (3, 1, 2)
    lines = (Path(out) / "_meta" / ADE / "val" / "quarantine.jsonl").read_text().splitlines()
    by_id = {q["source_id"]: q for q in map(json.loads, lines)}
    assert by_id["ADE_val_00000001"]["field"] == "label.size"
    assert "label PNG is" in by_id["ADE_val_00000001"]["reason"]
    assert by_id["ADE_val_00000002"]["field"] == "label.mode"
    assert list(read_split(out, ADE, "val")) == ["ADE_val_00000003"]


def test_ade20k_names_from_the_real_release_tables():
    """objectInfo150.txt (", " between synonyms) and the csv (";" between synonyms AND words) give the
    same 150 unique names: the first synonym of the .txt, as LISA's class list has them."""
    txt = parse_object_info(object_info_txt(), "objectInfo150.txt")
    csv = parse_object_info(object_info_csv(), "objectInfo150.csv")
    assert txt == csv == ADE_CATEGORIES
    names = [c["name"] for c in txt]
    assert [c["id"] for c in txt] == list(range(1, 151)) and len(set(names)) == 150
    assert names == list(ADE20K_150_NAMES)
    assert {k: names[k - 1] for k in (2, 45, 59, 64, 74, 90, 131, 142)} == {
        2: "building", 45: "chest of drawers", 59: "screen door", 64: "blind", 74: "kitchen island",
        90: "television", 131: "screen", 142: "crt screen"}
    # what reading the csv up to its first ";" gives: 14 wrong names, and "screen" twice
    naive = [line.rsplit(",", 1)[1].split(";")[0] for line in object_info_csv().splitlines()[1:]]
    assert sum(a != b for a, b in zip(naive, names)) == 14 and naive.count("screen") == 2


def test_missing_or_malformed_object_info_fails_only_ade(fx):
    tmp, _, entries, data = fx
    csv = data / "ade20k" / "ADEChallengeData2016" / "objectInfo150.csv"
    text = csv.read_text()
    csv.unlink()
    _, outcomes = _run(tmp, entries)
    assert outcomes[(ADE, "train")].status == "failed" and "objectInfo150.csv" in outcomes[(ADE, "train")].error
    assert outcomes[(ADE, "val")].status == "converted"  # it reads objectInfo150.txt
    assert outcomes[(PNG, "val")].status == "converted"
    csv.write_text(text.replace("3,", "three,", 1))
    _, outcomes = _run(tmp, entries, (ADE,))
    assert outcomes[(ADE, "train")].status == "failed" and "line 4" in outcomes[(ADE, "train")].error
    # a ";" cell that is not the ADE20K-150 name of its Idx cannot be split into synonyms: refused
    csv.write_text(text.replace("chest;of;drawers;chest", "drawers;chest;of"))
    _, outcomes = _run(tmp, entries, (ADE,))
    error = outcomes[(ADE, "train")].error
    assert outcomes[(ADE, "train")].status == "failed" and "line 46" in error and "'chest of drawers'" in error


def test_categories_json_colliding_with_ignore_fails(fx):
    tmp, _, entries, data = fx
    (data / "semantic_png" / "categories.json").write_text(json.dumps(PNG_CATEGORIES + [{"id": 255, "name": "x"}]))
    _, outcomes = _run(tmp, entries, (PNG,))
    assert outcomes[(PNG, "val")].status == "failed" and "collide with the ignore" in outcomes[(PNG, "val")].error
    (data / "semantic_png" / "categories.json").write_text(json.dumps(PNG_CATEGORIES + [{"id": 9, "name": "grass"}]))
    _, outcomes = _run(tmp, entries, (PNG,))
    assert outcomes[(PNG, "val")].status == "failed" and "123 and 9 are both named 'grass'" in outcomes[(PNG, "val")].error
