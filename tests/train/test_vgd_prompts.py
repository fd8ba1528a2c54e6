"""VGD training prompts as the original draws them (xsam.train.format_regions, steps 1-3): negatives
(p = 1/2, randint(0, 5) extra categories, per record), prompts from any image of the rank's batch (a
category absent from the batch takes another category's instance), region_sources through the collator,
the model's framing and region features.

The fixture COCO-VGD shards (tests/helpers.convert_fixtures) give 5 images with instances, of 5 sizes,
over one 5-category label space; a wider label space (the fixture's categories + 40 more) makes the
negative count uncapped."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import convert_fixtures, mask_of

from xsam.data import storage
from xsam.data.shards import iter_tar, read_manifest, shard_urls, meta_dir, split_dir
from xsam.model import preprocess
from xsam.model.batching import NO_PROMPT, collate_raw
from xsam.model.builder import build_model
from xsam.model.config import tiny
from xsam.model.stages import STAGES
from xsam.model.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer
from xsam.model.xsam import DecodeMode
from xsam.train.format_regions import VgdDraw, assign_region_sources, pick_sources
from xsam.train.formatting import Formatter

DATASET = "fixture_coco_vgd"


@pytest.fixture(scope="module")
def vgd(tmp_path_factory):
    """-> ([(sample, image bytes)] of the images with instances, label spaces)."""
    tmp = tmp_path_factory.mktemp("vgd")
    made, out, _ = convert_fixtures(tmp, ["coco_vgd"])
    pairs, spaces = [], {}
    for split in made[DATASET].entry["splits"]:
        manifest = read_manifest(storage.join(meta_dir(out, DATASET, split), "manifest.json"))
        spaces[manifest.label_space] = manifest.categories
        for url in shard_urls(out, DATASET, split):
            pairs.extend((s, img) for _, img, _, s in iter_tar(url) if s.segments)
    assert len(pairs) == 5 and len({(s.image.height, s.image.width) for s, _ in pairs}) == 5
    return pairs, spaces


def wide(spaces: dict) -> dict:
    (name, cats), = spaces.items()
    return {name: cats + [{"id": 1000 + k, "name": f"extra {k}"} for k in range(40)]}


def usable_cats(sample) -> set[int]:
    prompted = {vp.segment_id for vp in sample.visual_prompts}
    return {s.category_id for s in sample.segments if not s.iscrowd and s.id in prompted}


def prompt_owner(sample, window: np.ndarray) -> int | None:
    """The segment id whose stored prompt is `window` (a mask in the sample's frame), or None."""
    for vp in sample.visual_prompts:
        if np.array_equal(mask_of(vp.mask), window):
            return vp.segment_id
    return None


def batch_items(pairs, fmt: Formatter, seed: int) -> list:
    return [f for b, (s, img) in enumerate(pairs) for f in fmt(s, img, np.random.default_rng([seed, b]))]


# --------------------------------------------------------------------------- step 1: negatives
def test_negative_rate_and_uniform_count(vgd):
    """Over records (the Formatter seed drives the per-record draw): #negatives = 0 w.p. 1/2 + 1/12,
    k = 1..5 w.p. 1/12 each (the branch p = 1/2 times randint(0, 5) inclusive)."""
    pairs, spaces = vgd
    counts: Counter = Counter()
    n = 0
    for seed in range(1200):
        fmt = Formatter("s3", wide(spaces), seed=seed)
        for sample, img in pairs:
            (out,) = fmt(sample, img, np.random.default_rng(seed))
            cats = [c for _, c in out.vgd.categories]
            pos = usable_cats(sample)
            assert pos <= set(cats) and len(set(cats)) == len(cats)
            negatives = [r for r, c in enumerate(cats) if c not in pos]
            counts[len(negatives)] += 1
            n += 1
            for r in negatives:  # a negative has no target in this image
                assert r not in out.example.labels
    rates = {k: counts[k] / n for k in range(7)}
    print(f"VGD negatives over {n} records: " + ", ".join(f"{k}: {rates[k]:.4f}" for k in range(6)))
    assert counts[6] == 0
    with_neg = 1 - rates[0]
    assert abs(with_neg / (5 / 6) - 0.5) < 0.03  # the branch rate (k = 0 also happens inside it)
    assert abs(rates[0] - 7 / 12) < 0.025
    for k in range(1, 6):
        assert abs(rates[k] - 1 / 12) < 0.015, (k, rates[k])


def test_negative_draw_is_per_record_and_capped(vgd):
    """The category list is drawn once per record (the original draws it at load time): every read of
    a record lists the same categories; the negatives never exceed the label space's other categories."""
    pairs, spaces = vgd
    most: Counter = Counter()
    for seed in range(60):
        fmt = Formatter("s3", spaces, seed=seed)
        for b, (sample, img) in enumerate(pairs):
            lists = {tuple(fmt(sample, img, np.random.default_rng(read)).pop().vgd.categories)
                     for read in range(3)}
            assert len(lists) == 1
            pool = len(spaces[sample.label_space]) - len(usable_cats(sample))
            k = len(lists.pop()) - len(usable_cats(sample))
            assert 0 <= k <= pool
            most[b] = max(most[b], k)
    assert all(most[b] == len(spaces[s.label_space]) - len(usable_cats(s)) for b, (s, _) in enumerate(pairs))


# --------------------------------------------------------------------------- step 3: the batch rule
def test_batch_prompts_come_from_images_that_have_the_category(vgd):
    pairs, spaces = vgd
    present = [usable_cats(s) for s, _ in pairs]
    in_batch = set().union(*present)
    regions = cross = fallback = none = 0
    for seed in range(150):
        fmt = Formatter("s3", spaces if seed % 2 else wide(spaces), seed=seed)
        items = assign_region_sources(batch_items(pairs, fmt, seed))
        assert len(items) == len(pairs)
        for b, f in enumerate(items):
            ex = f.example
            cats = [c for _, c in f.vgd.categories]
            sources = ex.region_sources or [None] * len(cats)
            assert len(ex.region_masks) == len(cats) == len(sources)
            for r, (c, src) in enumerate(zip(cats, sources)):
                regions += 1
                if c not in present[b]:
                    assert r not in ex.labels  # negatives: no target, whatever their prompt
                if src == NO_PROMPT:
                    none += 1
                    assert not ex.region_masks[r].any()
                    continue
                j = b if src is None else src
                cross += j != b
                h, w = pairs[j][0].image.height, pairs[j][0].image.width
                assert not ex.region_masks[r, h:].any() and not ex.region_masks[r, :, w:].any()
                sid = prompt_owner(pairs[j][0], ex.region_masks[r, :h, :w])
                assert sid is not None, "the region is a stored prompt of its source image"
                owner = {s.id: s.category_id for s in pairs[j][0].segments}[sid]
                if c in in_batch:
                    assert owner == c  # the source image has the category: its instance
                else:  # absent from the batch: another category's instance, absent from image b
                    fallback += 1
                    assert owner not in present[b]
    print(f"VGD batch of 5: {regions} regions, cross-image {cross / regions:.3f}, "
          f"fallback {fallback / regions:.3f}, no prompt {none / regions:.4f}")
    assert cross > 0 and fallback > 0


def _draw(cats: list[int], uniforms: list[float], instances: list[int], size=(4, 5)) -> VgdDraw:
    return VgdDraw(categories=[("L", c) for c in cats], uniforms=uniforms,
                   instances=[(("L", c), np.zeros(size, bool)) for c in instances], size=size)


def test_absent_category_fallback_rule():
    """The original's M:394-426 by hand: image 0 has category 1; its negatives 7 and 8 are in no image."""
    draws = [_draw([1, 7, 8], [0.0, 0.0, 0.0], [1]),
             _draw([2, 3], [0.0, 0.0], [2, 2, 3]),
             _draw([1, 3], [0.99, 0.0], [1, 3])]
    picks = pick_sources(draws)
    # region 1 (category 1): own image first in the pool (u = 0); category 7, absent everywhere: another
    # category's instance absent from image 0 (u = 0: image 1's first, category 2); category 8: a category
    # not taken yet (2 is used): image 1's category-3 instance
    assert picks[0] == [(0, 0), (1, 0), (1, 2)]
    assert picks[1] == [(1, 0), (1, 2)]  # own instances, in pool order
    assert picks[2] == [(2, 0), (1, 2)]  # u = 0.99 over [image 0's, image 2's]: image 2's; then category 3
    draws[2].uniforms = [0.0, 0.99]
    assert pick_sources(draws)[2] == [(0, 0), (2, 1)]
    # alone, a negative has no candidate (its image holds only positives): the zero token
    assert pick_sources([draws[0]]) == [[(0, 0), None, None]]
    # an instance is used once per image: two regions of one category (never drawn so) take two instances
    assert pick_sources([_draw([2, 2, 2], [0.0] * 3, [2, 2])]) == [[(0, 0), (0, 1), None]]


# --------------------------------------------------------------------------- collate + framing + model
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_s3_model(tok):
    """The tiny S3 model (as tests/model/model_fixtures.tiny_model builds it)."""
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg, STAGES["s3"].parts, len(tok))
    model.special_ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return cfg, model.eval()


