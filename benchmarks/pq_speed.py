"""PQ speed: xsam.eval.panoptic.pq_compute (default workers) vs a single-process per-image loop written
the way panopticapi's pq_compute works, on the same JSON + PNG files, in one run.

    python benchmarks/pq_speed.py [--images 500] [--data-dir .cache/bench_pq] [--repeats 1]

Data: COCO-panoptic-like 640x480 PNGs, 10-20 segments (some crowd, VOID blocks) per image; predictions
are perturbed ground truth (moved boundaries, flipped / dropped / merged segments, spurious blobs).
Generated once and cached. The script checks both implementations give the same numbers, prints both
times and their ratio, plus the single-worker time and the bare PNG decode time (a floor for both).

Reading the numbers: both implementations must decode two PNGs per image, and zlib inflate alone is
~2 ms per 640x480 PNG, more than half of the reference's per-image time on numpy 2.x (whose np.unique
is fast). So the ratio is bounded by about (reference time / decode time) x cores, ~2x per core; the
CPU-seconds column separates our per-image work from contention on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from xsam.eval.panoptic import format_table, pq_compute
from xsam.eval.panoptic_io import write_id_png

CATEGORIES = [{"id": i, "name": f"thing{i}", "isthing": 1} for i in range(1, 81)] + [
    {"id": i, "name": f"stuff{i}", "isthing": 0} for i in range(92, 145)
]


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _voronoi(h: int, w: int, seeds: np.ndarray) -> np.ndarray:
    yy = np.arange(h, dtype=np.float32)[:, None, None]
    xx = np.arange(w, dtype=np.float32)[None, :, None]
    d = (yy - seeds[:, 0].astype(np.float32)) ** 2 + (xx - seeds[:, 1].astype(np.float32)) ** 2
    return d.argmin(-1)


def _image(rng: np.random.Generator, h: int, w: int) -> tuple:
    n = int(rng.integers(10, 21))
    seeds = rng.integers(0, [h, w], size=(n, 2))
    lab = _voronoi(h, w, seeds)
    ids = rng.choice((1 << 24) - 1, size=n, replace=False) + 1
    cat_ids = np.array([c["id"] for c in CATEGORIES])
    cats = rng.choice(cat_ids, size=n)
    crowd = (rng.random(n) < 0.08) & (cats < 92)
    gt = ids[lab]
    for _ in range(int(rng.integers(1, 5))):
        y, x = rng.integers(0, [h, w])
        gt[y : y + int(rng.integers(5, 60)), x : x + int(rng.integers(5, 80))] = 0
    gt_segs = [
        {"id": int(ids[i]), "category_id": int(cats[i]), "iscrowd": int(crowd[i]), "area": int((gt == ids[i]).sum())}
        for i in range(n)
    ]
    gt_segs = [s for s in gt_segs if s["area"]]

    moved = np.clip(seeds + rng.integers(-40, 41, size=seeds.shape), 0, [h - 1, w - 1])
    plab = _voronoi(h, w, moved)
    pcats = cats.copy()
    flip = rng.random(n) < 0.1
    pcats[flip] = rng.choice(cat_ids, size=int(flip.sum()))
    pid = rng.choice((1 << 24) - 1, size=n + 6, replace=False) + 1
    pred = pid[plab]
    for i in np.flatnonzero(rng.random(n) < 0.08):
        pred[plab == i] = 0
    extra = {}
    for j in range(int(rng.integers(0, 5))):
        y, x = rng.integers(0, [h, w])
        pred[y : y + int(rng.integers(10, 80)), x : x + int(rng.integers(10, 80))] = pid[n + j]
        extra[int(pid[n + j])] = int(rng.choice(cat_ids))
    present = set(np.unique(pred).tolist()) - {0}
    pred_segs = [{"id": int(pid[i]), "category_id": int(pcats[i])} for i in range(n) if int(pid[i]) in present]
    pred_segs += [{"id": k, "category_id": v} for k, v in extra.items() if k in present]
    return gt, gt_segs, pred, pred_segs


def make_data(root: Path, images: int, h: int = 480, w: int = 640) -> tuple[Path, Path]:
    gt_json, pred_json = root / "gt.json", root / "pred.json"
    if gt_json.exists() and pred_json.exists() and len(json.loads(gt_json.read_text())["annotations"]) == images:
        return gt_json, pred_json
    t0 = time.perf_counter()
    (root / "gt").mkdir(parents=True, exist_ok=True)
    (root / "pred").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    gt_anns, pred_anns = [], []
    for k in range(images):
        gt, gs, pred, ps = _image(rng, h, w)
        name = f"{k:012d}.png"
        write_id_png(root / "gt" / name, gt)
        write_id_png(root / "pred" / name, pred)
        gt_anns.append({"image_id": k, "file_name": name, "segments_info": gs})
        pred_anns.append({"image_id": k, "file_name": name, "segments_info": ps})
    gt_json.write_text(json.dumps({"annotations": gt_anns, "categories": CATEGORIES}))
    pred_json.write_text(json.dumps({"annotations": pred_anns}))
    print(f"generated {images} images in {time.perf_counter() - t0:.0f}s under {root}", flush=True)
    return gt_json, pred_json


# ------------------------------------------------------------------------------------------------
# reference: one process, per image, the way panopticapi's pq_compute does it
# ------------------------------------------------------------------------------------------------
def _png_ids(path: Path) -> np.ndarray:
    a = np.array(Image.open(path), dtype=np.uint32)
    return a[:, :, 0] + 256 * a[:, :, 1] + 256 * 256 * a[:, :, 2]


def reference_pq(gt_json: Path, pred_json: Path, gt_folder: Path, pred_folder: Path) -> dict:
    gt_doc, pred_doc = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    categories = {c["id"]: c for c in gt_doc["categories"]}
    preds = {a["image_id"]: a for a in pred_doc["annotations"]}
    offset = 256 * 256 * 256
    tp, fp, fn, iou_sum = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(float)
    for gt_ann in gt_doc["annotations"]:
        pred_ann = preds[gt_ann["image_id"]]
        pan_gt = _png_ids(gt_folder / gt_ann["file_name"])
        pan_pred = _png_ids(pred_folder / pred_ann["file_name"])
        gt_segms = {s["id"]: s for s in gt_ann["segments_info"]}
        pred_segms = {s["id"]: dict(s) for s in pred_ann["segments_info"]}

        unseen = set(pred_segms)
        for label, count in zip(*np.unique(pan_pred, return_counts=True)):
            if label not in pred_segms:
                if label == 0:
                    continue
                raise KeyError(f"image {gt_ann['image_id']}: segment {label} in PNG, not in JSON")
            pred_segms[label]["area"] = count
            unseen.discard(label)
            if pred_segms[label]["category_id"] not in categories:
                raise KeyError(f"image {gt_ann['image_id']}: unknown category")
        if unseen:
            raise KeyError(f"image {gt_ann['image_id']}: segments {sorted(unseen)} in JSON, not in PNG")

        combined = pan_gt.astype(np.uint64) * offset + pan_pred.astype(np.uint64)
        pair_area = {}
        for label, count in zip(*np.unique(combined, return_counts=True)):
            pair_area[(label // offset, label % offset)] = count

        gt_matched, pred_matched = set(), set()
        for (g, p), inter in pair_area.items():
            if g not in gt_segms or p not in pred_segms:
                continue
            if gt_segms[g]["iscrowd"] == 1 or gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
                continue
            union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - pair_area.get((0, p), 0)
            iou = inter / union
            if iou > 0.5:
                tp[gt_segms[g]["category_id"]] += 1
                iou_sum[gt_segms[g]["category_id"]] += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd_of_cat = {}
        for g, info in gt_segms.items():
            if g in gt_matched:
                continue
            if info["iscrowd"] == 1:
                crowd_of_cat[info["category_id"]] = g
                continue
            fn[info["category_id"]] += 1
        for p, info in pred_segms.items():
            if p in pred_matched:
                continue
            ignored = pair_area.get((0, p), 0)
            if info["category_id"] in crowd_of_cat:
                ignored += pair_area.get((crowd_of_cat[info["category_id"]], p), 0)
            if ignored / info["area"] > 0.5:
                continue
            fp[info["category_id"]] += 1

    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        pq = sq = rq = 0.0
        n = 0
        per_class = {}
        for cid, c in categories.items():
            if isthing is not None and (c["isthing"] == 1) != isthing:
                continue
            if tp[cid] + fp[cid] + fn[cid] == 0:
                per_class[cid] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            d = tp[cid] + 0.5 * fp[cid] + 0.5 * fn[cid]
            per_class[cid] = {"pq": iou_sum[cid] / d, "sq": iou_sum[cid] / tp[cid] if tp[cid] else 0, "rq": tp[cid] / d}
            pq, sq, rq = pq + per_class[cid]["pq"], sq + per_class[cid]["sq"], rq + per_class[cid]["rq"]
        results[name] = {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}
        if name == "All":
            results["per_class"] = per_class
    return results


def decode_only(gt_json: Path, gt_folder: Path, pred_folder: Path) -> None:
    """Decode every GT and predicted PNG once (the floor under both implementations)."""
    for ann in json.loads(gt_json.read_text())["annotations"]:
        for folder in (gt_folder, pred_folder):
            with Image.open(folder / ann["file_name"]) as im:
                im.load()


def max_difference(a: dict, b: dict) -> float:
    diffs = [abs(a[k][m] - b[k][m]) for k in ("All", "Things", "Stuff") for m in ("pq", "sq", "rq")]
    diffs += [abs(a["per_class"][c][m] - b["per_class"][c][m]) for c in b["per_class"] for m in ("pq", "sq", "rq")]
    if any(a[k]["n"] != b[k]["n"] for k in ("All", "Things", "Stuff")):
        return float("inf")
    return max(diffs)


def _cpu() -> float:
    t = os.times()  # this process and its reaped children (the pool's workers)
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, repeats: int):
    """Best-of-repeats wall time, the CPU seconds of that run, and the result."""
    best, cpu, out = float("inf"), float("nan"), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu()
        out = fn()
        wall, used = time.perf_counter() - t0, _cpu() - c0
        if wall < best:
            best, cpu = wall, used
    return best, cpu, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--data-dir", default=".cache/bench_pq")
    p.add_argument("--repeats", type=int, default=1, help="best of N for every timing")
    args = p.parse_args()
    root = Path(args.data_dir) / f"v1_n{args.images}"  # bump v when the generator changes
    gt_json, pred_json = make_data(root, args.images)
    gt_dir, pred_dir = root / "gt", root / "pred"
    print(f"{args.images} images 640x480, os.cpu_count()={os.cpu_count()}", flush=True)

    t_dec, c_dec, _ = timed(lambda: decode_only(gt_json, gt_dir, pred_dir), args.repeats)
    t_ref, c_ref, ref = timed(lambda: reference_pq(gt_json, pred_json, gt_dir, pred_dir), args.repeats)
    t_one, c_one, one = timed(lambda: pq_compute(gt_json, pred_json, gt_dir, pred_dir, workers=1), args.repeats)
    t_ours, c_ours, ours = timed(lambda: pq_compute(gt_json, pred_json, gt_dir, pred_dir), args.repeats)

    print(format_table(ours))
    diff = max(max_difference(ours, ref), max_difference(one, ref))
    n = args.images
    rows = [
        ("PNG decode only (PIL load), 1 process", t_dec, c_dec),
        ("reference (panopticapi way), 1 process", t_ref, c_ref),
        ("xsam pq_compute, workers=1", t_one, c_one),
        (f"xsam pq_compute, default workers ({os.cpu_count()})", t_ours, c_ours),
    ]
    print(f"{'':44s} {'wall s':>7s} {'ms/image':>9s} {'CPU s':>7s}")
    for name, wall, cpu in rows:
        print(f"{name:44s} {wall:7.2f} {1e3 * wall / n:9.2f} {cpu:7.2f}")
    print(f"speed-up vs reference (wall): {t_ref / t_ours:.2f}x; workers=1: {t_ref / t_one:.2f}x; target >= 10x")
    print(f"max |difference| vs reference: {diff:.3g}")
    if not diff <= 1e-9:
        raise SystemExit("results differ from the reference")


if __name__ == "__main__":
    main()
