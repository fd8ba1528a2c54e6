"""InstanceAccumulator: parity with pycocotools, hand-made AP cases, the original's GT protocol (crowd
dropped, images without GT skipped) and pycocotools' (crowd ignored, every image counted), merging."""

from __future__ import annotations

import contextlib
import io
import math
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from xsam.eval.instance import METRIC_NAMES, InstanceAccumulator, to_rle, vgd_ground_truth

COCO_CONVENTION = {"crowd": "ignore", "images_without_gt": "count"}

H, W = 120, 160


def rect(y0, x0, y1, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _random_split(seed, n_images=8, cats=(1, 2, 3)):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        gts, preds = [], []
        for _ in range(rng.integers(0, 5)):
            y0, x0 = rng.integers(0, H - 10), rng.integers(0, W - 10)
            y1, x1 = y0 + rng.integers(3, H - y0 + 1), x0 + rng.integers(3, W - x0 + 1)
            cat = int(rng.choice(cats))
            gts.append({"mask": rect(y0, x0, y1, x1), "category_id": cat, "iscrowd": int(rng.random() < 0.15)})
            if rng.random() < 0.8:  # a jittered detection, sometimes with the wrong class
                dy, dx = rng.integers(-6, 7, 2)
                m = rect(max(0, y0 + dy), max(0, x0 + dx), max(1, y1 + dy), max(1, x1 + dx))
                c = cat if rng.random() < 0.8 else int(rng.choice(cats))
                preds.append({"mask": m, "category_id": c, "score": float(rng.random())})
        for _ in range(rng.integers(0, 3)):  # false positives
            y0, x0 = rng.integers(0, H - 20), rng.integers(0, W - 20)
            preds.append({"mask": rect(y0, x0, y0 + rng.integers(2, 20), x0 + rng.integers(2, 20)),
                          "category_id": int(rng.choice(cats)), "score": float(rng.random())})
        images.append((gts, preds))
    return images


def _pycocotools_direct(images, cats):
    """The textbook pycocotools path: COCO json dicts, loadRes, COCOeval.summarize() (the original's
    path too, on the GT it builds)."""
    ds = {"images": [], "annotations": [], "categories": [{"id": c} for c in cats]}
    results = []
    for i, (gts, preds) in enumerate(images, start=1):
        ds["images"].append({"id": i, "height": H, "width": W})
        for g in gts:
            rle = mask_utils.encode(np.asfortranarray(g["mask"].astype(np.uint8)))
            ds["annotations"].append({"id": len(ds["annotations"]) + 1, "image_id": i, "segmentation": rle,
                                      "category_id": g["category_id"], "iscrowd": g["iscrowd"],
                                      "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle))})
        for p in preds:
            rle = mask_utils.encode(np.asfortranarray(p["mask"].astype(np.uint8)))
            results.append({"image_id": i, "segmentation": rle, "category_id": p["category_id"],
                            "score": p["score"]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ds
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float("nan") if s == -1 else 100 * s) for k, s in zip(METRIC_NAMES, ev.stats[:6])}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("protocol", ["original", "pycocotools"])
def test_parity_with_pycocotools(seed, protocol):
    cats = (1, 2, 3)
    images = _random_split(seed, cats=cats)
    acc = InstanceAccumulator(cats) if protocol == "original" else InstanceAccumulator(cats, **COCO_CONVENTION)
    for gts, preds in images:
        acc.add(gts, preds)
    if protocol == "original":  # what the original's GT holds: no crowd, no image without annotations
        images = [([g for g in gts if not g["iscrowd"]], preds) for gts, preds in images]
        images = [(gts, preds) for gts, preds in images if gts]
    ours, ref = acc.result(), _pycocotools_direct(images, cats)
    assert set(ours) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        if math.isnan(ref[k]):
            assert math.isnan(ours[k]), k
        else:
            assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
    assert 0 < ours["AP"] < 100


def test_merge_equals_single_pass():
    images = _random_split(5, n_images=9)
    whole, parts = InstanceAccumulator([1, 2, 3]), [InstanceAccumulator([1, 2, 3]) for _ in range(3)]
    for i, (gts, preds) in enumerate(images):
        whole.add(gts, preds)
        parts[i // 3].add(gts, preds)  # consecutive chunks, merged in order
    np.testing.assert_equal(sum(parts).result(), whole.result())  # NaN == NaN here
    assert sum(parts).counts() == whole.counts() and whole.counts()["dropped_crowd"] > 0
    shipped = pickle.loads(pickle.dumps(parts[0]))  # what Ray does between tasks
    np.testing.assert_equal((shipped + parts[1] + parts[2]).result(), whole.result())


def test_perfect_prediction_is_100():
    acc = InstanceAccumulator([1, 2])
    gts = [{"mask": rect(0, 0, 40, 40), "category_id": 1}, {"mask": rect(50, 50, 110, 150), "category_id": 2}]
    preds = [{"mask": g["mask"], "category_id": g["category_id"], "score": 0.9} for g in gts]
    acc.add(gts, preds)
    acc.add([{"mask": to_rle(rect(10, 10, 30, 90)), "category_id": 1}],  # an RLE input
            [{"mask": rect(10, 10, 30, 90), "category_id": 1, "score": 0.5}])
    r = acc.result()
    assert r["AP"] == pytest.approx(100) and r["AP50"] == pytest.approx(100) and r["AP75"] == pytest.approx(100)
    assert math.isnan(r["APs"])  # no small ground truth


def test_empty_prediction_is_zero():
    acc = InstanceAccumulator([1])
    acc.add([{"mask": rect(0, 0, 40, 40), "category_id": 1}], [])
    assert acc.add([], []) is False  # no ground truth: skipped
    assert acc.result()["AP"] == 0.0 and acc.result()["AP50"] == 0.0


def test_no_ground_truth_anywhere_is_nan():
    for kwargs in ({}, COCO_CONVENTION):
        acc = InstanceAccumulator([1], **kwargs)
        acc.add([], [{"mask": rect(0, 0, 10, 10), "category_id": 1, "score": 1.0}])
        assert all(math.isnan(v) for v in acc.result().values())
    assert all(math.isnan(v) for v in InstanceAccumulator([1]).result().values())


@pytest.mark.parametrize("fp_score, expected", [(0.1, 100.0), (0.9, 50.0)])
def test_false_positive_on_image_without_ground_truth(fp_score, expected):
    m = rect(20, 20, 80, 80)
    coco, original = InstanceAccumulator([1], **COCO_CONVENTION), InstanceAccumulator([1])
    for acc in (coco, original):
        acc.add([{"mask": m, "category_id": 1}], [{"mask": m, "category_id": 1, "score": 0.5}])
        acc.add([], [{"mask": m, "category_id": 1, "score": fp_score}])
    # pycocotools: ranked FP first, precision 1/2 at recall 1 -> AP 50; ranked last it costs nothing
    assert coco.result()["AP50"] == pytest.approx(expected)
    # the original never evaluates an image without annotations: its predictions do not count
    assert original.result()["AP50"] == pytest.approx(100.0)
    assert original.counts() == {"images": 1, "skipped_images": 1, "dropped_crowd": 0}


def test_crowd_ground_truth_is_dropped_as_the_original():
    person, crowd = rect(0, 0, 50, 50), rect(60, 60, 120, 160)
    gts = [{"mask": person, "category_id": 1}, {"mask": crowd, "category_id": 1, "iscrowd": 1}]
    preds = [{"mask": crowd, "category_id": 1, "score": 0.9}, {"mask": person, "category_id": 1, "score": 0.5}]
    acc = InstanceAccumulator([1])  # a confident detection on the crowd region, then the person
    acc.add(gts, preds)
    # crowd dropped from the GT: the crowd detection is a false positive ranked first -> AP50 50
    assert acc.result()["AP50"] == pytest.approx(50.0) and acc.counts()["dropped_crowd"] == 1
    assert acc.add([gts[1]], preds) is False  # only a crowd region left: no GT, image skipped
    missed = InstanceAccumulator([1])  # the crowd not detected: not a missed positive
    missed.add(gts, [preds[1]])
    assert missed.result()["AP"] == pytest.approx(100)


def test_crowd_ground_truth_is_ignored_with_the_pycocotools_convention():
    person, crowd = rect(0, 0, 50, 50), rect(60, 60, 120, 160)
    gts = [{"mask": person, "category_id": 1}, {"mask": crowd, "category_id": 1, "iscrowd": 1}]
    acc = InstanceAccumulator([1], **COCO_CONVENTION)
    acc.add(gts, [{"mask": crowd, "category_id": 1, "score": 0.9}, {"mask": person, "category_id": 1, "score": 0.5}])
    assert acc.result()["AP"] == pytest.approx(100)  # not a false positive
    missed = InstanceAccumulator([1], **COCO_CONVENTION)  # the crowd not detected: not a missed positive either
    missed.add(gts, [{"mask": person, "category_id": 1, "score": 0.5}])
    assert missed.result()["AP"] == pytest.approx(100)
    not_crowd = InstanceAccumulator([1], **COCO_CONVENTION)
    not_crowd.add([dict(g, iscrowd=0) for g in gts], [{"mask": person, "category_id": 1, "score": 0.5}])
    assert not_crowd.result()["AP"] < 60


def test_given_area_decides_the_size_range():
    m = rect(0, 0, 30, 30)  # 900 px: small (< 32^2)
    acc = InstanceAccumulator([1])
    acc.add([{"mask": m, "category_id": 1, "area": 2000.0}], [{"mask": m, "category_id": 1, "score": 1.0}])
    r = acc.result()
    assert math.isnan(r["APs"]) and r["APm"] == pytest.approx(100)  # GT counted as medium by its `area`


def test_all_query_class_pairs_compete_under_max_dets_per_category():
    # COCOeval's maxDets=100 holds per image AND category: 150 detections over two classes all count
    gts = [{"mask": rect(0, 0, 10, 10), "category_id": 1}, {"mask": rect(50, 50, 60, 60), "category_id": 2}]
    preds = [{"mask": rect(100, 100, 110, 110), "category_id": 1 + i % 2, "score": 0.9} for i in range(148)]
    preds += [{"mask": g["mask"], "category_id": g["category_id"], "score": 0.1} for g in gts]
    acc = InstanceAccumulator([1, 2])
    acc.add(gts, preds)
    assert acc.result()["AP50"] > 0  # the true detections, ranked 149th / 150th, are still seen


def test_vgd_ground_truth_keeps_segments_with_a_prompt_of_the_type():
    from xsam.data import masks
    from xsam.data.schema import ImageInfo, Provenance, Sample, Segment, VisualPrompt

    def seg(i, cat, m, crowd=0):
        rle = masks.encode(m)
        area, bbox = masks.area_bbox(rle)
        return Segment(id=i, category_id=cat, iscrowd=crowd, bbox=tuple(bbox), area=area, mask=rle)

    a, b, c = rect(0, 0, 10, 10), rect(20, 20, 40, 40), rect(50, 50, 60, 60)
    sample = Sample(dataset="d", split="val", task="vgd", label_space="x",
                    image=ImageInfo(id="1", file_name="1.jpg", width=W, height=H, format="jpg"),
                    segments=[seg(1, 7, a), seg(2, 7, b), seg(3, 9, c, crowd=1)],
                    visual_prompts=[VisualPrompt(type="point", mask=masks.encode(a), segment_id=1),
                                    VisualPrompt(type="box", mask=masks.encode(b), segment_id=2),
                                    VisualPrompt(type="point", mask=masks.encode(c), segment_id=3)],
                    provenance=Provenance(source_file="f", source_id="1", reader="r", reader_version=1))
    point = vgd_ground_truth(sample, "point")
    assert [(g["category_id"], g["area"]) for g in point] == [(7, 100)]  # segment 2 has no point prompt; 3 is crowd
    assert [g["category_id"] for g in vgd_ground_truth(sample, "box")] == [7]
    assert vgd_ground_truth(sample, "scribble") == []


def test_class_agnostic_ignores_categories():
    m = rect(0, 0, 40, 40)
    strict = InstanceAccumulator([1, 2])
    strict.add([{"mask": m, "category_id": 1}], [{"mask": m, "category_id": 2, "score": 1.0}])
    assert strict.result()["AP50"] == 0.0
    agnostic = InstanceAccumulator(class_agnostic=True)
    agnostic.add([{"mask": m}], [{"mask": m}])  # score defaults to 1.0
    assert agnostic.result()["AP50"] == pytest.approx(100)


def test_rejects_bad_input():
    acc = InstanceAccumulator([1])
    with pytest.raises(ValueError):
        acc.add([{"mask": rect(0, 0, 5, 5), "category_id": 7}], [])
    with pytest.raises(ValueError):
        acc.add([{"mask": rect(0, 0, 5, 5), "category_id": 1}],
                [{"mask": rect(0, 0, 5, 5, h=10, w=10), "category_id": 1, "score": 1.0}])
    with pytest.raises(ValueError):
        InstanceAccumulator([1]) + InstanceAccumulator(class_agnostic=True)
    with pytest.raises(ValueError):
        InstanceAccumulator()
    with pytest.raises(ValueError):
        InstanceAccumulator([1]) + InstanceAccumulator([1], **COCO_CONVENTION)
    with pytest.raises(ValueError):
        InstanceAccumulator([1], crowd="keep")
