"""PQ / SQ / RQ: hand-made cases with known answers, equality with a per-segment-pair reference written
the panopticapi way, the JSON + PNG path and CLI, accumulator merges, input errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xsam.eval.panoptic import PanopticFormatError, PQAccumulator, format_table, main, pq_compute
from xsam.eval.panoptic_io import id2rgb, read_id_png, rgb2id, write_id_png

ROOT = Path(__file__).resolve().parents[2]
CATS = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "dog", "isthing": 1},
    {"id": 7, "name": "sky", "isthing": 0},
    {"id": 9, "name": "grass", "isthing": 0},
]


# ----------------------------------------------------------------------------------------------------
# reference: plain loops over segment pairs with boolean masks, following panopticapi's pq_compute
# ----------------------------------------------------------------------------------------------------
def reference_stats(images, categories):
    """images: [(gt_ids, gt_segments, pred_ids, pred_segments)] -> {cat: [tp, fp, fn, iou_sum]}."""
    stats = {c["id"]: [0, 0, 0, 0.0] for c in categories}
    for gt_ids, gt_segs, pred_ids, pred_segs in images:
        void = gt_ids == 0
        gt_area = {s["id"]: s["area"] if "area" in s else int((gt_ids == s["id"]).sum()) for s in gt_segs}
        pred_area = {s["id"]: int((pred_ids == s["id"]).sum()) for s in pred_segs}
        gt_matched, pred_matched = set(), set()
        for g in gt_segs:
            for p in pred_segs:
                if g.get("iscrowd", 0) == 1 or g["category_id"] != p["category_id"]:
                    continue
                pm = pred_ids == p["id"]
                inter = int(((gt_ids == g["id"]) & pm).sum())
                if inter == 0:
                    continue
                union = pred_area[p["id"]] + gt_area[g["id"]] - inter - int((pm & void).sum())
                iou = inter / union
                if iou > 0.5:
                    stats[g["category_id"]][0] += 1
                    stats[g["category_id"]][3] += iou
                    gt_matched.add(g["id"])
                    pred_matched.add(p["id"])
        crowd_of_cat = {}
        for g in gt_segs:
            if g["id"] in gt_matched:
                continue
            if g.get("iscrowd", 0) == 1:
                crowd_of_cat[g["category_id"]] = g["id"]  # the last crowd of a category wins
                continue
            stats[g["category_id"]][2] += 1
        for p in pred_segs:
            if p["id"] in pred_matched:
                continue
            pm = pred_ids == p["id"]
            ignored = int((pm & void).sum())
            if p["category_id"] in crowd_of_cat:
                ignored += int((pm & (gt_ids == crowd_of_cat[p["category_id"]])).sum())
            if ignored / pred_area[p["id"]] > 0.5:
                continue
            stats[p["category_id"]][1] += 1
    return stats


def reference_result(stats, categories):
    out = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        pq = sq = rq = 0.0
        n, per_class = 0, {}
        for c in categories:
            if isthing is not None and (c["isthing"] == 1) != isthing:
                continue
            tp, fp, fn, iou = stats[c["id"]]
            if tp + fp + fn == 0:
                per_class[c["id"]] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            d = tp + 0.5 * fp + 0.5 * fn
            per_class[c["id"]] = {"pq": iou / d, "sq": iou / tp if tp else 0.0, "rq": tp / d}
            pq, sq, rq = pq + iou / d, sq + (iou / tp if tp else 0.0), rq + tp / d
        out[name] = {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n} if n else {"pq": 0, "sq": 0, "rq": 0, "n": 0}
        if name == "All":
            out["per_class"] = per_class
    return out


def assert_results_equal(got, want, tol=1e-9):
    for name in ("All", "Things", "Stuff"):
        assert got[name]["n"] == want[name]["n"], name
        for k in ("pq", "sq", "rq"):
            assert got[name][k] == pytest.approx(want[name][k], abs=tol), (name, k)
    assert set(got["per_class"]) == set(want["per_class"])
    for cid, v in want["per_class"].items():
        for k in ("pq", "sq", "rq"):
            assert got["per_class"][cid][k] == pytest.approx(v[k], abs=tol), (cid, k)


# ----------------------------------------------------------------------------------------------------
# random COCO-like data: Voronoi segments, VOID blocks, crowd regions, perturbed predictions
# ----------------------------------------------------------------------------------------------------
def _voronoi(rng, h, w, seeds):
    yy, xx = np.mgrid[:h, :w]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    return d.argmin(-1)


def random_image(rng, h=48, w=64, cats=CATS):
    n = int(rng.integers(10, 21))
    seeds = rng.integers(0, [h, w], size=(n, 2))
    lab = _voronoi(rng, h, w, seeds)
    ids = rng.choice((1 << 24) - 1, size=n, replace=False) + 1
    seg_cat = rng.choice([c["id"] for c in cats], size=n)
    crowd = rng.random(n) < 0.15
    gt = ids[lab]
    for _ in range(int(rng.integers(0, 4))):  # VOID blocks
        y, x = rng.integers(0, [h, w])
        gt[y : y + int(rng.integers(3, 15)), x : x + int(rng.integers(3, 20))] = 0
    gt_segs = []
    for i in range(n):
        area = int((gt == ids[i]).sum())
        if area:
            gt_segs.append({"id": int(ids[i]), "category_id": int(seg_cat[i]), "iscrowd": int(crowd[i]), "area": area})

    # prediction: moved boundaries, flipped / dropped / merged segments, spurious blobs
    moved = np.clip(seeds + rng.integers(-6, 7, size=seeds.shape), 0, [h - 1, w - 1])
    plab = _voronoi(rng, h, w, moved)
    pcat = seg_cat.copy()
    flip = rng.random(n) < 0.12
    pcat[flip] = rng.choice([c["id"] for c in cats], size=int(flip.sum()))
    merge_into = np.arange(n)
    for i in np.flatnonzero(rng.random(n) < 0.1):
        merge_into[i] = int(rng.integers(0, n))
    plab = merge_into[plab]
    pids = rng.choice((1 << 24) - 1, size=n + 4, replace=False) + 1
    pred = pids[plab]
    for i in np.flatnonzero(rng.random(n) < 0.1):  # dropped -> predicted VOID
        pred[plab == i] = 0
    extra_cats = {}
    for j in range(int(rng.integers(0, 4))):  # spurious blobs, often over VOID or crowd
        y, x = rng.integers(0, [h, w])
        pred[y : y + int(rng.integers(2, 14)), x : x + int(rng.integers(2, 14))] = pids[n + j]
        extra_cats[int(pids[n + j])] = int(rng.choice([c["id"] for c in cats]))
    pred_segs = []
    for pid in np.unique(pred):
        if pid == 0:
            continue
        k = np.flatnonzero(pids == pid)[0]
        cat = extra_cats[int(pid)] if k >= n else int(pcat[k])
        pred_segs.append({"id": int(pid), "category_id": cat})
    rng.shuffle(pred_segs)
    return gt, gt_segs, pred, pred_segs


def random_images(seed, count, **kw):
    rng = np.random.default_rng(seed)
    return [random_image(rng, **kw) for _ in range(count)]


def accumulate(images, cats=CATS):
    acc = PQAccumulator(cats)
    for gt, gs, pr, ps in images:
        acc.add(gt, gs, pr, ps)
    return acc


# ----------------------------------------------------------------------------------------------------
# hand-made cases
# ----------------------------------------------------------------------------------------------------
def _blank(h=10, w=20):
    return np.zeros((h, w), np.int64), np.zeros((h, w), np.int64)


def test_perfect_prediction_is_one():
    gt, _ = _blank()
    gt[:, :10], gt[:, 10:] = 5, 6
    segs = [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 7}]
    r = PQAccumulator(CATS).add(gt, segs, gt.copy(), segs).result()
    for name, n in (("All", 2), ("Things", 1), ("Stuff", 1)):
        assert r[name] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_one_tp_with_known_iou():
    gt, pred = _blank()
    gt[:, :10], gt[:, 10:] = 1, 2  # two 100-px segments
    pred[:, :12], pred[:, 12:] = 3, 4  # pred 3 = gt 1 + 20 px of gt 2
    gs = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 7}]
    ps = [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 7}]
    acc = PQAccumulator(CATS).add(gt, gs, pred, ps)
    r = acc.result()
    # gt1/pred3: 100 / 120; gt2/pred4: 80 / 100
    assert r["per_class"][1] == pytest.approx({"pq": 100 / 120, "sq": 100 / 120, "rq": 1.0})
    assert r["per_class"][7] == pytest.approx({"pq": 0.8, "sq": 0.8, "rq": 1.0})
    assert r["All"]["pq"] == pytest.approx((100 / 120 + 0.8) / 2)
    assert acc.per_category()[1] == {"tp": 1, "fp": 0, "fn": 0, "iou": pytest.approx(100 / 120)}


def test_iou_exactly_half_is_not_a_match():
    gt, pred = _blank()
    gt[:, :10], gt[:, 10:] = 1, 3  # two 100-px segments
    pred[:, :5], pred[:, 5:15], pred[:, 15:] = 4, 2, 5
    gs = [{"id": 1, "category_id": 1}, {"id": 3, "category_id": 2}]
    ps = [{"id": 2, "category_id": 1}, {"id": 4, "category_id": 1}, {"id": 5, "category_id": 2}]
    c = PQAccumulator(CATS).add(gt, gs, pred, ps).per_category()
    # pred 2 / gt 1: 50 / 150; pred 4 / gt 1 and pred 5 / gt 3: 50 / 100 = 0.5, not > 0.5
    assert (c[1]["tp"], c[1]["fp"], c[1]["fn"]) == (0, 2, 1)
    assert (c[2]["tp"], c[2]["fp"], c[2]["fn"]) == (0, 1, 1)


def test_strict_half_threshold():
    gt, pred = _blank(1, 4)
    gt[0, :] = [1, 1, 0, 0]  # gt 1: 2 px
    pred[0, :] = [2, 9, 9, 0]  # pred 2 covers 1 px of gt 1: IoU 1/2 -> no match
    gs = [{"id": 1, "category_id": 1}]
    ps = [{"id": 2, "category_id": 1}, {"id": 9, "category_id": 2}]
    c = PQAccumulator(CATS).add(gt, gs, pred, ps).per_category()
    assert (c[1]["tp"], c[1]["fp"], c[1]["fn"]) == (0, 1, 1)
    # pred 9: 1 px on gt 1 + 1 px on VOID -> exactly half VOID is not "more than half": FP
    assert c[2]["fp"] == 1


def test_void_pixels_leave_the_union():
    gt, pred = _blank()
    gt[:, :10] = 1
    pred[:, :16] = 2  # 100 px on gt 1, 60 px on VOID -> IoU 1.0
    r = PQAccumulator(CATS).add(gt, [{"id": 1, "category_id": 1}], pred, [{"id": 2, "category_id": 1}]).result()
    assert r["per_class"][1] == {"pq": 1.0, "sq": 1.0, "rq": 1.0}


def test_fp_and_fn_and_category_with_only_fn():
    gt, pred = _blank()
    gt[:, :10], gt[:, 10:] = 1, 2
    pred[:, :10], pred[:, 10:] = 3, 4
    gs = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 9}]
    ps = [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 2}]  # wrong category on gt 2
    acc = PQAccumulator(CATS).add(gt, gs, pred, ps)
    c = acc.per_category()
    assert (c[2]["fp"], c[9]["fn"]) == (1, 1)
    r = acc.result()
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["per_class"][9] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["All"] == {"pq": pytest.approx(1 / 3), "sq": pytest.approx(1 / 3), "rq": pytest.approx(1 / 3), "n": 3}
    assert r["Things"]["n"] == 2 and r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def test_prediction_mostly_over_void_is_ignored():
    gt, pred = _blank()
    gt[:, :10] = 1
    gt[:, 10:] = 0
    pred[:, :10] = 2
    pred[:, 10:14], pred[:, 14:] = 3, 4
    gs = [{"id": 1, "category_id": 7}]
    ps = [{"id": 2, "category_id": 7}, {"id": 3, "category_id": 1}, {"id": 4, "category_id": 2}]
    c = PQAccumulator(CATS).add(gt, gs, pred, ps).per_category()
    assert c[1]["fp"] == 0 and c[2]["fp"] == 0 and c[7]["tp"] == 1
    # a segment 60% over VOID, 40% over a real segment: ignored; 40% over VOID: FP
    gt2, pred2 = _blank()
    gt2[:, :10] = 1
    pred2[:, 6:16] = 5  # 40 px on gt 1, 60 px VOID
    pred2[:, :6] = 6
    gs2 = [{"id": 1, "category_id": 7}]
    c = PQAccumulator(CATS).add(gt2, gs2, pred2, [{"id": 5, "category_id": 2}, {"id": 6, "category_id": 7}])
    assert c.per_category()[2]["fp"] == 0
    pred2[:, :] = 6
    pred2[:, 4:14] = 5  # 60 px on gt 1, 40 px VOID
    c = PQAccumulator(CATS).add(gt2, gs2, pred2, [{"id": 5, "category_id": 2}, {"id": 6, "category_id": 7}])
    assert c.per_category()[2]["fp"] == 1


def test_crowd_regions():
    gt, pred = _blank()
    gt[:, :10], gt[:, 10:] = 1, 2  # 1: person crowd, 2: grass
    gs = [{"id": 1, "category_id": 1, "iscrowd": 1}, {"id": 2, "category_id": 9}]
    pred[:, 10:] = 5
    pred[:, :8] = 3  # person over the person crowd: ignored (neither TP nor FP)
    pred[:, 8:10] = 4  # car over the person crowd: FP (crowd of another category)
    ps = [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 2}, {"id": 5, "category_id": 9}]
    c = PQAccumulator(CATS).add(gt, gs, pred, ps).per_category()
    assert c[1] == {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0}  # crowd never FN, never TP
    assert c[2]["fp"] == 1 and c[9]["tp"] == 1
    # crowd + VOID together over half: ignored
    gt3, pred3 = _blank()
    gt3[:, :4] = 1  # crowd, 40 px
    gt3[:, 4:8] = 0  # VOID, 40 px
    gt3[:, 8:] = 2
    pred3[:, :] = 7
    pred3[:, 1:11] = 6  # 30 crowd + 40 VOID + 30 grass -> 70% ignored
    gs3 = [{"id": 1, "category_id": 1, "iscrowd": 1}, {"id": 2, "category_id": 9}]
    ps3 = [{"id": 6, "category_id": 1}, {"id": 7, "category_id": 9}]
    c = PQAccumulator(CATS).add(gt3, gs3, pred3, ps3).per_category()
    assert c[1]["fp"] == 0 and c[9]["tp"] == 1


def test_only_the_last_crowd_segment_of_a_category_counts():
    """panopticapi keeps one crowd region per category (a dict overwritten in segments_info order)."""
    gt, pred = _blank()
    gt[:, :5], gt[:, 5:10], gt[:, 10:] = 1, 2, 3
    gs = [
        {"id": 1, "category_id": 1, "iscrowd": 1},
        {"id": 2, "category_id": 1, "iscrowd": 1},
        {"id": 3, "category_id": 9},
    ]
    pred[:, :5], pred[:, 5:10], pred[:, 10:] = 4, 5, 6
    ps = [{"id": 4, "category_id": 1}, {"id": 5, "category_id": 1}, {"id": 6, "category_id": 9}]
    c = PQAccumulator(CATS).add(gt, gs, pred, ps).per_category()
    assert c[1] == {"tp": 0, "fp": 1, "fn": 0, "iou": 0.0}  # over crowd 1: FP; over crowd 2: ignored
    c = PQAccumulator(CATS).add(gt, gs[::-1], pred, ps).per_category()
    assert c[1]["fp"] == 1


def test_gt_segment_absent_from_png_is_fn_and_json_area_is_used():
    gt, pred = _blank()
    gt[:, :10] = 1
    pred[:, :10] = 2
    # JSON area 150 (not the 100 pixels): panopticapi uses it -> IoU 100/150
    gs = [{"id": 1, "category_id": 1, "area": 150}, {"id": 8, "category_id": 2, "area": 30}]
    acc = PQAccumulator(CATS).add(gt, gs, pred, [{"id": 2, "category_id": 1}], gt_area_from_segments=True)
    c = acc.per_category()
    assert c[1]["iou"] == pytest.approx(100 / 150) and c[2]["fn"] == 1
    c = PQAccumulator(CATS).add(gt, gs, pred, [{"id": 2, "category_id": 1}]).per_category()
    assert c[1]["iou"] == 1.0


def test_empty_groups_give_zero():
    gt, _ = _blank()
    gt[:] = 1
    segs = [{"id": 1, "category_id": 1}]
    r = PQAccumulator(CATS).add(gt, segs, gt, segs).result()
    assert r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert PQAccumulator(CATS).result()["All"]["n"] == 0


# ----------------------------------------------------------------------------------------------------
# random data vs the reference; merges
# ----------------------------------------------------------------------------------------------------
def test_random_images_equal_reference():
    images = random_images(0, 60)
    stats = reference_stats(images, CATS)
    acc = accumulate(images)
    for cid, (tp, fp, fn, iou) in stats.items():
        got = acc.per_category()[cid]
        assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn), cid
        assert got["iou"] == pytest.approx(iou, abs=1e-9)
    # the data exercise every branch
    assert all(sum(s[k] for s in stats.values()) > 10 for k in range(3))
    assert_results_equal(acc.result(), reference_result(stats, CATS))


def test_small_int_ids_and_dtypes_agree():
    images = random_images(1, 10)
    want = accumulate(images).result()
    relabelled = []
    for gt, gs, pr, ps in images:
        gmap = {s["id"]: i + 1 for i, s in enumerate(gs)}
        pmap = {s["id"]: i + 1 for i, s in enumerate(ps)}
        g2, p2 = np.zeros(gt.shape, np.uint16), np.zeros(pr.shape, np.int32)
        for old, new in gmap.items():
            g2[gt == old] = new
        for old, new in pmap.items():
            p2[pr == old] = new
        relabelled.append(
            (g2, [dict(s, id=gmap[s["id"]]) for s in gs], p2, [dict(s, id=pmap[s["id"]]) for s in ps])
        )
    assert_results_equal(accumulate(relabelled).result(), want, tol=1e-12)


def test_general_path_large_ids_and_many_segments():
    """ids >= 2^24 and > 254 segments leave the table fast path; results must not change."""
    images = random_images(6, 8)
    shifted = [
        (gt.astype(np.int64) + (gt > 0) * (1 << 40), [dict(s, id=s["id"] + (1 << 40)) for s in gs], pr, ps)
        for gt, gs, pr, ps in images
    ]
    assert_results_equal(accumulate(shifted).result(), accumulate(images).result(), tol=1e-12)
    rng = np.random.default_rng(7)
    many = []
    for _ in range(2):  # 400 small GT segments, predictions shifted by one pixel
        gt = np.repeat(np.repeat(np.arange(1, 401).reshape(20, 20), 4, 0), 4, 1)
        pr = np.roll(gt, 1, axis=1) + 1000
        gs = [{"id": i, "category_id": int(rng.choice([1, 2, 7])), "iscrowd": int(rng.random() < 0.1)} for i in range(1, 401)]
        ps = [{"id": i + 1000, "category_id": gs[i - 1]["category_id"]} for i in range(1, 401)]
        many.append((gt, gs, pr, ps))
    want = reference_result(reference_stats(many, CATS), CATS)
    assert_results_equal(accumulate(many).result(), want)
    assert accumulate(many).tp.sum() > 0


def test_merge_equals_single_pass():
    images = random_images(2, 30)
    whole = accumulate(images)
    parts = [accumulate(images[i::3]) for i in range(3)]
    merged = parts[0] + parts[1] + parts[2]
    assert merged.images == 30
    np.testing.assert_array_equal(merged.tp, whole.tp)
    np.testing.assert_array_equal(merged.fp, whole.fp)
    np.testing.assert_array_equal(merged.fn, whole.fn)
    np.testing.assert_allclose(merged.iou, whole.iou, rtol=0, atol=1e-12)
    assert_results_equal(sum(parts).result(), whole.result(), tol=1e-12)
    with pytest.raises(ValueError):
        _ = whole + PQAccumulator(CATS[:2])


def test_threads_give_the_same_result():
    """Lookup tables and pixel buffers are per thread."""
    from concurrent.futures import ThreadPoolExecutor

    images = random_images(8, 24)
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(accumulate, [images[i::4] for i in range(4)]))
    assert_results_equal(sum(parts).result(), accumulate(images).result(), tol=1e-12)


# ----------------------------------------------------------------------------------------------------
# JSON + PNG path, CLI
# ----------------------------------------------------------------------------------------------------
def write_dataset(root: Path, images, cats=CATS):
    (root / "gt").mkdir(parents=True)
    (root / "pred").mkdir()
    gt_anns, pred_anns = [], []
    for k, (gt, gs, pr, ps) in enumerate(images):
        name = f"{k:06d}.png"
        write_id_png(root / "gt" / name, gt)
        write_id_png(root / "pred" / name, pr)
        gt_anns.append({"image_id": k, "file_name": name, "segments_info": gs})
        pred_anns.append({"image_id": k, "file_name": name, "segments_info": ps})
    gt_json, pred_json = root / "gt.json", root / "pred.json"
    gt_json.write_text(json.dumps({"annotations": gt_anns, "categories": cats}))
    pred_json.write_text(json.dumps({"annotations": pred_anns[::-1]}))
    return gt_json, pred_json


def test_png_roundtrip():
    ids = np.random.default_rng(3).integers(0, 1 << 24, size=(5, 7))
    np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)


def test_files_and_cli_equal_reference(tmp_path, capsys):
    images = random_images(4, 24)
    gt_json, pred_json = write_dataset(tmp_path, images)
    want = reference_result(reference_stats(images, CATS), CATS)
    for workers in (1, 2):
        got = pq_compute(gt_json, pred_json, workers=workers)  # folders default to X for X.json
        assert_results_equal(got, want)
    got = main(["--gt_json_file", str(gt_json), "--pred_json_file", str(pred_json), "--workers", "2"])
    out = capsys.readouterr().out
    assert format_table(want) in out and "Time elapsed:" in out
    assert_results_equal(got, want)
    table = out[out.index("          |") :].splitlines()
    assert table[0] == "          |    PQ     SQ     RQ     N"
    assert table[1] == "-" * 38
    assert [line.split("|")[0].strip() for line in table[2:5]] == ["All", "Things", "Stuff"]


def test_module_entry_point(tmp_path):
    images = random_images(5, 4)
    gt_json, pred_json = write_dataset(tmp_path, images)
    proc = subprocess.run(
        [sys.executable, "-m", "xsam.eval.panoptic", "--gt_json_file", str(gt_json),
         "--pred_json_file", str(pred_json), "--gt_folder", str(tmp_path / "gt"),
         "--pred_folder", str(tmp_path / "pred")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert format_table(reference_result(reference_stats(images, CATS), CATS)) in proc.stdout


# ----------------------------------------------------------------------------------------------------
# input errors
# ----------------------------------------------------------------------------------------------------
def _one_image_dataset(tmp_path):
    gt, pred = _blank()
    gt[:, :10], gt[:, 10:] = 1, 2
    pred[:, :10], pred[:, 10:] = 3, 4
    gs = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 9, "iscrowd": 0}]
    ps = [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 9}]
    write_dataset(tmp_path, [(gt, gs, pred, ps)])
    return json.loads((tmp_path / "gt.json").read_text()), json.loads((tmp_path / "pred.json").read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda g, p, d: p["annotations"][0]["segments_info"].append({"id": 77, "category_id": 1}),
         "in segments_info and not in the PNG"),
        (lambda g, p, d: p["annotations"][0]["segments_info"].pop(), "in the PNG and not in segments_info"),
        (lambda g, p, d: g["annotations"][0]["segments_info"].pop(), "in the PNG and not in segments_info"),
        (lambda g, p, d: p["annotations"][0]["segments_info"][0].update(category_id=55), "unknown category_id 55"),
        (lambda g, p, d: g["annotations"][0]["segments_info"][0].update(category_id=55), "unknown category_id 55"),
        (lambda g, p, d: write_id_png(d / "pred" / "000000.png", np.full((10, 21), 3)), "differs from prediction size"),
        (lambda g, p, d: p["annotations"][0].update(image_id=5), "no prediction for the image with id: 0"),
        (lambda g, p, d: p["annotations"][0].update(file_name="missing.png"), "does not exist"),
        (lambda g, p, d: p["annotations"][0]["segments_info"].append({"id": 3, "category_id": 1}), "repeated"),
    ],
)
def test_input_errors_name_image_and_file(tmp_path, mutate, message):
    g, p = _one_image_dataset(tmp_path)
    mutate(g, p, tmp_path)
    with pytest.raises(PanopticFormatError, match=message) as err:
        pq_compute(g, p, tmp_path / "gt", tmp_path / "pred", workers=1)
    assert "image" in str(err.value)
    if "no prediction" not in message:
        assert "000000.png" in str(err.value) or "missing.png" in str(err.value)


@pytest.mark.parametrize(
    "gt_value, pred_value, message",
    [
        (1 << 30, None, r"GT segment ids \[1073741824\] are in the PNG"),  # table path, id beyond the table
        (None, 5, r"predicted segment ids \[5\] are in the PNG"),
        (-3, None, "negative ids"),
        ("big", None, r"GT segment ids \[7\] are in the PNG"),  # general path (listed ids >= 2^24)
    ],
)
def test_in_memory_errors(gt_value, pred_value, message):
    gt, pred = _blank(4, 4)
    gt[:2], pred[:2] = 1, 2
    gs, ps = [{"id": 1, "category_id": 1}], [{"id": 2, "category_id": 1}]
    if gt_value == "big":
        gt[:2] = 1 << 40
        gs = [{"id": 1 << 40, "category_id": 1}]
        gt[3, 3] = 7
    elif gt_value is not None:
        gt[3, 3] = gt_value
    if pred_value is not None:
        pred[3, 3] = pred_value
    with pytest.raises(PanopticFormatError, match=message) as err:
        PQAccumulator(CATS).add(gt, gs, pred, ps, image_id="img-9")
    assert "image img-9" in str(err.value)
    with pytest.raises(PanopticFormatError, match=r"\[H, W\]"):
        PQAccumulator(CATS).add(gt[None], gs, pred[None], ps)


def test_cli_error_exit(tmp_path, capsys):
    _, p = _one_image_dataset(tmp_path)
    p["annotations"][0]["segments_info"].pop()
    (tmp_path / "pred.json").write_text(json.dumps(p))
    with pytest.raises(SystemExit) as e:
        main(["--gt_json_file", str(tmp_path / "gt.json"), "--pred_json_file", str(tmp_path / "pred.json")])
    assert e.value.code == 2 and "not in segments_info" in capsys.readouterr().err


def test_read_id_png_rejects_grayscale(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "g.png")
    with pytest.raises(PanopticFormatError, match="mode L"):
        read_id_png(tmp_path / "g.png", 1)