def cross_batch(pairs, spaces, want_none: bool = False) -> list:
    for seed in range(200):
        items = assign_region_sources(batch_items(pairs, Formatter("s3", spaces, seed=seed), seed))
        srcs = [s for f in items for s in (f.example.region_sources or [])]
        if any(s not in (None, NO_PROMPT) for s in srcs) and (not want_none or NO_PROMPT in srcs):
            return items
    raise AssertionError("no batch with cross-image prompts")


def test_collate_sources_and_source_framing(vgd, tok):
    pairs, spaces = vgd
    cfg = tiny()
    size = cfg.sam.image_size
    items = cross_batch(pairs, spaces)
    raw = collate_raw([f.example for f in items], DecodeMode.per_sample, tok, cfg)
    assert len(raw.region_sources) == len(items)
    prepared = raw.prepared(None, size)
    checked = 0
    for b, f in enumerate(items):
        ex = f.example
        expect = [b if s is None else s for s in (ex.region_sources or [None] * len(ex.region_masks))]
        assert raw.region_sources[b].dtype == torch.long and raw.region_sources[b].tolist() == expect
        assert prepared.region_masks[b].shape == (len(expect), size, size)
        for r, s in enumerate(expect):
            h, w = (pairs[s if s >= 0 else b][0].image.height, pairs[s if s >= 0 else b][0].image.width)
            window = torch.from_numpy(ex.region_masks[r:r + 1, :h, :w].copy())
            assert torch.equal(prepared.region_masks[b][r], preprocess.frame_masks(window, size)[0])
            if s not in (b, NO_PROMPT) and (h, w) != ex.image.shape[:2]:
                own = ex.region_masks[r:r + 1, :ex.image.shape[0], :ex.image.shape[1]]
                wrong = preprocess.frame_masks(torch.from_numpy(own.copy()), size)[0]
                assert not torch.equal(prepared.region_masks[b][r], wrong)  # the own frame would misplace it
                checked += 1
    assert checked > 0
    # a canvas too small for its source's frame is refused
    exs = [f.example for f in items]
    b, j = next((b, j) for b in range(len(exs)) for j in range(len(exs))
                if pairs[j][0].image.height > exs[b].image.shape[0])
    r = len(exs[b].region_masks)
    exs[b] = replace(exs[b], region_masks=np.zeros((r, *exs[b].image.shape[:2]), bool),
                     region_sources=[j] * r)
    with pytest.raises(ValueError, match="canvas"):
        collate_raw(exs, DecodeMode.per_sample, tok, cfg)


