"""Per-category tables of a scored benchmark: one row per category of the split's label space, named.

    rows = per_category(bench, acc)   # [{"category": "person", "id": 1, "pq": 41.2, ...}, ...] or []

By the accumulator (type dispatch):
- PQAccumulator (panoptic): pq / sq / rq in percent, isthing, and the matched / unmatched counts
  (tp, fp, fn); a category never seen in ground truth or prediction has null pq / sq / rq;
- SemanticAccumulator (semantic): iou and acc in percent; null for a class without ground-truth pixels;
- InstanceAccumulator (instance, and VGD per prompt type - the "prompt_type" column): COCO segm ap and
  ap50 of the category in percent (area "all", most detections), null where COCO has no ground truth.
Tasks without a label space (referring, reasoning, GCG, interactive) give no rows.
Every value is a JSON value: NaN becomes None (null), so the table is valid JSON.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from xsam.data.schema import Task
from xsam.eval.instance import InstanceAccumulator
from xsam.eval.panoptic import PQAccumulator
from xsam.eval.semantic import SemanticAccumulator


def _num(x: Any) -> float | None:
    x = float(x)
    return None if not math.isfinite(x) else round(x, 4)


def _panoptic(acc: PQAccumulator, names: dict[int, str]) -> list[dict]:
    counts = acc.per_category()
    per_class = acc.result()["per_class"]
    rows = []
    for cid, c in counts.items():
        cid = int(cid)
        seen = c["tp"] + c["fp"] + c["fn"] > 0
        m = per_class.get(cid, {})
        rows.append({"category": names.get(cid, str(cid)), "id": cid,
                     "isthing": bool(acc.categories[cid]["isthing"] == 1),
                     **{k: _num(100.0 * m[k]) if seen and k in m else None for k in ("pq", "sq", "rq")},
                     "tp": c["tp"], "fp": c["fp"], "fn": c["fn"]})
    return rows


def _semantic(acc: SemanticAccumulator) -> list[dict]:
    iou, pix = acc.per_class_iou(), acc.per_class_acc()
    return [{"category": name, "iou": _num(iou[name]), "acc": _num(pix[name])} for name in acc.class_names]


def _instance(acc: InstanceAccumulator, names: dict[int, str]) -> list[dict]:
    if not len(acc):
        return []
    ev = acc.coco_eval()
    p = ev.params
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    a, m = p.areaRngLbl.index("all"), p.maxDets.index(max(p.maxDets))
    t50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    rows = []
    for k, cid in enumerate(p.catIds):
        out = {}
        for key, s in (("ap", precision[:, :, k, a, m]), ("ap50", precision[t50, :, k, a, m])):
            valid = s[s > -1]
            out[key] = _num(100.0 * float(np.mean(valid))) if valid.size else None
        cid = int(cid)
        rows.append({"category": names.get(cid, str(cid)), "id": cid, **out})
    return rows


def per_category(bench, acc: dict[str, Any]) -> list[dict]:
    """The rows of `bench`'s per-category table from its accumulators (module docstring)."""
    names = {int(c["id"]): str(c["name"]) for c in (bench.categories or [])}
    rows: list[dict] = []
    for key, a in acc.items():
        if isinstance(a, PQAccumulator):
            rows += _panoptic(a, names)
        elif isinstance(a, SemanticAccumulator):
            rows += _semantic(a)
        elif isinstance(a, InstanceAccumulator) and not a.class_agnostic:
            part = _instance(a, names)
            if bench.task is Task.vgd:  # one accumulator per prompt type
                part = [{"prompt_type": key, **r} for r in part]
            rows += part
    return rows
