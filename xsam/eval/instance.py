"""Instance segmentation AP (COCO ``segm``) as a mergeable accumulator, with the original X-SAM protocol.

Per image, `InstanceAccumulator.add` takes the ground-truth instances and the predicted instances;
`result()` builds in-memory COCO objects and runs pycocotools' ``COCOeval(iouType="segm")`` with its
default parameters (10 IoU thresholds 0.50:0.95, 101 recall points, maxDets 100 per image and
category, COCO area ranges). The numbers are the ones ``COCOeval.summarize()`` prints, in percent:

    AP    IoU 0.50:0.95, all areas          AP50  IoU 0.50          AP75  IoU 0.75
    APs   small  (area < 32^2)              APm   medium            APl   large (area > 96^2)

Ground truth, by default as the original evaluates COCO instances and VGD (genseg_dataset.py
`_load_ann_data` and vgdseg_dataset.py `_process_batch_data` skip ``iscrowd`` annotations and images
left without annotations; genseg / vgdseg evaluators build the COCO GT from what remains):

- ``crowd="drop"``: crowd ground truth is REMOVED (a prediction on a crowd region is a false
  positive). ``crowd="ignore"`` is pycocotools' convention instead (neither TP nor FP, not a
  positive to recall);
- ``images_without_gt="skip"``: an image with no (non-crowd) ground truth is not evaluated at all,
  its predictions are not counted (the original never runs it). ``"count"``: its predictions are
  false positives (pycocotools on a GT file that lists the image);
- the GT ``area`` (COCO's small / medium / large ranges) is the dict's ``area`` when given, else the
  mask's pixel count. `segment_ground_truth` gives a shard segment's source ``area`` (the annotation's
  own, as pycocotools reads it from the GT file: the polygon's area for polygons) when the source had
  one (`Segment.source_area`), else its mask's pixel count.

Other conventions (pycocotools'): a category with ground truth in the split but no prediction has
AP 0; a category without ground truth is left out of the mean; a metric COCO leaves undefined
(``-1``) is NaN here.

``class_agnostic=True`` maps every ground truth and prediction to one category (GCG AP50).
Merging two accumulators with ``+`` concatenates their images, so ``a + b`` gives the same numbers
as adding all images to one. `counts()` reports the images evaluated / skipped and the crowd
regions dropped.

Masks are COCO RLE dicts (``{"size": [h, w], "counts": str|bytes}``), `xsam.data.schema.RLE`
objects, or (H, W) bool / uint8 arrays (encoded here).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PRIMARY_METRIC = "AP"
_AGNOSTIC_CATEGORY = 1
Crowd = Literal["drop", "ignore"]
ImagesWithoutGT = Literal["skip", "count"]


def to_rle(mask: Any) -> dict:
    """A mask-like (RLE dict, schema RLE, or (H, W) array) -> pycocotools RLE with bytes counts."""
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise ValueError(f"a mask array must be (H, W), got shape {mask.shape}")
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
        return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}
    if hasattr(mask, "size") and hasattr(mask, "counts") and not isinstance(mask, Mapping):
        mask = {"size": mask.size, "counts": mask.counts}
    if not isinstance(mask, Mapping) or "size" not in mask or "counts" not in mask:
        raise TypeError(f"expected an RLE dict or a mask array, got {type(mask).__name__}")
    counts = mask["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    elif not isinstance(counts, bytes):
        raise TypeError("RLE counts must be the compressed string (str or bytes)")
    return {"size": [int(mask["size"][0]), int(mask["size"][1])], "counts": counts}


def _check_size(records: list[dict], size: tuple[int, int] | None) -> tuple[int, int] | None:
    for r in records:
        s = (r["segmentation"]["size"][0], r["segmentation"]["size"][1])
        if size is None:
            size = s
        elif s != size:
            raise ValueError(f"masks of one image have different sizes: {size} and {s}")
    return size


class InstanceAccumulator:
    """COCO segm AP over a split, accumulated image by image.

    categories: the split's category ids (ints); ignored with ``class_agnostic=True``.
    crowd / images_without_gt: the ground-truth protocol (module docstring); the defaults are the
    original X-SAM's (crowd dropped, images without ground truth skipped).
    """

    metric_names = METRIC_NAMES
    primary_metric = PRIMARY_METRIC

    def __init__(self, categories: Iterable[int] | None = None, class_agnostic: bool = False,
                 crowd: Crowd = "drop", images_without_gt: ImagesWithoutGT = "skip"):
        if crowd not in ("drop", "ignore"):
            raise ValueError(f"crowd must be 'drop' or 'ignore', got {crowd!r}")
        if images_without_gt not in ("skip", "count"):
            raise ValueError(f"images_without_gt must be 'skip' or 'count', got {images_without_gt!r}")
        self.class_agnostic = bool(class_agnostic)
        self.crowd = crowd
        self.images_without_gt = images_without_gt
        if self.class_agnostic:
            self.categories: tuple[int, ...] = (_AGNOSTIC_CATEGORY,)
        else:
            if categories is None:
                raise ValueError("categories are required unless class_agnostic=True")
            self.categories = tuple(sorted({int(c) for c in categories}))
            if not self.categories:
                raise ValueError("categories is empty")
        self._category_set = frozenset(self.categories)
        # one entry per evaluated image: (height, width) or None when the image has no mask, gts, preds
        self._images: list[tuple[tuple[int, int] | None, list[dict], list[dict]]] = []
        self.skipped_images = 0  # images without (non-crowd) ground truth, with images_without_gt="skip"
        self.dropped_crowd = 0  # crowd regions removed from the ground truth, with crowd="drop"

    def __len__(self) -> int:
        return len(self._images)

    def _category(self, item: Mapping) -> int:
        if self.class_agnostic:
            return _AGNOSTIC_CATEGORY
        cat = int(item["category_id"])
        if cat not in self._category_set:
            raise ValueError(f"category_id {cat} is not one of the accumulator's categories")
        return cat

    def add(self, gts: Sequence[Mapping], preds: Sequence[Mapping]) -> bool:
        """Add one image; returns False when the protocol skips it (no ground truth left).

        gts:   [{"mask": ..., "category_id": int, "iscrowd": 0|1 (default 0), "area": (default: mask area)}]
        preds: [{"mask": ..., "category_id": int, "score": float (default 1.0)}]
        ``category_id`` may be left out with ``class_agnostic=True``. Everything is validated (sizes,
        categories, scores) before the image is skipped or recorded.
        """
        gt_records, dropped_records = [], []
        for g in gts:
            rle = to_rle(g["mask"])
            area = g.get("area")
            record = {
                "segmentation": rle,
                "category_id": self._category(g),
                "iscrowd": int(bool(g.get("iscrowd", 0))),
                "area": float(mask_utils.area(rle) if area is None else area),
            }
            (dropped_records if record["iscrowd"] and self.crowd == "drop" else gt_records).append(record)
        dt_records = []
        for p in preds:
            rle = to_rle(p["mask"])
            score = float(p.get("score", 1.0))
            if not math.isfinite(score):
                raise ValueError(f"prediction score must be finite, got {score}")
            dt_records.append({
                "segmentation": rle,
                "category_id": self._category(p),
                "score": score,
                "area": float(mask_utils.area(rle)),
            })
        size = _check_size(dt_records, _check_size(gt_records, _check_size(dropped_records, None)))
        self.dropped_crowd += len(dropped_records)
        if not any(not g["iscrowd"] for g in gt_records) and self.images_without_gt == "skip":
            self.skipped_images += 1
            return False
        self._images.append((size, gt_records, dt_records))
        return True

    def counts(self) -> dict[str, int]:
        """{"images": evaluated, "skipped_images": without ground truth, "dropped_crowd": crowd regions}."""
        return {"images": len(self._images), "skipped_images": self.skipped_images,
                "dropped_crowd": self.dropped_crowd}

    def _check_compatible(self, other: InstanceAccumulator) -> None:
        if not isinstance(other, InstanceAccumulator):
            raise TypeError(f"cannot merge InstanceAccumulator with {type(other).__name__}")
        if (other.class_agnostic, other.categories, other.crowd, other.images_without_gt) != (
                self.class_agnostic, self.categories, self.crowd, self.images_without_gt):
            raise ValueError("cannot merge InstanceAccumulators with different categories / modes / protocols")

    def __add__(self, other: InstanceAccumulator) -> InstanceAccumulator:
        self._check_compatible(other)
        out = InstanceAccumulator(self.categories, self.class_agnostic, self.crowd, self.images_without_gt)
        out._images = self._images + other._images
        out.skipped_images = self.skipped_images + other.skipped_images
        out.dropped_crowd = self.dropped_crowd + other.dropped_crowd
        return out

    def __radd__(self, other: Any) -> InstanceAccumulator:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    def _coco_objects(self) -> tuple[COCO, COCO]:
        images, gt_anns, dt_anns = [], [], []
        for index, (size, gts, dts) in enumerate(self._images):
            image_id = index + 1
            h, w = size if size is not None else (1, 1)
            images.append({"id": image_id, "height": h, "width": w})
            for g in gts:
                gt_anns.append({**g, "id": len(gt_anns) + 1, "image_id": image_id,
                                "bbox": [float(v) for v in mask_utils.toBbox(g["segmentation"])]})
            for d in dts:  # ids start at 1: COCOeval uses 0 for "unmatched"
                dt_anns.append({**d, "id": len(dt_anns) + 1, "image_id": image_id, "iscrowd": 0,
                                "bbox": [float(v) for v in mask_utils.toBbox(d["segmentation"])]})
        categories = [{"id": c, "name": str(c)} for c in self.categories]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt, coco_dt = COCO(), COCO()
            coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
            coco_dt.dataset = {"images": images, "annotations": dt_anns, "categories": categories}
            coco_gt.createIndex()
            coco_dt.createIndex()
        return coco_gt, coco_dt

    def coco_eval(self) -> COCOeval:
        """Run COCOeval (evaluate + accumulate) on everything added; for callers wanting more stats."""
        if not self._images:
            raise ValueError("no images were added")
        coco_gt, coco_dt = self._coco_objects()
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
        return ev

    def result(self) -> dict[str, float]:
        """{"AP", "AP50", "AP75", "APs", "APm", "APl"} in percent; NaN where COCO gives -1."""
        if not self._images:
            return {k: float("nan") for k in METRIC_NAMES}
        ev = self.coco_eval()
        return summarize_segm(ev)


def _mean_precision(ev: COCOeval, iou_thr: float | None, area: str) -> float:
    p = ev.params
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    a = p.areaRngLbl.index(area)
    m = p.maxDets.index(max(p.maxDets))
    if iou_thr is not None:
        t = int(np.argmin(np.abs(p.iouThrs - iou_thr)))
        precision = precision[t:t + 1]
    s = precision[:, :, :, a, m]
    valid = s[s > -1]
    return float(np.mean(valid)) * 100.0 if valid.size else float("nan")


def summarize_segm(ev: COCOeval) -> dict[str, float]:
    """The six AP numbers of ``COCOeval.summarize()`` (in percent, NaN for -1), without printing."""
    return {
        "AP": _mean_precision(ev, None, "all"),
        "AP50": _mean_precision(ev, 0.5, "all"),
        "AP75": _mean_precision(ev, 0.75, "all"),
        "APs": _mean_precision(ev, None, "small"),
        "APm": _mean_precision(ev, None, "medium"),
        "APl": _mean_precision(ev, None, "large"),
    }


def segment_ground_truth(segment: Any) -> dict:
    """An `add` gt dict of a shard `Segment`; ``area`` is the source's own area where the source gave
    one (COCO's size ranges are defined on it), else the mask's pixel count."""
    area = segment.source_area if segment.source_area is not None else segment.area
    return {"mask": segment.mask.model_dump(), "category_id": segment.category_id, "iscrowd": segment.iscrowd,
            "area": area}


def vgd_ground_truth(sample: Any, prompt_type: Any) -> list[dict]:
    """The original's VGD ground truth of one sample for one prompt type (vgdseg_dataset.py
    `_load_ann_data`, eval branch): the non-crowd segments that carry a NON-EMPTY visual prompt of
    that type, as `add` gt dicts {"mask", "category_id", "iscrowd": 0, "area"}; the prompted
    categories are exactly theirs. `sample` is an `xsam.data.schema.Sample`; an empty list means the
    original does not evaluate the image for this type."""
    from xsam.data.schema import PromptType

    ptype = PromptType(prompt_type)
    prompted = {vp.segment_id for vp in sample.visual_prompts if vp.type is ptype and _rle_area(vp.mask) > 0}
    return [{**segment_ground_truth(s), "iscrowd": 0} for s in sample.segments if s.id in prompted and not s.iscrowd]


def _rle_area(rle: Any) -> int:
    return int(mask_utils.area(to_rle(rle)))
