"""Per-read formatting: one stored `Sample` (+ its image bytes) -> training `Example`s.

Everything the reference draws at random per read (section 2: category negatives and order, the
referring sentence and the object chunks, the prompt templates, the ReasonSeg explanation branch, the
VGD prompt type, the S1 jitter) is drawn HERE from the numpy Generator the caller passes, in a fixed
order, so one (sample, generator state) always gives the same examples and another seed / epoch gives
other ones. Nothing else is random: no `random`, no torch RNG.

Rules per task (stage gating: s1 = generic / semantic / instance only, s2 = chat only, s3 = all):

- chat (mode none): one of `sample.conversations` at random; turns paired (human, gpt), leading gpt
  turns dropped, consecutive turns of one role joined with "\\n", a trailing human turn dropped.
  ``<image>`` / ``<region>`` are removed from every turn and the first user turn becomes
  ``"<image>\\n" + text`` (X-SAM's normalisation of LLaVA's ``<image>`` position).
- generic_seg / semantic_seg / instance_seg in S3 (mode per_sample): positives = the categories of the
  non-crowd segments; negatives = randint(0, max_negatives - #pos) (inclusive, capped by the pool) other
  categories of the label space; positives + negatives shuffled; names through
  `templates.clean_category_name`. Targets: ONE MASK PER NON-CROWD SEGMENT (instance level, stuff and
  things, as X-SAM's GenericSegDataset and Mask2Former's panoptic training do; PQ / AP need instances),
  label = the prompt index of its category. ``generic_targets="category"`` switches to one union mask per
  present category. Crowd: crowd segments give no target; a category present ONLY as crowd is, as
  X-SAM does, always listed with the positives for generic_seg (panoptic: crowd segments take part in
  its category draw) and an ordinary negative candidate for semantic_seg / instance_seg (crowd
  annotations dropped before the draw). Negatives whose cleaned name equals a listed category's are
  left out (no contradictory duplicates).
- referring_seg / gres (mode per_phrase): each ReferringExpression with at least one segment and one
  non-empty sentence is one object (gres: union of its segments; no-target expressions are dropped, as
  the reference drops them); objects shuffled; one sentence per object at random; chunks of
  <= max_objects objects, ONE Formatted PER CHUNK; turn k = referring_question(sentence_k) / seg_answer.
- reasoning_seg (mode per_phrase): one ReasoningQuery at random (ReasonSeg has one per image), one of its
  queries at random; with probability explain_prob when an explanation exists: the explain question and
  ``{explanation} And it is <SEG>.``; otherwise reasoning_question(query, idx, is_sentence) + seg_answer.
  Target = union of the segments.
- gcg (mode per_sample): the caption is lowercased (as X-SAM; offsets kept); phrases sorted by start
  (stable); a phrase whose stored start is not AFTER the previous kept phrase's stored end
  (start <= prev_end, X-SAM's `_remove_overlapping_intervals`: touching spans are dropped too) is
  dropped, as are empty spans and phrases without segments; span whitespace is trimmed (``parse_gcg``
  trims it too). gcg_question + gcg_answer; mask k = union of phrase k's segments.
- vgd (mode per_sample), as X-SAM's VGDSegDataset: ONE REGION PER CATEGORY present among the non-crowd
  segments that have a stored prompt, regions in random order; region r's prompt = a random prompted
  instance of that category with a random stored prompt TYPE (a type whose mask decodes empty is
  skipped, as X-SAM does); targets = EVERY non-crowd instance of region r's category, each as its own
  mask labelled r (instance-level targets: the VGD metric is instance AP). Prompt masks are used as
  stored (points / scribbles are already rasterised). Prompting from other images of the batch
  (``XSAMBatch.region_sources``) is the collator's business, not this module's.
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

import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from xsam.data import masks as mask_codec
from xsam.data.schema import PromptType, Sample, Segment, Task
from xsam.model import templates as T
from xsam.model.batching import Example, bool_tensor
from xsam.model.preprocess import ResizeCrop, image_tensor
from xsam.model.tokenizer import END_P_TOKEN, IMAGE_TOKEN, P_TOKEN, REGION_TOKEN, SEG_TOKEN
from xsam.model.xsam import DecodeMode, S1Batch
from xsam.train.augment import draw_jitter

STAGES = ("s1", "s2", "s3")
_GENERIC_TASKS = frozenset({Task.generic_seg, Task.semantic_seg, Task.instance_seg})
STAGE_TASKS: dict[str, frozenset[Task]] = {
    "s1": _GENERIC_TASKS,
    "s2": frozenset({Task.chat}),
    "s3": frozenset(Task),
}

_MARKER_RE = re.compile("|".join(re.escape(m) for m in (IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN, P_TOKEN,
                                                         END_P_TOKEN)))
_PLACEHOLDER_RE = re.compile("|".join(re.escape(m) for m in (IMAGE_TOKEN, REGION_TOKEN)))


@dataclass
class Formatted:
    example: Example
    mode: DecodeMode
    dataset: str
    task: Task
    crop: ResizeCrop | None = None  # S1 only: the drawn large-scale jitter of the image


# --------------------------------------------------------------------------- helpers
def decode_image(data: bytes, sample: Sample | None = None) -> np.ndarray:
    """Stored bytes -> [H, W, 3] uint8 RGB, no EXIF transpose; checks the size against the record."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im.convert("RGB"))  # writable (torch.from_numpy downstream)
    if sample is not None and arr.shape[:2] != (sample.image.height, sample.image.width):
        raise ValueError(f"{sample.dataset}/{sample.provenance.source_id}: image is {arr.shape[1]}x{arr.shape[0]}"
                         f" but the record says {sample.image.width}x{sample.image.height}")
    return arr


