"""One benchmark = one evaluation split of a registered dataset, scored by its task's metrics.

A stored sample is scored in three steps that every execution path shares:

    queries = bench.queries(sample)          # the model requests of the sample (the protocol's samples)
    preds   = <the model answers each query> # one Prediction per query
    bench.score(sample, queries, preds, acc) # add them to the accumulators

`Benchmark.evaluate` is the ONE-QUERY-AT-A-TIME path (xsam.model.predict.predict per query: the
reference); `xsam.eval.engine.Engine` answers the same queries batched (encoders once per image).
Accumulators merge with `+`, so the Ray evaluation job splits a benchmark over workers and sums.

Protocol (the original X-SAM's evaluation, ../shared/design/fidelity-review.md):
- referring / gRefCOCO (E2): EVERY deduplicated lowercased sentence of every ref is one query
  (`sorted(set(s.lower()))` per ref, as the original's refseg dataset expands an eval split);
- ReasonSeg (E4): EVERY query of the sample, asked with the reasoning template (sentence or phrase
  questions); the sample's ignore mask is removed from the prediction AND the ground truth before the
  IoU is accumulated;
- VGD: per prompt type, one prompt per category drawn by a generator seeded by (seed, sample key);
  interactive: every visual prompt; generic: the split's label space (in chunks when long).
The model's own sampling (visual-prompt points) is seeded per sample (`torch_seed`): the same
numbers every run, whatever the worker layout or the batching.
Counts (`n_images`, `n_queries`, `n_prompts`) are reported beside the metrics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xsam.data import masks as rle
from xsam.data.schema import PromptType, Sample, Task
from xsam.eval import gcg as gcg_protocol
from xsam.eval.instance import InstanceAccumulator, segment_ground_truth, vgd_ground_truth
from xsam.eval.interactive import InteractiveAccumulator
from xsam.eval.panoptic import PQAccumulator
from xsam.eval.referring import ReferringAccumulator
from xsam.eval.semantic import SemanticAccumulator
from xsam.model.predict import Prediction, Request, predict
from xsam.train.formatting import decode_image

# the metric a benchmark is selected on (reference section 3, "metric" column)
PRIMARY = {Task.generic_seg: "pq", Task.semantic_seg: "miou", Task.instance_seg: "ap", Task.referring_seg: "ciou",
           Task.gres: "ciou", Task.reasoning_seg: "giou", Task.gcg: "miou", Task.vgd: "ap",
           Task.interactive: "miou"}


def metric_names(task: Task) -> frozenset[str]:
    """The metric names `Benchmark.result` can report for `task` (what a registry entry's `metrics` may
    list), built from the accumulators' own name lists; empty for a task with no benchmark (chat)."""
    from xsam.eval import instance, referring, semantic

    ap = {n.lower() for n in instance.METRIC_NAMES}
    names = {
        Task.generic_seg: {f"{g}{m}" for g in ("", "things/", "stuff/") for m in ("pq", "sq", "rq")},
        Task.semantic_seg: {n.lower() for n in semantic.METRIC_NAMES},
        Task.instance_seg: ap,
        Task.vgd: {"ap"} | {f"{t.value}/{m}" for t in PromptType for m in ap},
        Task.interactive: set(InteractiveAccumulator.metric_names),
        Task.gcg: {n.lower() for n in gcg_protocol.MASK_METRIC_NAMES + gcg_protocol.CAPTION_METRIC_NAMES},
    }.get(task)
    if names is None:
        names = set(referring.METRIC_NAMES) if task in PRIMARY else set()
    return frozenset(names)


GCG_MAX_NEW_TOKENS = gcg_protocol.GCG_MAX_NEW_TOKENS  # greedy GCG generation budget per sample (the paper's 512)
COUNTS = "counts"  # the accumulator key of the sample counts


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)])


def _union(sample: Sample, ids: list[int]) -> np.ndarray:
    h, w = sample.image.height, sample.image.width
    out = np.zeros((h, w), bool)
    by_id = {s.id: s for s in sample.segments}
    for i in ids:
        out |= rle.decode(by_id[i].mask).astype(bool)
    return out


