"""VGD and interactive formatting: stored visual prompts -> region prompts and their targets.

Functions take the `Formatter` (`fmt`) for its settings (`prompt_types`), `categories` and `record_rng`.
Line numbers below are the original's (wanghao9610/X-SAM, tag AAAI26_Archive): D = xsam/xsam/dataset/
vgdseg_dataset.py, M = xsam/xsam/model/xsam.py, C = the S3 config xsam/xsam/configs/xsam/s3_mixed_finetune/
xsam_*_mixed_finetune.py.

VGD, in three steps.

1. Per RECORD (`fmt.record_rng(sample)`: the original draws the category list once, at load time,
   D:292-294 calling `_sample_cats` D:228-250). A USABLE instance is a non-crowd segment (crowd
   annotations are dropped when the data is built, D:147) with at least one stored prompt whose mask
   decodes non-empty. Positives = the categories of the usable instances, sorted (D:234). With
   probability 1/2 (D:237; use_negative_sample=True, C:534) n = randint(0, 5) inclusive
   (D:239: max(num_class, num_class - #pool) = num_class = 5, C:535) NEGATIVES are drawn without
   replacement from the label space's other categories (sorted, D:238; at most the pool, D:230), and
   positives + negatives are shuffled together (D:241); otherwise the positives are shuffled (D:243).
   Region r = the r-th category of that list: one ``<p><region></p>`` per category.
2. Per READ (the caller's generator). Every usable instance gets ONE prompt: a random stored type among
   those whose mask is non-empty (D:324-330, per annotation); an instance without one is neither a target
   nor a prompt (D:331-336), and with `prompt_types` set only those types count. Targets = every usable
   instance, its own mask, labelled with its category's region index (D:248, D:351-354): a NEGATIVE
   region has NO target in this image (the model must match nothing to it). One uniform u_r in [0, 1) is
   drawn per region: the only randomness of step 3, so the batch step is a pure function of the
   formatted items (the loader's per-sample generators, `np.random.default_rng([seed, epoch, position])`,
   make every read, and so every batch, reproducible on resume).
3. Per BATCH (`assign_region_sources`, the collate path; the original does it in the model,
   `_get_vprompt_feats_and_masks` M:364-432, on the prompt features of every instance of the rank's
   batch, each sampled from its OWN image, M:499). For image b, regions in order, region r of category c:
   pos = the usable instances of c in ANY image of the batch (b's own included) that b has not used yet
   (M:396-401); neg = the instances, in any image, whose category is absent from b's usable instances and
   is none of the categories b's earlier regions took, not used yet (M:402-407); candidates = pos if pos
   else neg (M:409); the pick is candidates[floor(u_r * len)] (uniform, M:412), and its position and
   category become used (M:420-421). No candidate: the region token is a zero vector (M:422-426;
   `batching.NO_PROMPT`). So a positive region may take its prompt from another image that has the
   category; a negative region takes an instance of its category from another image, or, when no image
   of the batch has it, an instance of ANOTHER category absent from b ("a category absent from the batch
   takes another category's instance"); either way its prompt has no target in b. The region's prompt
   mask stays in its source image's frame and `XSAMBatch.region_sources` says which image (the model
   frames the mask with that image's geometry and samples that image's token map).
   A formatted item alone is assigned as a batch of one (own-image prompts; negatives get NO_PROMPT), so
   it can be collated as it is; the training collator (`StageRecipe.collate`) re-assigns over the batch.

Interactive: one region per segment with a stored prompt, own-image prompts, no negatives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from xsam.data.schema import Sample
from xsam.model import templates as T
from xsam.model.batching import NO_PROMPT, Example
from xsam.model.xsam import DecodeMode
from xsam.train.format_common import Formatted, Masks, first_turn, pick

VGD_NEGATIVE_PROB = 0.5  # D:237
VGD_MAX_NEGATIVES = 5  # num_class = 5 (C:535), randint(0, num_class) (D:239)

CategoryKey = tuple[str | None, int]  # (label space, category id): comparable across a batch


@dataclass
class VgdDraw:
    """What the batch step needs from one VGD example (R regions, K usable instances).

    categories: [R] region r's category, in prompt order (positives and negatives).
    uniforms: [R] u_r in [0, 1), region r's pick among its candidates.
    instances: [K] (category, prompt mask [H, W] bool) of every usable instance, in segment order.
    size: (H, W) of the example's image.
    """

    categories: list[CategoryKey]
    uniforms: list[float]
    instances: list[tuple[CategoryKey, np.ndarray]]
    size: tuple[int, int]


@dataclass
class RegionFormatted(Formatted):
    """A VGD item: `vgd` holds the draw that `assign_region_sources` resolves over a batch."""

    vgd: VgdDraw | None = None


def _prompts_by_segment(fmt, sample: Sample) -> dict[int, list]:
    out: dict[int, list] = {}
    for vp in sample.visual_prompts:
        if fmt.prompt_types is None or vp.type in fmt.prompt_types:
            out.setdefault(vp.segment_id, []).append(vp)
    return out


def _draw_prompt(mk: Masks, instances: list[int], prompts: dict[int, list],
                 rng: np.random.Generator) -> np.ndarray | None:
    """A random instance of `instances`, then a random stored type of it; empty prompt masks skipped."""
    for i in rng.permutation(len(instances)):
        options = prompts[instances[i]]
        for j in rng.permutation(len(options)):
            m = mk.decode(options[j].mask)
            if m.any():
                return m
    return None


def _region_example(fmt, sample: Sample, image: np.ndarray, mk: Masks, regions: list[np.ndarray],
                    targets: list[np.ndarray], labels: list[int], rng: np.random.Generator) -> list[Formatted]:
    if not regions:
        return []
    question = T.vgd_question(len(regions), pick(rng, len(T.VGD_QUESTIONS)))
    answer = T.seg_answer(pick(rng, len(T.SEG_ANSWERS)))
    ex = Example(image=image, turns=first_turn([(question, answer)]), masks=mk.stack(targets), labels=labels,
                 region_masks=np.stack(regions))
    return [fmt._out(sample, ex, DecodeMode.per_sample)]


# --------------------------------------------------------------------------- VGD: steps 1 and 2
def vgd_categories(fmt, sample: Sample, positives: list[int]) -> list[int]:
    """Step 1: the record's region categories (positives sorted by id), drawn from `fmt.record_rng`."""
    taken = set(positives)
    pool = sorted(c["id"] for c in fmt.categories(sample) if c["id"] not in taken)  # D:238
    r = fmt.record_rng(sample)
    listed = list(positives)
    if r.random() < VGD_NEGATIVE_PROB:
        n = int(r.integers(0, VGD_MAX_NEGATIVES + 1))
        listed += [pool[j] for j in r.choice(len(pool), size=min(n, len(pool)), replace=False)]
    return [listed[j] for j in r.permutation(len(listed))]


