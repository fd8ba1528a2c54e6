"""One benchmark = one evaluation split of a registered dataset, scored by its task's metrics.

`Benchmark.evaluate(model, tokenizer, sample, image_bytes, acc)` runs the model on one stored sample
(teacher-forced for the segmentation tasks, greedy decoding for GCG, through
xsam.model.predict.predict) and adds it to the accumulators; accumulators merge with `+`, so the
Ray evaluation job splits a benchmark over workers and sums. Every prompt choice (which referring
sentence, which VGD prompt instance) comes from a generator seeded by (seed, sample key), so the
numbers do not depend on the worker layout or on the run.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from xsam.data import masks as rle
from xsam.data.schema import PromptType, Sample, Task
from xsam.eval.instance import InstanceAccumulator
from xsam.eval.interactive import InteractiveAccumulator
from xsam.eval.panoptic import PQAccumulator
from xsam.eval.referring import ReferringAccumulator
from xsam.eval.semantic import SemanticAccumulator
from xsam.model.predict import Prediction, overlay, predict
from xsam.train.formatting import decode_image

# the metric a benchmark is selected on (reference section 3, "metric" column)
PRIMARY = {Task.generic_seg: "pq", Task.semantic_seg: "miou", Task.instance_seg: "ap", Task.referring_seg: "ciou",
           Task.gres: "ciou", Task.reasoning_seg: "giou", Task.gcg: "miou", Task.vgd: "ap",
           Task.interactive: "miou"}


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)])


def _union(sample: Sample, ids: list[int]) -> np.ndarray:
    h, w = sample.image.height, sample.image.width
    out = np.zeros((h, w), bool)
    by_id = {s.id: s for s in sample.segments}
    for i in ids:
        out |= rle.decode(by_id[i].mask).astype(bool)
    return out


@dataclass
class Benchmark:
    dataset: str
    split: str
    task: Task
    categories: list[dict] | None  # the split's label space (manifest), None for GCG / chat
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.split}"

    @property
    def primary(self) -> str:
        return PRIMARY[self.task]

    # ---------------------------------------------------------------- accumulators
    def new(self) -> dict[str, Any]:
        cats = self.categories or []
        if self.task is Task.generic_seg:
            return {"pq": PQAccumulator(cats)}
        if self.task is Task.semantic_seg:
            return {"sem": SemanticAccumulator(len(cats), class_names=[c["name"] for c in cats])}
        if self.task is Task.instance_seg:
            return {"ap": InstanceAccumulator([c["id"] for c in cats])}
        if self.task is Task.vgd:
            return {t.value: InstanceAccumulator([c["id"] for c in cats]) for t in PromptType}
        if self.task is Task.interactive:
            return {"int": InteractiveAccumulator()}
        if self.task is Task.gcg:
            import shutil
            import warnings

            from xsam.eval.gcg import GCGAccumulator

            java = shutil.which("java") is not None  # METEOR and the PTB tokenizer run on Java
            if not java:
                warnings.warn(f"{self.name}: no java on PATH: METEOR / CIDEr skipped, mask metrics only")
            return {"gcg": GCGAccumulator(caption_metrics=java)}
        return {"ref": ReferringAccumulator()}

    def result(self, acc: dict[str, Any]) -> dict[str, float]:
        """Flat metrics, in percent, named by ONE rule: lowercase, groups joined by "/" ("pq", "things/pq",
        "miou", "ap50", "point/ap", ...); the primary metric (`primary`) is always one of the keys."""
        if self.task is Task.vgd:
            out = {}
            for t, a in acc.items():
                if len(a):
                    out.update({f"{t}/{k}": v for k, v in a.result().items()})
            aps = [v for k, v in out.items() if k.lower().endswith("/ap")]
            out["ap"] = float(np.nanmean(aps)) if aps else float("nan")
        elif self.task is Task.generic_seg:
            r = next(iter(acc.values())).result()
            out = {f"{prefix}{m}": 100.0 * r[group][m] for group, prefix in (("All", ""), ("Things", "things/"),
                                                                            ("Stuff", "stuff/"))
                   for m in ("pq", "sq", "rq") if r[group]["n"]}
        else:
            out = {k: v for k, v in next(iter(acc.values())).result().items() if isinstance(v, (int, float))}
        out = {k.lower(): float(v) for k, v in out.items()}
        out.setdefault(self.primary, float("nan"))  # nothing scored: the primary is there, NaN
        return out

    # ---------------------------------------------------------------- one sample
    def evaluate(self, model, tokenizer, sample: Sample, image_bytes: bytes, acc: dict[str, Any]) -> bytes | None:
        """Score one sample; returns an overlay PNG of (one of) its predictions."""
        image = decode_image(image_bytes, sample)
        # the model's own sampling (visual-prompt points) is seeded per sample too: same numbers every run
        torch.manual_seed(int(_rng(self.seed, "torch:" + sample.provenance.source_id).integers(2**31)))
        pred = _EVALUATORS[self.task](self, model, tokenizer, sample, image, acc)
        if pred is None or not len(pred.masks):
            return None
        buf = io.BytesIO()
        overlay(image, pred).save(buf, format="PNG")
        return buf.getvalue()

    def _names(self) -> list[str]:
        return [c["name"] for c in self.categories]


def _generic(b: Benchmark, model, tok, sample: Sample, image, acc) -> Prediction:
    names, cats = b._names(), b.categories
    if b.task is Task.semantic_seg:
        pred = predict(model, tok, image, "semantic", names)
        index = {n: i for i, n in enumerate(names)}
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        pmap = np.full(image.shape[:2], 255, np.int64)
        for m, label in zip(pred.masks, pred.labels):
            pmap[m] = index[label]
        gmap = np.full(image.shape[:2], 255, np.int64)
        for s in sample.segments:
            gmap[rle.decode(s.mask).astype(bool)] = cat_index[s.category_id]
        acc["sem"].add(pmap, gmap)
        return pred
    if b.task is Task.instance_seg:
        pred = predict(model, tok, image, "instance", names)
        cat_of = {c["name"]: c["id"] for c in cats}
        acc["ap"].add([{"mask": s.mask.model_dump(), "category_id": s.category_id, "iscrowd": s.iscrowd}
                       for s in sample.segments],
                      [{"mask": m, "category_id": cat_of[label], "score": sc}
                       for m, label, sc in zip(pred.masks, pred.labels, pred.scores)])
        return pred
    pred = predict(model, tok, image, "panoptic", names, is_thing=[bool(c.get("isthing", 1)) for c in cats])
    cat_of = {c["name"]: c["id"] for c in cats}
    gt_ids = np.zeros(image.shape[:2], np.int64)
    for s in sample.segments:
        gt_ids[rle.decode(s.mask).astype(bool)] = s.id
    pred_ids = np.zeros(image.shape[:2], np.int64)
    pred_segments = []
    for k, (m, label) in enumerate(zip(pred.masks, pred.labels), start=1):
        if m.any():  # an empty predicted segment is not a segment (panopticapi refuses it)
            pred_ids[m] = k
            pred_segments.append({"id": k, "category_id": cat_of[label]})
    acc["pq"].add(gt_ids, [{"id": s.id, "category_id": s.category_id, "iscrowd": s.iscrowd} for s in sample.segments],
                  pred_ids, pred_segments)
    return pred


def _referring(b: Benchmark, model, tok, sample: Sample, image, acc) -> Prediction | None:
    rng = _rng(b.seed, sample.provenance.source_id)
    last = None
    task = "gres" if b.task is Task.gres else "referring"
    queries = [(r.sentences[int(rng.integers(len(r.sentences)))], r.segment_ids, task, True) for r in sample.referring]
    # ReasonSeg is evaluated with the reasoning template it was trained with (sentence or phrase questions)
    queries += [(q.queries[int(rng.integers(len(q.queries)))], q.segment_ids, "reasoning", q.is_sentence)
                for q in sample.reasoning]
    for text, ids, kind, is_sentence in queries:
        last = predict(model, tok, image, kind, text, is_sentence=is_sentence)
        acc["ref"].add(last.masks[0], _union(sample, ids))
    return last


def _gcg(b: Benchmark, model, tok, sample: Sample, image, acc) -> Prediction:
    pred = predict(model, tok, image, "gcg")
    gt_masks = [rle.decode(s.mask).astype(bool) for s in sample.segments]
    acc["gcg"].add(list(pred.masks), gt_masks, pred_caption=pred.text or "",
                   gt_captions=[sample.gcg.caption] if sample.gcg else [""])
    return pred


def _vgd(b: Benchmark, model, tok, sample: Sample, image, acc) -> Prediction | None:
    rng = _rng(b.seed, sample.provenance.source_id)
    by_id = {s.id: s for s in sample.segments}
    last = None
    for ptype in PromptType:
        prompts: dict[int, list] = {}  # category -> prompts of this type on its instances
        for vp in sample.visual_prompts:
            if vp.type is ptype and vp.segment_id in by_id:
                prompts.setdefault(by_id[vp.segment_id].category_id, []).append(vp)
        if not prompts:
            continue
        cats = sorted(prompts)
        chosen = [prompts[c][int(rng.integers(len(prompts[c])))] for c in cats]
        region_masks = np.stack([rle.decode(vp.mask).astype(bool) for vp in chosen])
        last = predict(model, tok, image, "vgd", prompt_masks=region_masks)
        gts = [{"mask": s.mask.model_dump(), "category_id": s.category_id, "iscrowd": s.iscrowd}
               for s in sample.segments if s.category_id in prompts or s.iscrowd]
        preds = [{"mask": m, "category_id": cats[int(label.split()[-1])], "score": sc}
                 for m, label, sc in zip(last.masks, last.labels, last.scores)]
        acc[ptype.value].add([g for g in gts if g["category_id"] in prompts], preds)
    return last


def _interactive(b: Benchmark, model, tok, sample: Sample, image, acc) -> Prediction | None:
    by_id = {s.id: s for s in sample.segments}
    last = None
    for vp in sample.visual_prompts:
        if vp.segment_id not in by_id:
            continue
        last = predict(model, tok, image, "interactive", prompt_masks=rle.decode(vp.mask).astype(bool)[None])
        acc["int"].add(last.masks[0], rle.decode(by_id[vp.segment_id].mask).astype(bool), vp.type)
    return last


_EVALUATORS: dict[Task, Callable] = {
    Task.generic_seg: _generic, Task.semantic_seg: _generic, Task.instance_seg: _generic,
    Task.referring_seg: _referring, Task.gres: _referring, Task.reasoning_seg: _referring,
    Task.gcg: _gcg, Task.vgd: _vgd, Task.interactive: _interactive,
}