def test_model_samples_each_region_from_its_source_image(vgd, tok):
    pairs, spaces = vgd
    cfg, model = tiny_s3_model(tok)
    size = cfg.sam.image_size
    model.prompt_sampler.num_points = size * size  # every mask pixel is sampled: a deterministic max-pool
    items = cross_batch(pairs, spaces)
    alone = next(f for seed in range(50) for s, img in pairs
                 for f in Formatter("s3", spaces, seed=seed)(s, img, np.random.default_rng(seed))
                 if NO_PROMPT in (f.example.region_sources or []))  # a batch of one with a negative
    raw = collate_raw([f.example for f in items], DecodeMode.per_sample, tok, cfg)
    losses, _ = model(raw)
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        for batch in (raw, collate_raw([alone.example], DecodeMode.per_sample, tok, cfg)):
            p = model.prepare(batch)
            feats = model.sam.features(model.to_model_dtype(p.sam_pixels))
            _, seg_map = model.visual_tokens(p.siglip_pixels, feats)
            embeds, _, token_ids, _ = model.embed_inputs(p, feats)
            cross = zero = 0
            for b in range(len(p.input_ids)):
                got = embeds[b][token_ids[b] == -300]
                for r, s in enumerate(p.region_sources[b].tolist()):
                    if s == NO_PROMPT:
                        assert not got[r].any()
                        zero += 1
                        continue
                    want = model.prompt_sampler(seg_map[s], p.region_masks[b][r:r + 1])[0]
                    assert torch.allclose(got[r], want, atol=1e-6)
                    if s != b:
                        cross += 1
                        own = model.prompt_sampler(seg_map[b], p.region_masks[b][r:r + 1])[0]
                        assert not torch.allclose(got[r], own, atol=1e-6)
            assert (cross > 0) if batch is raw else (zero > 0)



def test_training_collate_assigns_sources_deterministically(vgd, tok):
    """StageRecipe.collate (the loader's collate_fn) resolves the batch rule; the same per-sample
    generators (the loader's, a function of seed, epoch and position) give the same batch."""
    from xsam.train.config import TrainConfig
    from xsam.train.recipe import StageRecipe

    pairs, spaces = vgd
    recipe = StageRecipe(TrainConfig(stage="s3"), session=None)
    recipe.tokenizer, recipe.model_cfg = tok, tiny()
    fmt = Formatter("s3", spaces, seed=3)
    seen_cross = False
    for seed in range(20):
        first = recipe.collate(batch_items(pairs, fmt, seed))
        again = recipe.collate(batch_items(pairs, fmt, seed))
        expect = collate_raw([f.example for f in assign_region_sources(batch_items(pairs, fmt, seed))],
                             DecodeMode.per_sample, tok, recipe.model_cfg)
        for x, y, z in zip(first.region_sources, again.region_sources, expect.region_sources, strict=True):
            assert (x is None and y is None and z is None) or (torch.equal(x, y) and torch.equal(x, z))
        for x, y in zip(first.region_masks, again.region_masks, strict=True):
            assert torch.equal(x, y)
        seen_cross |= any(t is not None and bool(((t >= 0) & (t != b)).any())
                          for b, t in enumerate(first.region_sources))
    assert seen_cross
