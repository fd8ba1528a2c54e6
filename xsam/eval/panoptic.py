"""Panoptic quality (PQ / SQ / RQ) with panopticapi's exact definitions, vectorised per image.

Definitions (panopticapi ``pq_compute``), per image:

* id 0 is VOID in both maps; crowd GT segments (``iscrowd=1``) are never matched and never FN;
* a GT segment g and a predicted segment p of the same category match when
  ``IoU = |g & p| / (|p| + |g| - |g & p| - |p & VOID|) > 0.5`` (the prediction's VOID pixels leave the
  union); a match is a TP adding its IoU to the category's sum;
* an unmatched non-crowd GT segment is a FN;
* an unmatched prediction is a FP unless ``(|p & VOID| + |p & crowd_c|) / |p| > 0.5``, where ``crowd_c`` is
  the crowd segment of p's category (panopticapi keeps one per category: the last in ``segments_info``);
* the GT area is ``segments_info[i]["area"]`` on the file path (as panopticapi reads it) and the pixel
  count otherwise; predicted areas are always pixel counts.

Per category ``PQ = sum IoU / (TP + FP/2 + FN/2)``, ``SQ = sum IoU / TP`` (0 without TP),
``RQ = TP / (TP + FP/2 + FN/2)``; All / Things / Stuff average over the categories with
``TP + FP + FN > 0`` (``n`` of them; an empty group gives 0.0 where panopticapi would divide by zero).

Per image, each id map is turned into dense segment rows by one lookup in a 2^24-entry table (PNG ids
are 24-bit; unlisted ids map to a sentinel and raise), the two row maps are combined into one integer key
and one ``np.bincount`` gives every (GT segment, predicted segment) intersection; everything else works on
the small [segments x segments] matrix. Ids >= 2^24 or > 254 segments per side use a general path
(combined key + ``np.unique(..., return_counts=True)``). Pixel buffers are reused per thread. Images are
spread over a process pool. :class:`PQAccumulator` is the in-memory API (``a + b`` merges partial
results, e.g. from Ray tasks).

CLI: ``python -m xsam.eval.panoptic --gt_json_file F --pred_json_file F [--gt_folder D] [--pred_folder D]``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xsam.eval.panoptic_io import (
    PanopticFormatError,
    default_folder,
    load_json,
    match_annotations,
    read_id_png,
)

__all__ = ["PQAccumulator", "PanopticFormatError", "format_table", "main", "pq_compute"]

VOID = 0
_INT63 = 1 << 63
_UINT32 = 1 << 32


def _normalise_categories(categories: Iterable[Mapping] | Mapping[Any, Mapping]) -> dict[int, dict]:
    """[{id, name, isthing}] or {id: {...}} -> {id: {"id", "name", "isthing"}} in the given order."""
    items = categories.values() if isinstance(categories, Mapping) else categories
    out: dict[int, dict] = {}
    for c in items:
        if "id" not in c or "isthing" not in c:
            raise PanopticFormatError(f"category {c!r} needs 'id' and 'isthing'")
        cid = int(c["id"])
        if cid in out:
            raise PanopticFormatError(f"category id {cid} listed twice")
        out[cid] = {"id": cid, "name": c.get("name", str(cid)), "isthing": int(c["isthing"])}
    if not out:
        raise PanopticFormatError("no categories")
    return out


class _SegmentTable:
    """Segment ids / category rows / crowd flags / JSON areas of one side of one image."""

    def __init__(self, segments: Sequence[Mapping], cat_index: Mapping[int, int], side: str, where: str):
        n = len(segments)
        self.ids = np.empty(n, np.int64)
        self.cats = np.empty(n, np.int64)
        self.crowd = np.zeros(n, bool)
        self.json_area = np.zeros(n, np.int64)
        self.has_area = np.zeros(n, bool)
        for i, s in enumerate(segments):
            sid, cat = int(s["id"]), s["category_id"]
            if sid <= 0:
                raise PanopticFormatError(f"{where}: {side} segment id {sid} is invalid (0 is VOID, ids are > 0)")
            if cat not in cat_index:
                raise PanopticFormatError(f"{where}: {side} segment with ID {sid} has unknown category_id {cat}")
            self.ids[i] = sid
            self.cats[i] = cat_index[cat]
            self.crowd[i] = s.get("iscrowd", 0) == 1
            if "area" in s:
                self.json_area[i] = s["area"]
                self.has_area[i] = True
        self.order = np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids[self.order]
        if n > 1 and np.any(self.sorted_ids[1:] == self.sorted_ids[:-1]):
            dup = np.unique(self.sorted_ids[1:][self.sorted_ids[1:] == self.sorted_ids[:-1]])
            raise PanopticFormatError(f"{where}: {side} segment ids {dup.tolist()} repeated in segments_info")

    def rows(self, labels: np.ndarray, side: str, where: str) -> np.ndarray:
        """PNG ids -> row in the intersection matrix (0 = VOID, i + 1 = segments_info[i])."""
        n = len(self.ids)
        pos = np.searchsorted(self.sorted_ids, labels)
        pos_c = np.minimum(pos, max(n - 1, 0))
        found = (pos < n) & (self.sorted_ids[pos_c] == labels) if n else np.zeros(len(labels), bool)
        bad = ~found & (labels != VOID)
        if bad.any():
            raise PanopticFormatError(
                f"{where}: {side} segment ids {labels[bad].tolist()} are in the PNG and not in segments_info"
            )
        return np.where(found, self.order[pos_c] + 1, 0)


def _as_id_map(a: Any, side: str, where: str) -> np.ndarray:
    """Validate an id map: [H, W], integer dtype, ids in [0, 2^63). Unsigned maps of <= 32 bits (the PNG
    case) need no pass over the pixels."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise PanopticFormatError(f"{where}: {side} id map must be [H, W], got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise PanopticFormatError(f"{where}: {side} id map must be integer, got {a.dtype}")
    if a.size and a.dtype.kind == "i" and a.min() < 0:
        raise PanopticFormatError(f"{where}: {side} id map has negative ids")
    if a.size and a.dtype.kind == "u" and a.dtype.itemsize > 4 and a.max() >= _INT63:
        raise PanopticFormatError(f"{where}: {side} id map has ids >= 2^63")
    return a