def referring_sentences(sentences: list[str]) -> list[str]:
    """A ref's evaluation queries: its sentences lowercased, deduplicated, sorted (the original's order)."""
    return sorted({s.lower() for s in sentences})


@dataclass
class Query:
    """One model request of a sample and what scoring it needs: `target` is task-specific (the GT segment
    ids of a referring / reasoning query, (segment id, prompt type) of an interactive prompt, (prompt type,
    categories of the prompts) of a VGD query; None for generic / GCG)."""

    request: Request
    target: Any = None


@dataclass
class Counts:
    """What a benchmark scored: images, queries (sentences / reasoning queries / prompts asked) and
    visual prompts; merges with `+`."""

    images: int = 0
    queries: int = 0
    prompts: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.images + other.images, self.queries + other.queries, self.prompts + other.prompts)


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
        """The accumulators: the task's (first) and the sample counts (key COUNTS)."""
        return {**self._new_task(), COUNTS: Counts()}

    def _new_task(self) -> dict[str, Any]:
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
        "miou", "ap50", "point/ap", ...); the primary metric (`primary`) is always one of the keys; the
        counts as n_images, n_queries, n_prompts."""
        task_acc = {k: v for k, v in acc.items() if k != COUNTS}
        if self.task is Task.vgd:
            out = {}
            for t, a in task_acc.items():
                if len(a):
                    out.update({f"{t}/{k}": v for k, v in a.result().items()})
            aps = [v for k, v in out.items() if k.lower().endswith("/ap")]
            out["ap"] = float(np.nanmean(aps)) if aps else float("nan")
        elif self.task is Task.generic_seg:
            r = next(iter(task_acc.values())).result()
            out = {f"{prefix}{m}": 100.0 * r[group][m] for group, prefix in (("All", ""), ("Things", "things/"),
                                                                            ("Stuff", "stuff/"))
                   for m in ("pq", "sq", "rq") if r[group]["n"]}
        else:
            out = {k: v for k, v in next(iter(task_acc.values())).result().items() if isinstance(v, (int, float))}
        out = {k.lower(): float(v) for k, v in out.items()}
        out.setdefault(self.primary, float("nan"))  # nothing scored: the primary is there, NaN
        counts = acc.get(COUNTS, Counts())
        out.update({"n_images": float(counts.images), "n_queries": float(counts.queries)})
        if self.task in (Task.vgd, Task.interactive):
            out["n_prompts"] = float(counts.prompts)
        return out

    # ---------------------------------------------------------------- the protocol, per sample
    def torch_seed(self, sample: Sample) -> int:
        """The seed of the model's own sampling (visual-prompt points) for this sample."""
        return int(_rng(self.seed, "torch:" + sample.provenance.source_id).integers(2**31))

    def queries(self, sample: Sample) -> list[Query]:
        """The model requests one sample gives (the protocol's evaluation samples of this image)."""
        return _QUERIES[self.task](self, sample)

    def score(self, sample: Sample, queries: list[Query], preds: list[Prediction], acc: dict[str, Any]) -> None:
        """Add one sample's predictions (one per query, in order) to the accumulators."""
        if len(preds) != len(queries):
            raise ValueError(f"{len(preds)} predictions for {len(queries)} queries")
        _SCORERS[self.task](self, sample, queries, preds, acc)
        acc[COUNTS] += Counts(1, len(queries), sum(len(q.request.prompt_masks) for q in queries
                                                   if q.request.prompt_masks is not None))

    # ---------------------------------------------------------------- one query at a time
    def evaluate(self, model, tokenizer, sample: Sample, image_bytes: bytes, acc: dict[str, Any]) -> bytes | None:
        """Score one sample, one `predict` per query (the reference path); returns its overlay PNG
        (`overlay_png`)."""
        image = decode_image(image_bytes, sample)
        torch.manual_seed(self.torch_seed(sample))
        queries = self.queries(sample)
        preds = [predict(model, tokenizer, image, q.request.task, q.request.prompt, q.request.prompt_masks,
                         q.request.is_thing, max_new_tokens=GCG_MAX_NEW_TOKENS, is_sentence=q.request.is_sentence)
                 for q in queries]
        self.score(sample, queries, preds, acc)
        return overlay_png(self, sample, image, queries, preds)

    def _names(self) -> list[str]:
        return [c["name"] for c in self.categories]