def clean_text(text: str) -> str:
    """Source text for a template: markers removed, outer whitespace stripped."""
    return _MARKER_RE.sub("", text).strip()


def _strip_markers_mapped(text: str) -> tuple[str, list[int]]:
    """Remove markers; -> (new text, old offset -> new offset for offsets 0..len(text))."""
    keep = np.ones(len(text), bool)
    for m in _MARKER_RE.finditer(text):
        keep[m.start():m.end()] = False
    mapping = np.concatenate([[0], np.cumsum(keep)]).tolist()
    return "".join(c for c, k in zip(text, keep) if k), mapping


def _lower_same_length(text: str) -> str:
    """Lowercase (X-SAM lowercases GCG captions) keeping every offset: a character whose lowercase
    form has another length (e.g. "\u0130") is kept as it is."""
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


def _pick(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(n))


class _Masks:
    """Lazy decode of a sample's segment masks (bool [H, W]) by segment id."""

    def __init__(self, sample: Sample, shape: tuple[int, int]):
        self.sample = sample
        self.shape = shape
        self.segments: dict[int, Segment] = {s.id: s for s in sample.segments}
        self._cache: dict[int, np.ndarray] = {}
        self.ignore = self.decode(sample.ignore_mask) if sample.ignore_mask is not None else None

    def decode(self, rle) -> np.ndarray:
        m = mask_codec.decode(rle).view(bool)  # {0, 1} uint8, column-major: a view, no copy
        if m.shape != self.shape:
            raise ValueError(f"{self.sample.dataset}/{self.sample.provenance.source_id}: mask of size {m.shape} "
                             f"on an image of size {self.shape}")
        return m

    def segment(self, sid: int) -> np.ndarray:
        if sid not in self._cache:
            if sid not in self.segments:
                raise ValueError(f"{self.sample.dataset}/{self.sample.provenance.source_id}: "
                                 f"segment id {sid} is not in the sample")
            self._cache[sid] = self.decode(self.segments[sid].mask)
        return self._cache[sid]

    def target(self, sids) -> np.ndarray:
        """Union of segments, ignore pixels turned to background (column-major, read-only use)."""
        if len(sids) == 1 and self.ignore is None:
            return self.segment(sids[0])
        out = np.zeros(self.shape, bool, order="F")
        for sid in sids:
            out |= self.segment(sid)
        if self.ignore is not None:
            out &= ~self.ignore
        return out

    def stack(self, targets: list[np.ndarray]) -> np.ndarray:
        return np.stack(targets) if targets else np.zeros((0, *self.shape), bool)


