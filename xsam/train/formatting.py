"""Per-read formatting: one stored `Sample` (+ its image bytes) -> training `Example`s.

Everything the reference draws at random per read (the referring record, the prompt templates, the
ReasonSeg explanation branch, the VGD prompt type, the S1 jitter) is drawn HERE from the numpy Generator
the caller passes, in a fixed order, so one (sample, generator state) always gives the same examples and
another seed / epoch gives other ones. What the reference draws once per record at LOAD time (the generic
category list and its order, the referring objects' order, the VGD category list with its negatives)
comes from `Formatter.record_rng`, a function of (seed, sample, record). Nothing else is random: no `random`, no torch RNG.

Rules per task (stage gating: s1 = generic / semantic / instance only, s2 = chat only, s3 = all):

- chat (mode none): one of `sample.conversations` at random; turns paired (human, gpt), leading gpt
  turns dropped, consecutive turns of one role joined with "\\n", a trailing human turn dropped.
  ``<image>`` / ``<region>`` are removed from every turn and the first user turn becomes
  ``"<image>\\n" + text`` (X-SAM's normalisation of LLaVA's ``<image>`` position).
- generic_seg / semantic_seg / instance_seg in S3 (mode per_sample): positives = the categories of the
  non-crowd segments. The category list is the original's (AAAI26_Archive genseg_dataset.py `_sample_cats`,
  use_full_cat + use_variant_cat, num_class = 10000): with probability 1/2 EVERY category of the label
  space; otherwise positives + randint(0, num_class - #pos) (inclusive, capped by the pool) other
  categories, i.e. almost always every category too (~99% of prompts list all classes); the list is
  shuffled. The original draws the list once per record at load time, so it is drawn from
  `record_rng(sample)` (a function of seed and sample: the same list in every epoch); the template
  choice stays per read. Names go through `templates.clean_category_name`. Targets: ONE MASK PER
  NON-CROWD SEGMENT (instance level, stuff and things, as X-SAM's GenericSegDataset and Mask2Former's
  panoptic training do; PQ / AP need instances), label = the prompt index of its category.
  ``generic_targets="category"`` switches to one union mask per present category. Crowd: crowd segments
  give no target; a category present ONLY as crowd is, as X-SAM does, always listed with the positives for
  generic_seg (panoptic: crowd segments take part in its category draw) and an ordinary negative candidate
  for semantic_seg / instance_seg (crowd annotations dropped before the draw). Negatives whose cleaned name
  equals a listed category's are left out (no contradictory duplicates).
- referring_seg / gres (mode per_phrase), as the original's RefSegDataset expands them
  (`xsam.data.expansion`): each ReferringExpression with at least one segment and one non-empty sentence
  is one object (gres: union of its segments; no-target expressions are dropped, as the reference drops
  them), its sentences lowercased, deduplicated and sorted. An image is min(prod, sum) of its objects'
  sentence counts RECORDS (the balancer sees them: `Schedule(repeats=index.expansions())`); a read draws
  one record k, whose sentence per object is the k-th combination of `itertools.product`. The record holds
  EVERY object of the image as one multi-turn conversation (no chunking), objects in an order drawn once
  per record (`record_rng(sample, k)`); turn j = referring_question(sentence_j) / referring_answer, both
  templates drawn per read.
- reasoning_seg (mode per_phrase), as the original's ReaSegDataset: ONE record per image; every query of
  every ReasoningQuery with segments is a turn, in the stored order, all targeting that query's union mask.
  Per turn: sentence queries ask REASONING_QUESTIONS, phrase queries REASONING_SHORT_QUESTIONS, answered
  from REFERRING_ANSWERS; when an explanation exists, with probability explain_prob (0.5) the turn asks
  REASONING_EXPLAIN_QUESTIONS and answers ``"{explanation} " + REASONING_EXPLAIN_ANSWERS[i]``.
- gcg (mode per_sample): the caption is lowercased (as X-SAM; offsets kept); phrases sorted by start
  (stable); a phrase whose stored start is not AFTER the previous kept phrase's stored end
  (start <= prev_end, X-SAM's `_remove_overlapping_intervals`: touching spans are dropped too) is
  dropped, as are empty spans and phrases without segments; span whitespace is trimmed (``parse_gcg``
  trims it too). gcg_question + gcg_answer; mask k = union of phrase k's segments.
- vgd (mode per_sample), as X-SAM's VGDSegDataset + `_get_vprompt_feats_and_masks` (the rule with the
  original's file / line for each fact: `xsam.train.format_regions`). A usable instance = a non-crowd
  segment with a stored prompt whose mask decodes non-empty. ONE REGION PER CATEGORY of a list drawn once
  per record (`record_rng`, as the original draws it at load time): the usable instances' categories,
  plus, with probability 1/2, randint(0, 5) inclusive NEGATIVES (other label-space categories, capped by
  that pool), all shuffled. Per read: each usable instance gets one prompt of a random stored type (empty
  masks skipped); targets = every usable instance, its own mask, labelled with its category's region
  (instance-level: the VGD metric is instance AP); a NEGATIVE region has NO target (the model must match
  nothing to it); one uniform per region is drawn for the batch step. Per batch
  (`format_regions.assign_region_sources`, in the training collate): region r's prompt is an unused
  instance of its category from ANY image of the rank's batch (own image included); a category no image
  of the batch has takes an instance of another category absent from the image (not yet taken by its
  earlier regions); no candidate at all: a zero region token (``batching.NO_PROMPT``). A cross-image
  prompt stays in its source image's frame and ``XSAMBatch.region_sources`` names that image. Alone, an
  item is assigned as a batch of one (own-image prompts; negatives get no prompt). Prompt masks are used
  as stored (points / scribbles are already rasterised).
- interactive (mode per_sample): one region per segment that has a stored prompt (crowd included: the
  source decided which annotations carry prompts), in random order, each with a random prompt type;
  target r = that segment's mask, label r.
- S1 (any generic / semantic / instance sample, no text, mode per_sample): one mask per non-crowd
  segment, label = index of its category in the label space's category list (contiguous 0..K-1);
  the large-scale jitter's geometry is drawn here (`augment.draw_jitter`, one draw) and kept in
  `Formatted.crop`; masks emptied by the crop are KEPT (empty targets), as the reference does. The example keeps the
  ORIGINAL image and masks: the resize / crop / pad runs in the model's device transform
  (`S1Batch.prepared`; `augment.large_scale_jitter` is its CPU reference).

Common rules. Images are decoded with PIL from the stored bytes and converted to RGB; EXIF orientation
is NOT applied (annotations were made on the stored pixels); a size different from `sample.image` is
an error. Masks come from `xsam.data.masks.decode` (column-major; a target of one segment without
ignore pixels IS the decoded array, no copy: stacked, the masks are [N, H, W] with column-major
planes, shipped as they are). `Sample.ignore_mask` (ReasonSeg "ignore", ADE 255): the criterion has
no ignore support, so ignore pixels are BACKGROUND in every target mask (target &= ~ignore), which
is what X-SAM does for ReasonSeg. Source text placed inside a template
(sentences, queries, explanations, captions) has the markers ``<image> <region> <SEG> <p> </p>``
removed so it cannot break the prompt structure. A sample that yields no usable target (no positives,
no phrases, no prompts) yields an empty list: the caller skips it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from xsam.data import expansion
from xsam.data.schema import PromptType, Sample, Task
from xsam.model import templates as T
from xsam.model.batching import Example, bool_tensor
from xsam.model.preprocess import image_tensor
from xsam.model.xsam import DecodeMode, S1Batch
from xsam.train import format_regions
from xsam.train.augment import draw_jitter
from xsam.train.format_common import (
    MARKER_RE,
    PLACEHOLDER_RE,
    Formatted,
    Masks,
    clean_text,
    decode_image,
    first_turn,
    lower_same_length,
    pick,
    strip_markers_mapped,
)

__all__ = ["STAGES", "STAGE_TASKS", "Formatted", "Formatter", "clean_text", "collate_s1", "decode_image"]

STAGES = ("s1", "s2", "s3")
_RECORD_SALT = 0x5EC0D
_GENERIC_TASKS = frozenset({Task.generic_seg, Task.semantic_seg, Task.instance_seg})
STAGE_TASKS: dict[str, frozenset[Task]] = {
    "s1": _GENERIC_TASKS,
    "s2": frozenset({Task.chat}),
    "s3": frozenset(Task),
}

# --------------------------------------------------------------------------- the formatter
class Formatter:
    """Stored sample -> list of `Formatted` (one, or none when the sample has nothing to learn from)."""

    def __init__(self, stage: str, label_spaces: dict[str, list[dict]], num_class: int = 10_000,
                 full_list_prob: float = 0.5, explain_prob: float = 0.5,
                 s1_jitter: tuple[float, float] = (0.1, 2.0), sam_size: int = 1024, generic_targets: str = "segment",
                 prompt_types: tuple[str, ...] | None = None, seed: int = 0):
        """num_class / full_list_prob: the generic category-list rule (module docstring; the original's
        num_class=10000, use_full_cat + use_variant_cat). explain_prob: ReasonSeg's explanation branch, per
        turn. generic_targets: "segment" (one mask per non-crowd segment, default) or "category" (one union
        mask per present category). prompt_types: restrict VGD / interactive prompts to these types (e.g.
        ("point",) for a per-type evaluation); None = all four. seed: of the per-RECORD draws (`record_rng`)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        if generic_targets not in ("segment", "category"):
            raise ValueError(f"generic_targets must be 'segment' or 'category', not {generic_targets!r}")
        if num_class < 1 or not 0 <= full_list_prob <= 1 or not 0 <= explain_prob <= 1:
            raise ValueError("num_class must be >= 1, full_list_prob and explain_prob in [0, 1]")
        self.stage = stage
        self.label_spaces = label_spaces
        self.num_class = num_class
        self.full_list_prob = full_list_prob
        self.explain_prob = explain_prob
        self.s1_jitter = s1_jitter
        self.sam_size = sam_size
        self.generic_targets = generic_targets
        self.prompt_types = None if prompt_types is None else frozenset(PromptType(t) for t in prompt_types)
        self.seed = int(seed)
        self._handlers: dict[Task, Callable] = {
            Task.chat: self._chat,
            Task.generic_seg: self._generic, Task.semantic_seg: self._generic, Task.instance_seg: self._generic,
            Task.referring_seg: self._referring, Task.gres: self._referring,
            Task.reasoning_seg: self._reasoning,
            Task.gcg: self._gcg,
            Task.vgd: partial(format_regions.vgd, self),
            Task.interactive: partial(format_regions.interactive, self),
        }

    def __call__(self, sample: Sample, image_bytes: bytes, rng: np.random.Generator) -> list[Formatted]:
        if sample.task not in STAGE_TASKS[self.stage]:
            raise ValueError(f"{sample.dataset}: task {sample.task.value} is not trained in stage {self.stage}")
        image = decode_image(image_bytes, sample)
        if self.stage == "s1":
            return self._s1(sample, image, rng)
        return self._handlers[sample.task](sample, image, rng)

    def _out(self, sample: Sample, example: Example, mode: DecodeMode, **kw) -> Formatted:
        return Formatted(example=example, mode=mode, dataset=sample.dataset, task=sample.task, **kw)

    def categories(self, sample: Sample) -> list[dict]:
        if sample.label_space is None or sample.label_space not in self.label_spaces:
            raise ValueError(f"{sample.dataset}: label space {sample.label_space!r} is not among "
                             f"{sorted(self.label_spaces)}")
        return self.label_spaces[sample.label_space]

    def record_rng(self, sample: Sample, record: int = 0) -> np.random.Generator:
        """The generator of what the original draws ONCE per record at load time (the generic category
        list and its order, the referring objects' order, the VGD categories and negatives): a function
        of (seed, sample, record) only, so every read of a record in every epoch sees the same draw."""
        key = zlib.crc32(f"{sample.dataset}/{sample.provenance.source_id}".encode())
        return np.random.default_rng([self.seed, key, record, _RECORD_SALT])

    # -- chat ---------------------------------------------------------------------------------------
    def _chat(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        convs = [c for c in sample.conversations if c.turns]
        if not convs:
            return []
        conv = convs[pick(rng, len(convs))]
        merged: list[list[str]] = []  # [role, text]
        for turn in conv.turns:
            text = PLACEHOLDER_RE.sub("", turn.value).strip()
            if not merged and turn.role == "gpt":
                continue
            if merged and merged[-1][0] == turn.role:
                merged[-1][1] = f"{merged[-1][1]}\n{text}"
            else:
                merged.append([turn.role, text])
        turns = [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged) - 1, 2)]
        if not turns:
            return []
        return [self._out(sample, Example(image=image, turns=first_turn(turns)), DecodeMode.none)]

    # -- generic / semantic / instance ---------------------------------------------------------------
    def _generic(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        cats = self.categories(sample)
        index = {c["id"]: i for i, c in enumerate(cats)}
        segs = [s for s in sample.segments if not s.iscrowd]
        for s in sample.segments:
            if s.category_id not in index:
                raise ValueError(f"{sample.dataset}/{sample.provenance.source_id}: category {s.category_id} "
                                 f"is not in label space {sample.label_space}")
        positives = sorted({index[s.category_id] for s in segs})  # label-space order
        if not positives:
            return []
        crowd_only = sorted({index[s.category_id] for s in sample.segments if s.iscrowd} - set(positives))
        # X-SAM: panoptic passes crowd segments to the category draw (crowd-only categories are listed
        # like positives, without a target); instance / semantic drop crowd annotations first (crowd-only
        # categories are ordinary negative candidates)
        listed = positives + crowd_only if sample.task is Task.generic_seg else positives
        pos_names = {T.clean_category_name(cats[i]["name"]) for i in listed}
        pool = [i for i in range(len(cats)) if i not in listed
                and T.clean_category_name(cats[i]["name"]) not in pos_names]
        prompt = self._category_list(listed, pool, self.record_rng(sample))
        names = [T.clean_category_name(cats[i]["name"]) for i in prompt]
        question = T.generic_question(names, pick(rng, len(T.GENERIC_QUESTIONS)), clean=False)
        answer = T.seg_answer(pick(rng, len(T.SEG_ANSWERS)))

        mk = Masks(sample, image.shape[:2])
        slot = {cat: k for k, cat in enumerate(prompt)}
        if self.generic_targets == "segment":
            targets = [mk.target([s.id]) for s in segs]
            labels = [slot[index[s.category_id]] for s in segs]
        else:
            targets = [mk.target([s.id for s in segs if index[s.category_id] == cat]) for cat in positives]
            labels = [slot[cat] for cat in positives]
        ex = Example(image=image, turns=first_turn([(question, answer)]), masks=mk.stack(targets), labels=labels)
        return [self._out(sample, ex, DecodeMode.per_sample)]

    def _category_list(self, listed: list[int], pool: list[int], rng: np.random.Generator) -> list[int]:
        """The listed categories plus negatives from `pool`, shuffled (the original's use_full_cat +
        use_variant_cat rule): with probability full_list_prob every category; otherwise
        randint(0, num_class - #listed) negatives (inclusive), capped by the pool."""
        if rng.random() < self.full_list_prob:
            chosen = listed + pool
        else:
            n_neg = int(rng.integers(0, max(0, self.num_class - len(listed)) + 1))
            chosen = listed + [pool[j] for j in rng.choice(len(pool), size=min(n_neg, len(pool)), replace=False)]
        return [chosen[j] for j in rng.permutation(len(chosen))]

    # -- referring / gres -----------------------------------------------------------------------------
    def _referring(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        objects = expansion.referring_objects(sample)
        sizes = [len(sentences) for sentences, _ in objects]
        n = expansion.count(sizes)
        if not n:
            return []
        k = pick(rng, n)  # which of the image's records this read is
        choice = expansion.combination(sizes, k)
        mk = Masks(sample, image.shape[:2])
        turns, targets = [], []
        for j in self.record_rng(sample, k).permutation(len(objects)):
            sentences, sids = objects[j]
            question = T.referring_question(sentences[choice[j]], pick(rng, len(T.REFERRING_QUESTIONS)))
            turns.append((question, T.referring_answer(pick(rng, len(T.REFERRING_ANSWERS)))))
            targets.append(mk.target(sids))
        ex = Example(image=image, turns=first_turn(turns), masks=mk.stack(targets), labels=list(range(len(turns))))
        return [self._out(sample, ex, DecodeMode.per_phrase)]

    # -- reasoning --------------------------------------------------------------------------------------
    def _reasoning(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        mk = Masks(sample, image.shape[:2])
        turns, targets = [], []
        for rq in sample.reasoning:
            if not rq.segment_ids:
                continue
            explanation = clean_text(rq.explanation) if rq.explanation is not None else ""
            for query in (c for c in (clean_text(q) for q in rq.queries) if c):
                qs = T.REASONING_QUESTIONS if rq.is_sentence else T.REASONING_SHORT_QUESTIONS
                question = T.reasoning_question(query, pick(rng, len(qs)), rq.is_sentence)
                answer = T.reasoning_answer(pick(rng, len(T.REFERRING_ANSWERS)))
                if explanation and rng.random() < self.explain_prob:
                    question = T.reasoning_question(query, pick(rng, len(T.REASONING_EXPLAIN_QUESTIONS)),
                                                    explain=True)
                    answer = T.reasoning_answer(pick(rng, len(T.REASONING_EXPLAIN_ANSWERS)), explanation)
                turns.append((question, answer))
                targets.append(mk.target(rq.segment_ids))
        if not turns:
            return []
        ex = Example(image=image, turns=first_turn(turns), masks=mk.stack(targets), labels=list(range(len(turns))))
        return [self._out(sample, ex, DecodeMode.per_phrase)]

    # -- GCG --------------------------------------------------------------------------------------------
    def _gcg(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        if sample.gcg is None:
            return []
        caption = sample.gcg.caption
        spans = [(p.start, p.end, p.segment_ids) for p in sample.gcg.phrases]
        if MARKER_RE.search(caption):
            caption, mapping = strip_markers_mapped(caption)
            spans = [(mapping[min(s, len(mapping) - 1)], mapping[min(e, len(mapping) - 1)], sids) for s, e, sids in spans]
        caption = lower_same_length(caption)  # after the markers are gone ("<SEG>" is case-sensitive)
        kept, prev_end = [], None
        for start, end, sids in sorted(spans, key=lambda x: x[0]):  # stable: ties keep the stored order
            end = min(end, len(caption))
            s0, e0 = start, end  # the overlap rule compares the spans as stored, as X-SAM does
            while start < end and caption[start].isspace():
                start += 1
            while end > start and caption[end - 1].isspace():
                end -= 1
            if start >= end or not sids or (prev_end is not None and s0 <= prev_end):
                continue
            kept.append((start, end, sids))
            prev_end = e0
        if not kept:
            return []
        question = T.gcg_question(pick(rng, len(T.GCG_QUESTIONS)))
        answer = T.gcg_answer(caption, [(s, e) for s, e, _ in kept], pick(rng, len(T.GCG_ANSWER_SUFFIXES)))
        mk = Masks(sample, image.shape[:2])
        ex = Example(image=image, turns=first_turn([(question, answer)]),
                     masks=mk.stack([mk.target(sids) for _, _, sids in kept]), labels=list(range(len(kept))))
        return [self._out(sample, ex, DecodeMode.per_sample)]

    # -- S1 ------------------------------------------------------------------------------------------------
    def _s1(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        cats = self.categories(sample)
        index = {c["id"]: i for i, c in enumerate(cats)}
        segs = [s for s in sample.segments if not s.iscrowd]
        for s in segs:
            if s.category_id not in index:
                raise ValueError(f"{sample.dataset}/{sample.provenance.source_id}: category {s.category_id} "
                                 f"is not in label space {sample.label_space}")
        mk = Masks(sample, image.shape[:2])
        _, crop = draw_jitter(*image.shape[:2], rng, self.sam_size, self.s1_jitter)
        # every segment stays a target, also one the crop empties (the reference keeps them:
        # base_dataset.py crops mask_labels with the image and filters nothing, so the matched query
        # learns an empty mask for its class)
        masks = mk.stack([mk.target([s.id]) for s in segs])
        labels = [index[s.category_id] for s in segs]
        ex = Example(image=image, turns=[], masks=masks, labels=labels)
        return [self._out(sample, ex, DecodeMode.per_sample, crop=crop)]


# --------------------------------------------------------------------------- S1 collation
def collate_s1(formatted: list[Formatted]) -> S1Batch:
    """S1 batch (no tokenizer) -> a RAW S1Batch: images B x [3, H, W] uint8, targets {labels [N] long,
    masks [N, H, W] bool} at the original size, the jitter geometry per image (`Formatted.crop`; None:
    the plain SAM view). The model resizes / crops / pads on its device (`XSAM.prepare`); the CPU
    fallback is `collate_s1(...).prepared(I)`."""
    images, targets, crops = [], [], []
    for f in formatted:
        ex = f.example
        labels = torch.tensor(list(ex.labels or []), dtype=torch.long)
        masks = ex.masks if ex.masks is not None else np.zeros((0, *ex.image.shape[:2]), bool)
        if len(labels) != len(masks):
            raise ValueError(f"{f.dataset}: {len(labels)} labels for {len(masks)} masks")
        if masks.shape[1:] != ex.image.shape[:2]:
            raise ValueError(f"{f.dataset}: masks {masks.shape[1:]} do not match the image {ex.image.shape[:2]}")
        images.append(image_tensor(ex.image))
        targets.append({"labels": labels, "masks": bool_tensor(masks, f"{f.dataset} masks")})
        crops.append(f.crop)
    return S1Batch(images=images, targets=targets, crops=crops)