def overlay_png(bench: Benchmark, sample: Sample, image: np.ndarray, queries: list[Query],
                preds: list[Prediction]) -> bytes | None:
    """The sample's evaluation overlay (xsam.eval.overlay: ground truth and prediction side by side,
    labels, legend) as PNG bytes; None when the sample asks no query."""
    from xsam.eval.overlay import sample_overlay

    return sample_overlay(bench, sample, image, queries, preds)


# -------------------------------------------------------------------- queries per task
def _generic_queries(b: Benchmark, sample: Sample) -> list[Query]:
    task = {Task.semantic_seg: "semantic", Task.instance_seg: "instance"}.get(b.task, "panoptic")
    is_thing = [bool(c.get("isthing", 1)) for c in b.categories] if task == "panoptic" else None
    return [Query(Request(task, b._names(), is_thing=is_thing))]


def _referring_queries(b: Benchmark, sample: Sample) -> list[Query]:
    task = "gres" if b.task is Task.gres else "referring"
    out = [Query(Request(task, s), list(r.segment_ids)) for r in sample.referring
           for s in referring_sentences(r.sentences)]
    # ReasonSeg: every query, with the reasoning template it was trained with (sentence or phrase questions)
    out += [Query(Request("reasoning", text, is_sentence=q.is_sentence), list(q.segment_ids))
            for q in sample.reasoning for text in q.queries]
    return out


def _gcg_queries(b: Benchmark, sample: Sample) -> list[Query]:
    return [Query(Request("gcg"))]


def _vgd_queries(b: Benchmark, sample: Sample) -> list[Query]:
    """Per prompt type, the original's evaluation (instance.vgd_ground_truth): the non-crowd segments with a
    non-empty prompt of that type are the ground truth, their categories the regions (one prompt each, a
    seeded choice among the category's prompted instances); no such segment: the type is not evaluated."""
    rng = _rng(b.seed, sample.provenance.source_id)
    out = []
    for ptype in PromptType:
        gts = vgd_ground_truth(sample, ptype)
        if not gts:
            continue
        cats = sorted({g["category_id"] for g in gts})
        gt_ids = {s.id for s in sample.segments if not s.iscrowd}
        prompts: dict[int, list] = {}  # category -> non-empty prompts of this type on its instances
        cat_of = {s.id: s.category_id for s in sample.segments}
        for vp in sample.visual_prompts:
            if vp.type is ptype and vp.segment_id in gt_ids and cat_of[vp.segment_id] in cats:
                m = rle.decode(vp.mask).astype(bool)
                if m.any():
                    prompts.setdefault(cat_of[vp.segment_id], []).append(m)
        region_masks = np.stack([prompts[c][int(rng.integers(len(prompts[c])))] for c in cats])
        out.append(Query(Request("vgd", prompt_masks=region_masks), (ptype, cats)))
    return out


def _interactive_queries(b: Benchmark, sample: Sample) -> list[Query]:
    by_id = {s.id: s for s in sample.segments}
    return [Query(Request("interactive", prompt_masks=rle.decode(vp.mask).astype(bool)[None]),
                  (vp.segment_id, vp.type)) for vp in sample.visual_prompts if vp.segment_id in by_id]