def _pair_counts(gt: np.ndarray, gmax: int, pred: np.ndarray, pmax: int) -> tuple[np.ndarray, ...]:
    """Every (gt id, pred id) pair present in the maps with its pixel count, via one np.unique."""
    base = pmax + 1
    if (gmax + 1) * base <= _UINT32:
        key = gt.astype(np.uint32)
        key *= np.uint32(base)
        key += pred.astype(np.uint32, copy=False)
    elif (gmax + 1) * base < _INT63:
        key = gt.astype(np.int64)
        key *= base
        key += pred.astype(np.int64, copy=False)
    else:  # ids too large to combine directly: remap to dense indices first
        g_vals, g_inv = np.unique(gt, return_inverse=True)
        p_vals, p_inv = np.unique(pred, return_inverse=True)
        labels, counts = np.unique(g_inv.astype(np.int64) * len(p_vals) + p_inv, return_counts=True)
        return g_vals[labels // len(p_vals)].astype(np.int64), p_vals[labels % len(p_vals)].astype(np.int64), counts
    labels, counts = np.unique(key.ravel(), return_counts=True)
    labels = labels.astype(np.int64)
    return labels // base, labels % base, counts


_LUT_IDS = 1 << 24  # PNG ids are 24-bit
_LUT_FREE = 255  # uint8 rows: up to 254 segments per side
_SCRATCH_MAX_PIXELS = 1 << 23  # larger images get fresh buffers instead of kept ones
_tls = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A per-thread buffer reused from image to image. Fresh pages each cost a page fault, which on a VM
    is a sizeable part of the per-image time; reused buffers keep their pages."""
    n = math.prod(shape)
    if n > _SCRATCH_MAX_PIXELS:
        return np.empty(shape, dtype)
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.size < n or buf.dtype != dtype:
        buf = bufs[name] = np.empty(n, dtype)
    return buf[:n].reshape(shape)


def _dense(ids: np.ndarray, tab: _SegmentTable, out: np.ndarray) -> np.ndarray:
    """Id map -> uint8 rows (0 = VOID, i + 1 = segments_info[i], 255 = not listed) through a per-thread
    (2^24 + 1)-entry table; only this image's entries are set, and reset afterwards. Ids >= 2^24 clip to
    the last entry, which stays 255."""
    lut = getattr(_tls, "lut", None)
    if lut is None:
        lut = _tls.lut = np.full(_LUT_IDS + 1, _LUT_FREE, np.uint8)
        lut[VOID] = 0
    lut[tab.ids] = np.arange(1, len(tab.ids) + 1, dtype=np.uint8)
    try:
        return np.take(lut, ids, mode="clip", out=out)
    finally:
        lut[tab.ids] = _LUT_FREE


def _unlisted(ids: np.ndarray, tab: _SegmentTable, side: str, where: str) -> PanopticFormatError:
    bad = np.setdiff1d(np.unique(ids), np.append(tab.ids, VOID))
    return PanopticFormatError(f"{where}: {side} segment ids {bad.tolist()} are in the PNG and not in segments_info")


def _intersections(gt: np.ndarray, gtab: _SegmentTable, pred: np.ndarray, ptab: _SegmentTable, where: str) -> np.ndarray:
    """[G + 1, P + 1] pixel counts of (GT row, predicted column); row / column 0 is VOID."""
    G, P = len(gtab.ids), len(ptab.ids)
    small_ids = max(gtab.ids.max(initial=0), ptab.ids.max(initial=0)) < _LUT_IDS
    if small_ids and max(G, P) < _LUT_FREE:  # fast path: dense rows, key = row * 256 + column, bincount
        dg = _dense(gt, gtab, _scratch("gt_rows", gt.shape, np.uint8))
        dp = _dense(pred, ptab, _scratch("pred_rows", gt.shape, np.uint8))
        key = _scratch("key", gt.shape, np.intp)  # bincount's own index type: no conversion inside
        np.left_shift(dg, 8, out=key, dtype=np.intp)
        np.bitwise_or(key, dp, out=key)
        counts = np.bincount(key.ravel(), minlength=(G + 1) * 256)
        if len(counts) > (G + 1) * 256:  # a key beyond the last row: row 255, an unlisted GT id
            raise _unlisted(gt, gtab, "GT", where)
        m = counts.reshape(G + 1, 256)
        if m[:, P + 1 :].any():  # column 255: an unlisted predicted id
            raise _unlisted(pred, ptab, "predicted", where)
        return m[: G + 1, : P + 1].astype(np.int64)
    gmax = int(gt.max()) if gt.size else 0
    pmax = int(pred.max()) if pred.size else 0
    g_lab, p_lab, counts = _pair_counts(gt, gmax, pred, pmax)
    m = np.zeros((G + 1, P + 1), np.int64)  # pairs in g_lab / p_lab are unique
    m[gtab.rows(g_lab, "GT", where), ptab.rows(p_lab, "predicted", where)] = counts
    return m


def _image_outcome(
    gt_ids: Any,
    gt_segments: Sequence[Mapping],
    pred_ids: Any,
    pred_segments: Sequence[Mapping],
    cat_index: Mapping[int, int],
    gt_area_from_segments: bool,
    where: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image -> (TP category rows, their IoUs, FP category rows, FN category rows)."""
    gt = _as_id_map(gt_ids, "GT", where)
    pred = _as_id_map(pred_ids, "predicted", where)
    if gt.shape != pred.shape:
        raise PanopticFormatError(f"{where}: GT size {gt.shape} differs from prediction size {pred.shape}")
    gtab = _SegmentTable(gt_segments, cat_index, "GT", where)
    ptab = _SegmentTable(pred_segments, cat_index, "predicted", where)

    m = _intersections(gt, gtab, pred, ptab, where)
    P = len(ptab.ids)

    pred_area = m[:, 1:].sum(axis=0)
    if P and (pred_area == 0).any():
        raise PanopticFormatError(
            f"{where}: predicted segment ids {ptab.ids[pred_area == 0].tolist()} are in segments_info "
            "and not in the PNG"
        )
    gt_area = m[1:, :].sum(axis=1)
    if gt_area_from_segments:  # panopticapi reads GT areas from the JSON
        gt_area = np.where(gtab.has_area, gtab.json_area, gt_area)

    inter, void = m[1:, 1:], m[0, 1:]
    eligible = (inter > 0) & ~gtab.crowd[:, None] & (gtab.cats[:, None] == ptab.cats[None, :])
    union = pred_area[None, :] + gt_area[:, None] - inter - void[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(eligible, inter / np.where(eligible, union, 1), 0.0)
    match = eligible & (iou > 0.5)
    r, c = np.nonzero(match)
    tp_cats, tp_iou = gtab.cats[r], iou[r, c]

    fn_cats = gtab.cats[~match.any(axis=1) & ~gtab.crowd]

    # one crowd segment per category, the last listed (panopticapi's dict overwrite)
    crowd_row = np.full(len(cat_index), -1, np.int64)
    for row in np.flatnonzero(gtab.crowd):
        crowd_row[gtab.cats[row]] = row
    cr = crowd_row[ptab.cats]
    ignored_px = void + np.where(cr >= 0, inter[np.maximum(cr, 0), np.arange(P)], 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        is_fp = ~match.any(axis=0) & ~(ignored_px / pred_area > 0.5)
    return tp_cats, tp_iou, ptab.cats[is_fp], fn_cats


class PQAccumulator:
    """Per-category TP / FP / FN / IoU sums; ``add`` one image at a time, ``a + b`` merges, ``result()``.

    ``categories``: ``[{id, name, isthing}]`` (COCO layout) or ``{id: {...}}``. Picklable (plain numpy).
    """

    def __init__(self, categories: Iterable[Mapping] | Mapping[Any, Mapping]):
        self.categories = _normalise_categories(categories)
        self._index = {cid: i for i, cid in enumerate(self.categories)}
        n = len(self.categories)
        self.tp = np.zeros(n, np.int64)
        self.fp = np.zeros(n, np.int64)
        self.fn = np.zeros(n, np.int64)
        self.iou = np.zeros(n, np.float64)
        self.images = 0

    def add(
        self,
        gt_ids: Any,
        gt_segments: Sequence[Mapping],
        pred_ids: Any,
        pred_segments: Sequence[Mapping],
        *,
        image_id: Any = None,
        gt_area_from_segments: bool = False,
        where: str | None = None,
    ) -> PQAccumulator:
        """Score one image.

        gt_ids / pred_ids: [H, W] integer segment ids (0 = VOID). gt_segments: ``[{id, category_id,
        iscrowd?, area?}]``; pred_segments: ``[{id, category_id}]``. ``gt_area_from_segments=True`` takes
        GT areas from ``area`` (panopticapi's JSON convention) instead of counting pixels.
        Raises PanopticFormatError on inconsistent inputs.
        """
        where = where or f"image {image_id if image_id is not None else '#' + str(self.images)}"
        tp_c, tp_iou, fp_c, fn_c = _image_outcome(
            gt_ids, gt_segments, pred_ids, pred_segments, self._index, gt_area_from_segments, where
        )
        np.add.at(self.tp, tp_c, 1)
        np.add.at(self.iou, tp_c, tp_iou)
        np.add.at(self.fp, fp_c, 1)
        np.add.at(self.fn, fn_c, 1)
        self.images += 1
        return self

    def _check_compatible(self, other: PQAccumulator) -> None:
        if not isinstance(other, PQAccumulator):
            raise TypeError(f"cannot merge PQAccumulator with {type(other).__name__}")
        if list(self.categories) != list(other.categories):
            raise ValueError("PQAccumulators over different categories cannot be merged")

    def __iadd__(self, other: PQAccumulator):
        self._check_compatible(other)
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        self.images += other.images
        return self

    def __add__(self, other: PQAccumulator) -> PQAccumulator:
        self._check_compatible(other)
        out = PQAccumulator(self.categories.values())
        out += self
        out += other
        return out

    def __radd__(self, other: Any) -> PQAccumulator:
        if isinstance(other, int) and other == 0:  # sum([...]) starts from 0
            return self + PQAccumulator(self.categories.values())
        return NotImplemented

    def per_category(self) -> dict[int, dict]:
        """{category_id: {"tp", "fp", "fn", "iou"}} raw sums."""
        return {
            cid: {"tp": int(self.tp[i]), "fp": int(self.fp[i]), "fn": int(self.fn[i]), "iou": float(self.iou[i])}
            for cid, i in self._index.items()
        }

    def _average(self, isthing: bool | None) -> tuple[dict, dict]:
        pq = sq = rq = 0.0
        n = 0
        per_class = {}
        for cid, i in self._index.items():
            if isthing is not None and (self.categories[cid]["isthing"] == 1) != isthing:
                continue
            tp, fp, fn, iou = int(self.tp[i]), int(self.fp[i]), int(self.fn[i]), float(self.iou[i])
            if tp + fp + fn == 0:
                per_class[cid] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            denom = tp + 0.5 * fp + 0.5 * fn
            c = {"pq": iou / denom, "sq": iou / tp if tp else 0.0, "rq": tp / denom}
            per_class[cid] = c
            pq, sq, rq = pq + c["pq"], sq + c["sq"], rq + c["rq"]
        avg = {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n} if n else {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
        return avg, per_class

    def result(self) -> dict:
        """panopticapi's layout: {"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class": {id: {...}}}."""
        out: dict = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            out[name], per_class = self._average(isthing)
            if name == "All":
                out["per_class"] = per_class
        return out


def format_table(results: Mapping) -> str:
    """The table panopticapi prints (values x100)."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(
            "{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
                name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]
            )
        )
    return "\n".join(lines)


def add_annotation_pair(
    acc: PQAccumulator, gt_ann: Mapping, pred_ann: Mapping, gt_folder: str | os.PathLike, pred_folder: str | os.PathLike
) -> None:
    """Decode one image's GT and predicted PNGs and add them to ``acc`` (GT areas from the JSON)."""
    image_id = gt_ann.get("image_id")
    for ann, side in ((gt_ann, "GT"), (pred_ann, "prediction")):
        if "file_name" not in ann or "segments_info" not in ann:
            raise PanopticFormatError(f"image {image_id}: {side} annotation needs 'file_name' and 'segments_info'")
    gt_file = Path(gt_folder) / gt_ann["file_name"]
    pred_file = Path(pred_folder) / pred_ann["file_name"]
    gt_ids = read_id_png(gt_file, image_id, out=lambda shape: _scratch("gt_ids", shape, np.uint32))
    pred_ids = read_id_png(pred_file, image_id, out=lambda shape: _scratch("pred_ids", shape, np.uint32))
    acc.add(
        gt_ids,
        gt_ann["segments_info"],
        pred_ids,
        pred_ann["segments_info"],
        gt_area_from_segments=True,
        where=f"image {image_id} (GT {gt_file}, prediction {pred_file})",
    )


def _evaluate_chunk(args: tuple) -> PQAccumulator:
    pairs, gt_folder, pred_folder, categories = args
    acc = PQAccumulator(categories)
    for gt_ann, pred_ann in pairs:
        add_annotation_pair(acc, gt_ann, pred_ann, gt_folder, pred_folder)
    return acc


def evaluate_pairs(
    pairs: Sequence[tuple[Mapping, Mapping]],
    gt_folder: str | os.PathLike,
    pred_folder: str | os.PathLike,
    categories: Iterable[Mapping] | Mapping[Any, Mapping],
    workers: int | None = None,
) -> PQAccumulator:
    """Score (gt_ann, pred_ann) pairs from PNG folders on ``workers`` processes (default: all CPUs).

    Chunks are merged in order, so the result does not depend on scheduling.
    """
    cats = list(_normalise_categories(categories).values())
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    workers = max(1, min(workers, len(pairs)))
    if workers == 1:
        return _evaluate_chunk((list(pairs), gt_folder, pred_folder, cats))
    size = max(1, math.ceil(len(pairs) / (workers * 8)))
    tasks = [(list(pairs[i : i + size]), str(gt_folder), str(pred_folder), cats) for i in range(0, len(pairs), size)]
    try:  # imported once here, so forked workers inherit it instead of each importing it
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    acc = PQAccumulator(cats)
    with multiprocessing.get_context().Pool(workers) as pool:
        for part in pool.imap(_evaluate_chunk, tasks):
            acc += part
    return acc


def pq_compute(
    gt_json: str | os.PathLike | Mapping,
    pred_json: str | os.PathLike | Mapping,
    gt_folder: str | os.PathLike | None = None,
    pred_folder: str | os.PathLike | None = None,
    categories: Iterable[Mapping] | Mapping[Any, Mapping] | None = None,
    workers: int | None = None,
) -> dict:
    """PQ / SQ / RQ of COCO panoptic predictions, in panopticapi's result layout.

    gt_json / pred_json: paths or loaded dicts. Folders default to ``X`` for ``X.json`` (panopticapi).
    categories: defaults to ``gt_json["categories"]``. workers: process count (default os.cpu_count()).
    """
    gt = load_json(gt_json)
    pred = load_json(pred_json)
    gt_dir, pred_dir = default_folder(gt_json, gt_folder), default_folder(pred_json, pred_folder)
    for d, name in ((gt_dir, "ground truth"), (pred_dir, "predicted")):
        if not d.is_dir():
            raise PanopticFormatError(f"folder {d} with {name} segmentations doesn't exist")
    if categories is None:
        if "categories" not in gt:
            raise PanopticFormatError("the ground truth JSON has no 'categories'")
        categories = gt["categories"]
    pairs = match_annotations(gt, pred)
    return evaluate_pairs(pairs, gt_dir, pred_dir, categories, workers).result()


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI: prints panopticapi's table and the elapsed time."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gt_json_file", required=True, help="JSON file with ground truth data")
    p.add_argument("--pred_json_file", required=True, help="JSON file with predictions data")
    p.add_argument("--gt_folder", default=None, help="GT PNG folder (default: X for X.json)")
    p.add_argument("--pred_folder", default=None, help="predicted PNG folder (default: X for X.json)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: os.cpu_count())")
    args = p.parse_args(argv)
    start = time.time()
    print("Evaluation panoptic segmentation metrics:")
    print("Ground truth:")
    print(f"\tSegmentation folder: {default_folder(args.gt_json_file, args.gt_folder)}")
    print(f"\tJSON file: {args.gt_json_file}")
    print("Prediction:")
    print(f"\tSegmentation folder: {default_folder(args.pred_json_file, args.pred_folder)}")
    print(f"\tJSON file: {args.pred_json_file}")
    try:
        results = pq_compute(
            args.gt_json_file, args.pred_json_file, args.gt_folder, args.pred_folder, workers=args.workers
        )
    except PanopticFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(results))
    print(f"Time elapsed: {time.time() - start:0.2f} seconds")
    return results


if __name__ == "__main__":
    main()