def _first_turn(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Put the image placeholder in front of the first user turn."""
    if turns:
        turns[0] = (T.with_image(turns[0][0]), turns[0][1])
    return turns


# --------------------------------------------------------------------------- the formatter
class Formatter:
    """Stored sample -> list of `Formatted` (usually one; referring chunks may give several)."""

    def __init__(self, stage: str, label_spaces: dict[str, list[dict]], max_negatives: int = 128,
                 max_objects: int = 8, explain_prob: float = 0.5, s1_jitter: tuple[float, float] = (0.1, 2.0),
                 sam_size: int = 1024, generic_targets: str = "segment",
                 prompt_types: tuple[str, ...] | None = None):
        """generic_targets: "segment" (one mask per non-crowd segment, default) or "category" (one union
        mask per present category). prompt_types: restrict VGD / interactive prompts to these types
        (e.g. ("point",) for a per-type evaluation); None = all four."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        if generic_targets not in ("segment", "category"):
            raise ValueError(f"generic_targets must be 'segment' or 'category', not {generic_targets!r}")
        if max_objects < 1 or max_negatives < 0:
            raise ValueError("max_objects must be >= 1 and max_negatives >= 0")
        self.stage = stage
        self.label_spaces = label_spaces
        self.max_negatives = max_negatives
        self.max_objects = max_objects
        self.explain_prob = explain_prob
        self.s1_jitter = s1_jitter
        self.sam_size = sam_size
        self.generic_targets = generic_targets
        self.prompt_types = None if prompt_types is None else frozenset(PromptType(t) for t in prompt_types)
        self._handlers: dict[Task, Callable] = {
            Task.chat: self._chat,
            Task.generic_seg: self._generic, Task.semantic_seg: self._generic, Task.instance_seg: self._generic,
            Task.referring_seg: self._referring, Task.gres: self._referring,
            Task.reasoning_seg: self._reasoning,
            Task.gcg: self._gcg,
            Task.vgd: self._vgd,
            Task.interactive: self._interactive,
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

    # -- chat ---------------------------------------------------------------------------------------
    def _chat(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        convs = [c for c in sample.conversations if c.turns]
        if not convs:
            return []
        conv = convs[_pick(rng, len(convs))]
        merged: list[list[str]] = []  # [role, text]
        for turn in conv.turns:
            text = _PLACEHOLDER_RE.sub("", turn.value).strip()
            if not merged and turn.role == "gpt":
                continue
            if merged and merged[-1][0] == turn.role:
                merged[-1][1] = f"{merged[-1][1]}\n{text}"
            else:
                merged.append([turn.role, text])
        turns = [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged) - 1, 2)]
        if not turns:
            return []
        return [self._out(sample, Example(image=image, turns=_first_turn(turns)), DecodeMode.none)]

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
        n_neg = int(rng.integers(0, max(0, self.max_negatives - len(listed)) + 1))
        negatives = [pool[j] for j in rng.choice(len(pool), size=min(n_neg, len(pool)), replace=False)]
        prompt = [(listed + negatives)[j] for j in rng.permutation(len(listed) + len(negatives))]
        names = [T.clean_category_name(cats[i]["name"]) for i in prompt]
        question = T.generic_question(names, _pick(rng, len(T.GENERIC_QUESTIONS)), clean=False)
        answer = T.seg_answer(_pick(rng, len(T.SEG_ANSWERS)))

        mk = _Masks(sample, image.shape[:2])
        slot = {cat: k for k, cat in enumerate(prompt)}
        if self.generic_targets == "segment":
            targets = [mk.target([s.id]) for s in segs]
            labels = [slot[index[s.category_id]] for s in segs]
        else:
            targets = [mk.target([s.id for s in segs if index[s.category_id] == cat]) for cat in positives]
            labels = [slot[cat] for cat in positives]
        ex = Example(image=image, turns=_first_turn([(question, answer)]), masks=mk.stack(targets), labels=labels)
        return [self._out(sample, ex, DecodeMode.per_sample)]

    # -- referring / gres -----------------------------------------------------------------------------
    def _referring(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        objects = []
        for ref in sample.referring:
            sentences = [c for c in (clean_text(s) for s in ref.sentences) if c]
            if ref.segment_ids and sentences:
                objects.append((sentences, ref.segment_ids))
        if not objects:
            return []
        mk = _Masks(sample, image.shape[:2])
        drawn = []
        for j in rng.permutation(len(objects)):
            sentences, sids = objects[j]
            sentence = sentences[_pick(rng, len(sentences))]
            question = T.referring_question(sentence, _pick(rng, len(T.REFERRING_QUESTIONS)))
            answer = T.seg_answer(_pick(rng, len(T.SEG_ANSWERS)))
            drawn.append(((question, answer), sids))
        out = []
        for start in range(0, len(drawn), self.max_objects):
            chunk = drawn[start:start + self.max_objects]
            ex = Example(image=image, turns=_first_turn([t for t, _ in chunk]),
                         masks=mk.stack([mk.target(sids) for _, sids in chunk]), labels=list(range(len(chunk))))
            out.append(self._out(sample, ex, DecodeMode.per_phrase))
        return out

    # -- reasoning --------------------------------------------------------------------------------------
    def _reasoning(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        candidates = []
        for rq in sample.reasoning:
            queries = [c for c in (clean_text(q) for q in rq.queries) if c]
            if rq.segment_ids and queries:
                candidates.append((rq, queries))
        if not candidates:
            return []
        rq, queries = candidates[_pick(rng, len(candidates))]
        query = queries[_pick(rng, len(queries))]
        explanation = clean_text(rq.explanation) if rq.explanation is not None else ""
        explain = bool(rng.random() < self.explain_prob) and bool(explanation)
        if explain:
            question = T.reasoning_question(query, _pick(rng, len(T.REASONING_EXPLAIN_QUESTIONS)), rq.is_sentence,
                                            explain=True)
            answer = T.reasoning_answer(0, explanation)
        else:
            qs = T.REASONING_QUESTIONS if rq.is_sentence else T.REFERRING_QUESTIONS
            question = T.reasoning_question(query, _pick(rng, len(qs)), rq.is_sentence)
            answer = T.seg_answer(_pick(rng, len(T.SEG_ANSWERS)))
        mk = _Masks(sample, image.shape[:2])
        ex = Example(image=image, turns=_first_turn([(question, answer)]), masks=mk.stack([mk.target(rq.segment_ids)]),
                     labels=[0])
        return [self._out(sample, ex, DecodeMode.per_phrase)]

    # -- GCG --------------------------------------------------------------------------------------------
    def _gcg(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        if sample.gcg is None:
            return []
        caption = sample.gcg.caption
        spans = [(p.start, p.end, p.segment_ids) for p in sample.gcg.phrases]
        if _MARKER_RE.search(caption):
            caption, mapping = _strip_markers_mapped(caption)
            spans = [(mapping[min(s, len(mapping) - 1)], mapping[min(e, len(mapping) - 1)], sids) for s, e, sids in spans]
        caption = _lower_same_length(caption)  # after the markers are gone ("<SEG>" is case-sensitive)
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
        question = T.gcg_question(_pick(rng, len(T.GCG_QUESTIONS)))
        answer = T.gcg_answer(caption, [(s, e) for s, e, _ in kept], _pick(rng, len(T.GCG_ANSWER_SUFFIXES)))
        mk = _Masks(sample, image.shape[:2])
        ex = Example(image=image, turns=_first_turn([(question, answer)]),
                     masks=mk.stack([mk.target(sids) for _, _, sids in kept]), labels=list(range(len(kept))))
        return [self._out(sample, ex, DecodeMode.per_sample)]

    # -- VGD / interactive --------------------------------------------------------------------------------
    def _prompts_by_segment(self, sample: Sample) -> dict[int, list]:
        out: dict[int, list] = {}
        for vp in sample.visual_prompts:
            if self.prompt_types is None or vp.type in self.prompt_types:
                out.setdefault(vp.segment_id, []).append(vp)
        return out

    def _draw_prompt(self, mk: _Masks, instances: list[int], prompts: dict[int, list],
                     rng: np.random.Generator) -> np.ndarray | None:
        """A random instance of `instances`, then a random stored type of it; empty prompt masks skipped."""
        for i in rng.permutation(len(instances)):
            options = prompts[instances[i]]
            for j in rng.permutation(len(options)):
                m = mk.decode(options[j].mask)
                if m.any():
                    return m
        return None

    def _region_example(self, sample: Sample, image: np.ndarray, mk: _Masks, regions: list[np.ndarray],
                        targets: list[np.ndarray], labels: list[int], rng: np.random.Generator) -> list[Formatted]:
        if not regions:
            return []
        question = T.vgd_question(len(regions), _pick(rng, len(T.VGD_QUESTIONS)))
        answer = T.seg_answer(_pick(rng, len(T.SEG_ANSWERS)))
        ex = Example(image=image, turns=_first_turn([(question, answer)]), masks=mk.stack(targets), labels=labels,
                     region_masks=np.stack(regions))
        return [self._out(sample, ex, DecodeMode.per_sample)]

    def _vgd(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        prompts = self._prompts_by_segment(sample)
        segs = [s for s in sample.segments if not s.iscrowd and s.category_id is not None]
        cats: list[int] = []
        for s in segs:
            if s.id in prompts and s.category_id not in cats:
                cats.append(s.category_id)
        mk = _Masks(sample, image.shape[:2])
        regions, targets, labels = [], [], []
        for j in rng.permutation(len(cats)):
            cat = cats[j]
            prompt = self._draw_prompt(mk, [s.id for s in segs if s.category_id == cat and s.id in prompts],
                                       prompts, rng)
            if prompt is None:
                continue
            r = len(regions)
            regions.append(prompt)
            for s in segs:
                if s.category_id == cat:
                    targets.append(mk.target([s.id]))
                    labels.append(r)
        return self._region_example(sample, image, mk, regions, targets, labels, rng)

    def _interactive(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        prompts = self._prompts_by_segment(sample)
        segs = [s for s in sample.segments if s.id in prompts]
        mk = _Masks(sample, image.shape[:2])
        regions, targets, labels = [], [], []
        for j in rng.permutation(len(segs)):
            prompt = self._draw_prompt(mk, [segs[j].id], prompts, rng)
            if prompt is None:
                continue
            labels.append(len(regions))
            regions.append(prompt)
            targets.append(mk.target([segs[j].id]))
        return self._region_example(sample, image, mk, regions, targets, labels, rng)

    # -- S1 ------------------------------------------------------------------------------------------------
    def _s1(self, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
        cats = self.categories(sample)
        index = {c["id"]: i for i, c in enumerate(cats)}
        segs = [s for s in sample.segments if not s.iscrowd]
        for s in segs:
            if s.category_id not in index:
                raise ValueError(f"{sample.dataset}/{sample.provenance.source_id}: category {s.category_id} "
                                 f"is not in label space {sample.label_space}")
        mk = _Masks(sample, image.shape[:2])
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