# -------------------------------------------------------------------- scoring per task
def _score_generic(b: Benchmark, sample: Sample, queries: list[Query], preds: list[Prediction], acc) -> None:
    (pred,) = preds
    names, cats = b._names(), b.categories
    shape = (sample.image.height, sample.image.width)
    if b.task is Task.semantic_seg:
        index = {n: i for i, n in enumerate(names)}
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        pmap = np.full(shape, 255, np.int64)
        for m, label in zip(pred.masks, pred.labels):
            pmap[m] = index[label]
        gmap = np.full(shape, 255, np.int64)
        for s in sample.segments:
            gmap[rle.decode(s.mask).astype(bool)] = cat_index[s.category_id]
        acc["sem"].add(pmap, gmap)
        return
    cat_of = {c["name"]: c["id"] for c in cats}
    if b.task is Task.instance_seg:
        acc["ap"].add([segment_ground_truth(s) for s in sample.segments],
                      [{"mask": m, "category_id": cat_of[label], "score": sc}
                       for m, label, sc in zip(pred.masks, pred.labels, pred.scores)])
        return
    gt_ids = np.zeros(shape, np.int64)
    for s in sample.segments:
        gt_ids[rle.decode(s.mask).astype(bool)] = s.id
    pred_ids = np.zeros(shape, np.int64)
    pred_segments = []
    for k, (m, label) in enumerate(zip(pred.masks, pred.labels), start=1):
        if m.any():  # an empty predicted segment is not a segment (panopticapi refuses it)
            pred_ids[m] = k
            pred_segments.append({"id": k, "category_id": cat_of[label]})
    acc["pq"].add(gt_ids, [{"id": s.id, "category_id": s.category_id, "iscrowd": s.iscrowd} for s in sample.segments],
                  pred_ids, pred_segments)


def _score_referring(b: Benchmark, sample: Sample, queries: list[Query], preds: list[Prediction], acc) -> None:
    keep = None  # ReasonSeg: ignore pixels are removed from prediction and ground truth (E4)
    if sample.ignore_mask is not None:
        keep = ~rle.decode(sample.ignore_mask).astype(bool)
    for q, pred in zip(queries, preds):
        p, g = pred.masks[0], _union(sample, q.target)
        if keep is not None:
            p, g = p & keep, g & keep
        acc["ref"].add(p, g)


def _score_gcg(b: Benchmark, sample: Sample, queries: list[Query], preds: list[Prediction], acc) -> None:
    (pred,) = preds
    if pred.skipped is not None:  # the paper's protocol: an answer without exactly one <SEG> / any phrase
        acc["gcg"].skip(pred.skipped)
        return
    gt_masks = [rle.decode(s.mask).astype(bool) for s in sample.segments]
    acc["gcg"].add(list(pred.masks), gt_masks, pred_caption=pred.text or "",
                   gt_captions=[sample.gcg.caption] if sample.gcg else [""])


def _score_vgd(b: Benchmark, sample: Sample, queries: list[Query], preds: list[Prediction], acc) -> None:
    for q, pred in zip(queries, preds):
        ptype, cats = q.target
        gts = vgd_ground_truth(sample, ptype)
        out = [{"mask": m, "category_id": cats[int(label.split()[-1])], "score": sc}
               for m, label, sc in zip(pred.masks, pred.labels, pred.scores)]
        acc[ptype.value].add(gts, out)


def _score_interactive(b: Benchmark, sample: Sample, queries: list[Query], preds: list[Prediction], acc) -> None:
    by_id = {s.id: s for s in sample.segments}
    for q, pred in zip(queries, preds):
        segment_id, ptype = q.target
        acc["int"].add(pred.masks[0], rle.decode(by_id[segment_id].mask).astype(bool), ptype)


_QUERIES: dict[Task, Callable] = {
    Task.generic_seg: _generic_queries, Task.semantic_seg: _generic_queries, Task.instance_seg: _generic_queries,
    Task.referring_seg: _referring_queries, Task.gres: _referring_queries, Task.reasoning_seg: _referring_queries,
    Task.gcg: _gcg_queries, Task.vgd: _vgd_queries, Task.interactive: _interactive_queries,
}
_SCORERS: dict[Task, Callable] = {
    Task.generic_seg: _score_generic, Task.semantic_seg: _score_generic, Task.instance_seg: _score_generic,
    Task.referring_seg: _score_referring, Task.gres: _score_referring, Task.reasoning_seg: _score_referring,
    Task.gcg: _score_gcg, Task.vgd: _score_vgd, Task.interactive: _score_interactive,
}
