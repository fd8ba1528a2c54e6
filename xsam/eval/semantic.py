"""Semantic segmentation metrics from a confusion matrix, as a mergeable accumulator.

Follows detectron2's ``SemSegEvaluator`` (the convention X-SAM's evaluator inherits), with the
confusion matrix ``conf[pred, gt]`` accumulated by ``np.bincount``:

- pixels whose ground truth is ``ignore_index`` (255, void) are dropped, whatever was predicted;
- per-class IoU_c = TP_c / (GT_c + PRED_c - TP_c) and ACC_c = TP_c / GT_c;
- a class is VALID when it has ground-truth pixels in the split (GT_c > 0). mIoU and mACC average the
  valid classes only (NaN-skipping): a class absent from the ground truth is left out, also when it
  was predicted (its wrong pixels still cost the IoU of the classes they belong to, and pACC);
- fwIoU = sum over valid classes of (GT_c / sum GT) * IoU_c;  pACC = sum TP / sum GT.

All results are in percent; an accumulator with no valid pixel gives NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METRIC_NAMES = ("mIoU", "fwIoU", "mACC", "pACC")
PRIMARY_METRIC = "mIoU"


class SemanticAccumulator:
    """Confusion-matrix accumulator over ``num_classes`` classes (labels 0..num_classes-1)."""

    metric_names = METRIC_NAMES
    primary_metric = PRIMARY_METRIC

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class label")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        if class_names is not None and len(set(class_names)) != num_classes:
            raise ValueError("class names must be unique (they key the per-class results)")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = tuple(class_names) if class_names is not None else tuple(
            str(i) for i in range(num_classes))
        self.conf = np.zeros((num_classes, num_classes), dtype=np.int64)  # [pred, gt]

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``pred`` and ``gt`` are (H, W) integer label maps of the same shape."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
        if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gt.dtype, np.integer)):
            raise TypeError("semantic label maps must be integer arrays")
        pred, gt = pred.reshape(-1).astype(np.int64), gt.reshape(-1).astype(np.int64)
        keep = gt != self.ignore_index
        pred, gt = pred[keep], gt[keep]
        n = self.num_classes
        if gt.size and (gt.min() < 0 or gt.max() >= n):
            raise ValueError(f"ground-truth labels outside [0, {n}) other than ignore_index {self.ignore_index}")
        if pred.size and (pred.min() < 0 or pred.max() >= n):
            raise ValueError(f"predicted labels outside [0, {n})")
        self.conf += np.bincount(pred * n + gt, minlength=n * n).reshape(n, n)

    def __add__(self, other: SemanticAccumulator) -> SemanticAccumulator:
        if not isinstance(other, SemanticAccumulator):
            raise TypeError(f"cannot merge SemanticAccumulator with {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge SemanticAccumulators with different classes / ignore_index")
        out = SemanticAccumulator(self.num_classes, self.ignore_index, self.class_names)
        out.conf = self.conf + other.conf
        return out

    def __radd__(self, other: Any) -> SemanticAccumulator:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    def _per_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        conf = self.conf.astype(np.float64)
        tp = np.diag(conf)
        pos_gt = conf.sum(axis=0)
        pos_pred = conf.sum(axis=1)
        valid = pos_gt > 0
        iou = np.full(self.num_classes, np.nan)
        acc = np.full(self.num_classes, np.nan)
        union = pos_gt + pos_pred - tp
        iou[valid] = tp[valid] / union[valid]
        acc[valid] = tp[valid] / pos_gt[valid]
        return iou, acc, pos_gt, valid

    def result(self) -> dict[str, float]:
        """{"mIoU", "fwIoU", "mACC", "pACC"} in percent (NaN when no pixel was evaluated)."""
        iou, acc, pos_gt, valid = self._per_class()
        total = pos_gt.sum()
        if total == 0:
            return {k: float("nan") for k in METRIC_NAMES}
        weights = pos_gt / total
        return {
            "mIoU": float(np.mean(iou[valid])) * 100.0,
            "fwIoU": float(np.sum(iou[valid] * weights[valid])) * 100.0,
            "mACC": float(np.mean(acc[valid])) * 100.0,
            "pACC": float(np.trace(self.conf) / total) * 100.0,
        }

    def per_class_iou(self) -> dict[str, float]:
        """{class name: IoU in percent}; NaN for a class without ground-truth pixels."""
        iou, _, _, _ = self._per_class()
        return {name: float(v) * 100.0 for name, v in zip(self.class_names, iou)}

    def per_class_acc(self) -> dict[str, float]:
        """{class name: pixel accuracy in percent}; NaN for a class without ground-truth pixels."""
        _, acc, _, _ = self._per_class()
        return {name: float(v) * 100.0 for name, v in zip(self.class_names, acc)}