def vgd(fmt, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
    prompts = _prompts_by_segment(fmt, sample)
    mk = Masks(sample, image.shape[:2])
    usable = []  # (segment, its prompt for this read)
    for s in sample.segments:
        if s.iscrowd or s.category_id is None or s.id not in prompts:
            continue
        prompt = _draw_prompt(mk, [s.id], prompts, rng)
        if prompt is not None:
            usable.append((s, prompt))
    if not usable:
        return []
    cats = vgd_categories(fmt, sample, sorted({s.category_id for s, _ in usable}))
    slot = {c: r for r, c in enumerate(cats)}
    space = sample.label_space
    draw = VgdDraw(categories=[(space, c) for c in cats], uniforms=rng.random(len(cats)).tolist(),
                   instances=[((space, s.category_id), p) for s, p in usable], size=image.shape[:2])
    question = T.vgd_question(len(cats), pick(rng, len(T.VGD_QUESTIONS)))
    answer = T.seg_answer(pick(rng, len(T.SEG_ANSWERS)))
    ex = Example(image=image, turns=first_turn([(question, answer)]),
                 masks=mk.stack([mk.target([s.id]) for s, _ in usable]),
                 labels=[slot[s.category_id] for s, _ in usable])
    item = RegionFormatted(example=ex, mode=DecodeMode.per_sample, dataset=sample.dataset, task=sample.task,
                           vgd=draw)
    return assign_region_sources([item])


# --------------------------------------------------------------------------- VGD: step 3
def pick_sources(draws: list[VgdDraw | None]) -> list[list[tuple[int, int] | None] | None]:
    """The batch rule (module docstring, step 3): draws[b] is image b's draw (None: not a VGD item)
    -> per VGD image, per region, (source image j, instance k of draws[j]) or None (no candidate)."""
    pool = [(j, k, cat) for j, d in enumerate(draws) if d is not None
            for k, (cat, _) in enumerate(d.instances)]
    out: list[list[tuple[int, int] | None] | None] = []
    for d in draws:
        if d is None:
            out.append(None)
            continue
        own = {cat for cat, _ in d.instances}
        used: set[tuple[int, int]] = set()
        used_cats: set[CategoryKey] = set()
        picks: list[tuple[int, int] | None] = []
        for c, u in zip(d.categories, d.uniforms, strict=True):
            cands = [(j, k, cat) for j, k, cat in pool if cat == c and (j, k) not in used]
            if not cands:
                cands = [(j, k, cat) for j, k, cat in pool
                         if cat not in used_cats and (j, k) not in used and cat not in own]
            if not cands:
                picks.append(None)
                continue
            j, k, cat = cands[min(int(u * len(cands)), len(cands) - 1)]
            used.add((j, k))
            used_cats.add(cat)
            picks.append((j, k))
        out.append(picks)
    return out


def assign_region_sources(items: list[Formatted]) -> list[Formatted]:
    """Resolve the VGD items of a rank's batch (`items` in batch order: item b = image b) -> the same
    list with each VGD item's example given its prompts: `region_masks` [R, Hc, Wc] (region r's mask in
    the top-left window of its source image's frame; own-frame [R, H, W] when no region comes from
    another image) and `region_sources` [R] (None = own image, j = image j of THIS list, NO_PROMPT).
    Other items pass unchanged. Deterministic: the randomness is the formatter's u_r (no generator)."""
    draws = [f.vgd if isinstance(f, RegionFormatted) else None for f in items]
    if all(d is None for d in draws):
        return items
    out = list(items)
    for b, picks in enumerate(pick_sources(draws)):
        if picks is None:
            continue
        draw = draws[b]
        sources = [None if p is None or p[0] == b else p[0] for p in picks]
        sizes = [draw.size] + [draws[p[0]].size for p in picks if p is not None]
        canvas = (max(h for h, _ in sizes), max(w for _, w in sizes))
        regions = np.zeros((len(picks), *canvas), bool)
        for r, p in enumerate(picks):
            if p is not None:
                m = draws[p[0]].instances[p[1]][1]
                regions[r, :m.shape[0], :m.shape[1]] = m
        ex = replace(items[b].example, region_masks=regions,
                     region_sources=[NO_PROMPT if p is None else s for p, s in zip(picks, sources)]
                     if any(p is None or s is not None for p, s in zip(picks, sources)) else None)
        out[b] = replace(items[b], example=ex)
    return out


# --------------------------------------------------------------------------- interactive
def interactive(fmt, sample: Sample, image: np.ndarray, rng: np.random.Generator) -> list[Formatted]:
    prompts = _prompts_by_segment(fmt, sample)
    segs = [s for s in sample.segments if s.id in prompts]
    mk = Masks(sample, image.shape[:2])
    regions, targets, labels = [], [], []
    for j in rng.permutation(len(segs)):
        prompt = _draw_prompt(mk, [segs[j].id], prompts, rng)
        if prompt is None:
            continue
        labels.append(len(regions))
        regions.append(prompt)
        targets.append(mk.target([segs[j].id]))
    return _region_example(fmt, sample, image, mk, regions, targets, labels, rng)
