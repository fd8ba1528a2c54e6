"""Referring / reasoning segmentation metrics (cIoU, gIoU) as a mergeable accumulator.

One sample = one referring expression (or reasoning query) with its predicted and ground-truth
binary masks. Over a split:

- cIoU = sum of intersections / sum of unions (pixels pooled over all samples);
- gIoU = mean of the per-sample IoU, where a sample whose union is empty (nothing predicted, nothing
  to find) counts 1.0 -- the LISA convention, which also gives gRefCOCO's no-target rule (empty
  prediction on a no-target expression = 1, anything predicted = 0).
  When every sample has an empty union, cIoU is 100 by the same convention.

With ``target_acc=True`` the gRefCOCO extras are reported too: N-acc = share of no-target samples
(empty ground truth) predicted empty, T-acc = share of target samples predicted non-empty (NaN when
the split has no such sample). All numbers are in percent.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRIC_NAMES = ("ciou", "giou")
TARGET_ACC_NAMES = ("n_acc", "t_acc")
PRIMARY_METRIC = "ciou"


def as_bool_mask(mask: Any) -> np.ndarray:
    """(H, W) array-like -> bool array (non-zero = foreground)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {m.shape}")
    return m if m.dtype == bool else m != 0


class ReferringAccumulator:
    """cIoU / gIoU (and optionally N-acc / T-acc) over a split, sample by sample."""

    metric_names = METRIC_NAMES
    primary_metric = PRIMARY_METRIC

    def __init__(self, target_acc: bool = False):
        self.target_acc = bool(target_acc)
        self.intersection = 0  # python ints: exact whatever the merge order
        self.union = 0
        self.ious: list[float] = []  # per-sample IoU (empty union -> 1.0), in add order
        self.no_target = 0  # samples with an empty ground truth
        self.no_target_empty_pred = 0
        self.target_nonempty_pred = 0  # target samples with a non-empty prediction

    def __len__(self) -> int:
        return len(self.ious)

    def add(self, pred: Any, gt: Any) -> float:
        """Add one sample ((H, W) bool masks of equal shape); returns its IoU (0..1)."""
        pred, gt = as_bool_mask(pred), as_bool_mask(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
        inter = int(np.count_nonzero(pred & gt))
        union = int(np.count_nonzero(pred | gt))
        iou = inter / union if union > 0 else 1.0
        self.intersection += inter
        self.union += union
        self.ious.append(iou)
        pred_empty = not pred.any()
        if not gt.any():
            self.no_target += 1
            self.no_target_empty_pred += int(pred_empty)
        else:
            self.target_nonempty_pred += int(not pred_empty)
        return iou

    def __add__(self, other: ReferringAccumulator) -> ReferringAccumulator:
        if not isinstance(other, ReferringAccumulator):
            raise TypeError(f"cannot merge ReferringAccumulator with {type(other).__name__}")
        if other.target_acc != self.target_acc:
            raise ValueError("cannot merge ReferringAccumulators with different target_acc settings")
        out = ReferringAccumulator(self.target_acc)
        out.intersection = self.intersection + other.intersection
        out.union = self.union + other.union
        out.ious = self.ious + other.ious
        out.no_target = self.no_target + other.no_target
        out.no_target_empty_pred = self.no_target_empty_pred + other.no_target_empty_pred
        out.target_nonempty_pred = self.target_nonempty_pred + other.target_nonempty_pred
        return out

    def __radd__(self, other: Any) -> ReferringAccumulator:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    def result(self) -> dict[str, float]:
        """{"ciou", "giou"} (+ {"n_acc", "t_acc"} with target_acc) in percent; NaN when empty."""
        nan = float("nan")
        n = len(self.ious)
        out = {
            "ciou": (self.intersection / self.union * 100.0 if self.union else 100.0) if n else nan,
            "giou": math.fsum(self.ious) / n * 100.0 if n else nan,
        }
        if self.target_acc:
            n_target = n - self.no_target
            out["n_acc"] = self.no_target_empty_pred / self.no_target * 100.0 if self.no_target else nan
            out["t_acc"] = self.target_nonempty_pred / n_target * 100.0 if n_target else nan
        return out
