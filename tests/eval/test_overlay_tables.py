"""Evaluation artifacts a researcher reads: per-category tables with names and valid JSON (NaN -> null)
for panoptic, semantic, instance and VGD accumulators, and the side-by-side overlay (ground truth |
prediction, labels, legend, >= 512 px), built from real accumulators and a real Sample."""

import io
import json

import numpy as np
from PIL import Image

from xsam.data import masks as rle
from xsam.data.schema import ImageInfo, PromptType, Provenance, Sample, Segment, Task
from xsam.eval.benchmark import Benchmark, Query
from xsam.eval.overlay import PANEL, sample_overlay
from xsam.eval.per_category import per_category
from xsam.model.predict import Prediction, PredictTask, Request

CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 7, "name": "sky", "isthing": 0},
        {"id": 9, "name": "dog", "isthing": 1}]


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _sample(h=30, w=40) -> tuple[Sample, list[np.ndarray]]:
    masks = [_box(h, w, 5, 20, 3, 15), _box(h, w, 0, 5, 0, w)]
    segs = [Segment(id=k + 1, category_id=c, bbox=(0, 0, 1, 1), area=int(m.sum()), mask=rle.encode(m))
            for k, (m, c) in enumerate(zip(masks, (1, 7)))]
    return Sample(dataset="d", split="val", task=Task.generic_seg,
                  image=ImageInfo(id="1", file_name="a.jpg", width=w, height=h, format="jpg"), segments=segs,
                  provenance=Provenance(source_file="f", source_id="img-1", reader="r", reader_version=1)), masks


def _valid_json(rows):
    return json.loads(json.dumps(rows, allow_nan=False))  # raises on NaN / inf


def test_panoptic_table_names_every_category_with_pq_sq_rq():
    bench = Benchmark("d", "val", Task.generic_seg, CATS)
    acc = bench.new()
    gt = np.zeros((4, 4), np.int64)
    gt[:2] = 1
    gt[2:] = 2
    pred = gt.copy()
    acc["pq"].add(gt, [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 7, "iscrowd": 0}],
                  pred, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}])
    rows = {r["category"]: r for r in _valid_json(per_category(bench, acc))}
    assert set(rows) == {"person", "sky", "dog"}
    assert rows["person"]["pq"] > 0 and rows["person"]["tp"] == 1 and rows["person"]["fp"] == 1
    assert rows["sky"]["pq"] == 0 and rows["sky"]["fn"] == 1 and rows["sky"]["isthing"] is False
    assert rows["dog"]["pq"] is None  # never seen: not scored (null), not 0


def test_semantic_table_nan_becomes_null():
    bench = Benchmark("d", "val", Task.semantic_seg, CATS)
    acc = bench.new()
    acc["sem"].add(np.array([[0, 0], [1, 1]]), np.array([[0, 0], [0, 1]]))
    rows = _valid_json(per_category(bench, acc))
    assert [r["category"] for r in rows] == ["person", "sky", "dog"]
    assert rows[0]["iou"] == 66.6667 and rows[1]["iou"] == 50.0 and rows[2]["iou"] is None  # 2/3, 1/2, no GT


def test_instance_and_vgd_tables_give_per_category_ap():
    m = _box(8, 8, 2, 6, 2, 6)
    enc = rle.encode(m)
    bench = Benchmark("d", "val", Task.instance_seg, CATS)
    acc = bench.new()
    acc["ap"].add([{"mask": enc, "category_id": 1}], [{"mask": enc, "category_id": 1, "score": 0.9}])
    rows = {r["category"]: r for r in _valid_json(per_category(bench, acc))}
    assert rows["person"]["ap"] == 100.0 and rows["dog"]["ap"] is None
    vgd = Benchmark("d", "val", Task.vgd, CATS)
    acc = vgd.new()
    acc[PromptType.box.value].add([{"mask": enc, "category_id": 9}], [{"mask": enc, "category_id": 9, "score": 1.0}])
    rows = _valid_json(per_category(vgd, acc))
    assert {(r["prompt_type"], r["category"]) for r in rows if r["ap"] is not None} == {("box", "dog")}
    assert per_category(Benchmark("d", "val", Task.referring_seg, None), {"ref": None}) == []


def test_overlay_shows_ground_truth_and_prediction_side_by_side():
    sample, masks = _sample()
    bench = Benchmark("d", "val", Task.generic_seg, CATS)
    image = np.full((30, 40, 3), 90, np.uint8)
    query = Query(Request("panoptic", [c["name"] for c in CATS], is_thing=[True, False, True]))
    pred = Prediction(PredictTask.panoptic, np.stack([masks[0], _box(30, 40, 20, 30, 20, 40)]), ["person", "dog"],
                      [0.9, 0.4])
    png = sample_overlay(bench, sample, image, [query], [pred])
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w = picture.shape[:2]
    assert max(h, w) >= 2 * PANEL and w > h  # two panels of PANEL px on the long side
    left, right = picture[:, : w // 2], picture[:, w // 2:]
    sky = np.array([60, 180, 75])  # the second label's colour: only in the ground truth (left)
    dog = np.array([255, 225, 25])  # the third label's colour: only in the prediction (right)
    has = lambda img, c: bool((np.abs(img.astype(int) - c).sum(-1) < 4).any())
    assert has(left, sky) and not has(right, sky)
    assert has(right, dog) and has(picture[h - 60:], dog)  # and in the legend under the panels
    # the same picture for the same inputs (a fixed artifact per checkpoint and sample)
    assert sample_overlay(bench, sample, image, [query], [pred]) == png
