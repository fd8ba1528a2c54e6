"""Bad input: a clear reason naming the file and the field, the job goes on, nothing is lost."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import read_split
from xsam.data.convert import convert
from xsam.data.fixtures import generate
from xsam.data.registry import load_registry
from xsam.data.shards import read_manifest

DS = "fixture_coco_panoptic"


@pytest.fixture()
def fx(tmp_path):
    generate(tmp_path / "fx", ["coco_panoptic"])
    entries, _ = load_registry(tmp_path / "fx" / "registry")
    root = tmp_path / "fx" / "data" / "coco_panoptic"
    doc = json.loads((root / "annotations" / "panoptic_train.json").read_text())
    return tmp_path, entries, root, doc


def _run(tmp_path, entries, names=(DS,)):
    out = str(tmp_path / "out")
    outcomes = convert([entries[n] for n in names], str(tmp_path / "fx" / "data"), out, log=lambda _: None)
    return out, {(o.dataset, o.split): o for o in outcomes}


def _quarantine(out, split="train"):
    lines = (Path(out) / "_meta" / DS / split / "quarantine.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _check_one_quarantined(tmp_path, entries, image_id, reason_part, field_part=None, file_part=None):
    out, outcomes = _run(tmp_path, entries)
    o = outcomes[(DS, "train")]
    assert o.status == "converted"
    m = o.manifest
    assert (m.num_read, m.num_samples, m.num_quarantined) == (6, 5, 1)
    (q,) = _quarantine(out)
    assert q["source_id"] == str(image_id)
    assert reason_part in q["reason"], q
    if field_part:
        assert q["field"] and field_part in q["field"], q
    if file_part:
        assert q["file"] and file_part in q["file"], q
    got = read_split(out, DS, "train")
    assert str(image_id) not in got and len(got) == 5
    assert outcomes[(DS, "val")].manifest.num_quarantined == 0
    return q


def _image(root, doc, k):
    img = doc["images"][k]
    return img["id"], root / "images" / "train" / img["file_name"]


def _save(root, doc):
    (root / "annotations" / "panoptic_train.json").write_text(json.dumps(doc))


def test_corrupt_image(fx):
    tmp, entries, root, doc = fx
    image_id, path = _image(root, doc, 1)
    path.write_bytes(b"this is not an image at all" * 10)
    _check_one_quarantined(tmp, entries, image_id, "not a recognised image encoding", file_part=path.name)


def test_truncated_image(fx):
    tmp, entries, root, doc = fx
    image_id, path = _image(root, doc, 2)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    _check_one_quarantined(tmp, entries, image_id, "truncated JPEG", file_part=path.name)


def test_missing_image(fx):
    tmp, entries, root, doc = fx
    image_id, path = _image(root, doc, 0)
    path.unlink()
    _check_one_quarantined(tmp, entries, image_id, "not found", file_part=path.name)


def test_panoptic_png_id_without_segment(fx):
    tmp, entries, root, doc = fx
    ann = doc["annotations"][3]
    ann["segments_info"] = ann["segments_info"][:-1]  # its pixels stay in the PNG
    _save(root, doc)
    _check_one_quarantined(tmp, entries, ann["image_id"], "with no segments_info entry", "segments_info",
                           ann["file_name"])


def test_segment_without_pixels(fx):
    tmp, entries, root, doc = fx
    ann = doc["annotations"][4]
    ann["segments_info"].append({"id": 12345, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1})
    _save(root, doc)
    _check_one_quarantined(tmp, entries, ann["image_id"], "has no pixels", "segments_info")


@pytest.mark.parametrize("mutate,field,reason", [
    (lambda a: a["segments_info"][0].update(bbox=[1, 2, 3]), "annotations.5.segments_info.0.bbox", "malformed"),
    (lambda a: a["segments_info"][0].update(category_id="person"), "segments_info.0.category_id", "malformed"),
    (lambda a: a["segments_info"][0].update(category_id=999), "segments_info.0.category_id", "unknown category"),
    (lambda a: a.pop("segments_info"), "annotations.5.segments_info", "malformed"),
])
def test_malformed_annotation_fields(fx, mutate, field, reason):
    tmp, entries, root, doc = fx
    ann = doc["annotations"][5]
    mutate(ann)
    _save(root, doc)
    q = _check_one_quarantined(tmp, entries, ann["image_id"], reason, field)
    assert q["file"].endswith("panoptic_train.json")


def test_file_name_escaping_the_data_root(fx):
    tmp, entries, root, doc = fx
    secret = tmp / "fx" / "secret.jpg"
    secret.write_bytes((root / "images" / "train" / doc["images"][0]["file_name"]).read_bytes())
    doc["images"][0]["file_name"] = "../../../secret.jpg"
    _save(root, doc)
    _check_one_quarantined(tmp, entries, doc["images"][0]["id"], "escapes the data root", "file_name")


def test_non_utf8_text(fx):
    tmp, entries, root, doc = fx
    path = root / "annotations" / "panoptic_train.json"
    raw = json.dumps(doc).encode()
    name = doc["images"][2]["file_name"].encode()
    path.write_bytes(raw.replace(name, b"bad\xff\xfename.jpg"))
    _check_one_quarantined(tmp, entries, doc["images"][2]["id"], "non-UTF-8", "file_name")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_decompression_bomb(fx):
    tmp, entries, root, doc = fx
    img = doc["images"][3]
    # a PNG that declares 60000 x 60000 pixels; a few KB on disk, 3.6 G pixels if decoded
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 60001 * 4, 9)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    path = root / "images" / "train" / img["file_name"]
    path.write_bytes(bomb)
    _check_one_quarantined(tmp, entries, img["id"], "decompression bomb", file_part=img["file_name"])


def test_image_size_disagreeing_with_annotation(fx):
    tmp, entries, root, doc = fx
    img = doc["images"][4]
    path = root / "images" / "train" / img["file_name"]
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(path, format="JPEG")
    _check_one_quarantined(tmp, entries, img["id"], "annotations say", "image.size")


def test_missing_annotation_file_fails_only_that_dataset(fx):
    tmp, entries, root, doc = fx
    (root / "annotations" / "panoptic_val.json").unlink()
    out, outcomes = _run(tmp, entries, names=(DS, "fixture_coco_semantic"))
    assert outcomes[(DS, "val")].status == "failed"
    assert "panoptic_val.json" in outcomes[(DS, "val")].error
    assert outcomes[("fixture_coco_semantic", "val")].status == "failed"
    assert outcomes[(DS, "train")].status == "converted"
    assert read_manifest(str(Path(out) / "_meta" / DS / "train" / "manifest.json")).num_samples == 6
