"""Per-read formatting of stored samples (xsam.train.formatting) and the S1 jitter (xsam.train.augment).

Every test reads REAL converted fixture shards (tests/helpers.convert_fixtures, once per module) or a
hand-made Sample where a case needs more objects / overlaps than the fixtures have."""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import convert_fixtures, mask_of
from PIL import Image

from xsam.data import expansion, storage
from xsam.data import masks as mask_codec
from xsam.data.schema import (
    RLE,
    GroundedCaption,
    ImageInfo,
    Phrase,
    Provenance,
    ReferringExpression,
    Sample,
    Segment,
    Task,
)
from xsam.data.shards import iter_tar, read_manifest, shard_urls, meta_dir, split_dir
from xsam.model import templates as T
from xsam.model.batching import collate
from xsam.model.config import tiny
from xsam.model.preprocess import SAM_MEAN, SAM_STD, ResizeCrop, crop_masks
from xsam.model.tokenizer import build_tiny_tokenizer, parse_gcg
from xsam.model.xsam import DecodeMode
from xsam.train.augment import jitter_geometry, large_scale_jitter
from xsam.train.formatting import Formatter, collate_s1, decode_image

FORMATS = ["coco_panoptic", "refer", "labelme", "gcg_grandf", "gcg_flickr", "gcg_refcocog", "coco_vgd", "psalm_interactive", "llava"]
P_RE = re.compile(r"<p>(.*?)</p>")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """dataset -> [(sample, image bytes)] over all splits; label_spaces from the split manifests."""
    tmp = tmp_path_factory.mktemp("fmt")
    made, out, _ = convert_fixtures(tmp, FORMATS)
    data: dict[str, list[tuple[Sample, bytes]]] = {}
    label_spaces: dict[str, list[dict]] = {}
    for name, ds in made.items():
        for split in ds.entry["splits"]:
            manifest = read_manifest(storage.join(meta_dir(out, name, split), "manifest.json"))
            if manifest.label_space and manifest.categories:
                label_spaces[manifest.label_space] = manifest.categories
            for url in shard_urls(out, name, split):
                data.setdefault(name, []).extend((s, img) for _, img, _, s in iter_tar(url))
    return data, label_spaces


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def names_in(question: str) -> list[str]:
    return P_RE.findall(question)


def seg_by_id(sample: Sample) -> dict[int, Segment]:
    return {s.id: s for s in sample.segments}


def union(sample: Sample, ids) -> np.ndarray:
    segs = seg_by_id(sample)
    out = np.zeros((sample.image.height, sample.image.width), bool)
    for i in ids:
        out |= mask_of(segs[i].mask)
    if sample.ignore_mask is not None:
        out &= ~mask_of(sample.ignore_mask)
    return out


def encode_image(image: np.ndarray, exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    Image.fromarray(image).save(buf, "PNG" if exif_orientation is None else "JPEG", **kw)
    return buf.getvalue()


def rle(mask: np.ndarray) -> RLE:
    return RLE(**mask_codec.encode(mask))


def hand_sample(task: Task, h: int, w: int, segments: list[Segment], **fields) -> Sample:
    return Sample(dataset="hand", split="train", task=task, image=ImageInfo(id="1", file_name="1.png", width=w,
                  height=h, format="png"), segments=segments,
                  provenance=Provenance(source_file="-", source_id="1", reader="hand", reader_version=1), **fields)


def box_segment(sid: int, h: int, w: int, y0: int, y1: int, x0: int, x1: int, category_id=None) -> Segment:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return Segment(id=sid, category_id=category_id, bbox=(x0, y0, x1 - x0, y1 - y0), area=int(m.sum()), mask=rle(m))


def assert_same(a: list, b: list):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        ex, ey = x.example, y.example
        assert ex.turns == ey.turns and ex.labels == ey.labels and x.mode == y.mode
        for fa, fb in ((ex.masks, ey.masks), (ex.region_masks, ey.region_masks), (ex.image, ey.image)):
            assert (fa is None) == (fb is None)
            if fa is not None:
                assert np.array_equal(fa, fb)


# --------------------------------------------------------------------------- chat
def test_chat_turns_and_image_placeholder(shards):
    data, ls = shards
    fmt = Formatter("s3", ls)
    seen = 0
    for sample, img in data["fixture_llava_mix665k"] + data["fixture_llava_pretrain"]:
        for seed in range(5):
            (out,) = fmt(sample, img, rng(seed))
            assert out.mode is DecodeMode.none and out.example.masks is None and out.task is Task.chat
            turns = out.example.turns
            assert turns[0][0].startswith("<image>\n")
            assert sum(u.count("<image>") for u, _ in turns) == 1
            stored = [[t.value.replace("<image>", "").strip() for t in c.turns] for c in sample.conversations]
            flat = [x for u, a in turns for x in (u.removeprefix("<image>\n"), a)]
            assert flat in stored
            seen += 1
    assert seen > 0
    # the fixture with two conversations: both get picked over seeds
    multi = [(s, i) for s, i in data["fixture_llava_mix665k"] if len(s.conversations) > 1]
    assert multi
    s, i = multi[0]
    assert len({tuple(fmt(s, i, rng(seed))[0].example.turns) for seed in range(30)}) == 2


def test_chat_placeholder_added_and_moved():
    from xsam.data.schema import Conversation, Turn
    image = np.zeros((10, 12, 3), np.uint8)
    conv = Conversation(id="c", turns=[Turn(role="gpt", value="hello"), Turn(role="human", value="What is it?"),
                                       Turn(role="gpt", value="A <image> thing."),
                                       Turn(role="human", value="Sure <image>?"), Turn(role="gpt", value="Yes."),
                                       Turn(role="human", value="dangling")])
    s = hand_sample(Task.chat, 10, 12, [], conversations=[conv])
    (out,) = Formatter("s2", {})(s, encode_image(image), rng(0))
    assert out.example.turns == [("<image>\nWhat is it?", "A  thing."), ("Sure ?", "Yes.")]


def test_stage_gating(shards):
    data, ls = shards
    chat, img = data["fixture_llava_pretrain"][0]
    pan, pimg = data["fixture_coco_panoptic"][0]
    with pytest.raises(ValueError, match="not trained in stage s1"):
        Formatter("s1", ls)(chat, img, rng(0))
    with pytest.raises(ValueError, match="not trained in stage s2"):
        Formatter("s2", ls)(pan, pimg, rng(0))
    with pytest.raises(ValueError):
        Formatter("s4", ls)


# --------------------------------------------------------------------------- generic
def test_generic_masks_labels_names(shards):
    data, ls = shards
    fmt = Formatter("s3", ls)
    for sample, img in data["fixture_coco_panoptic"]:
        cats = {c["id"]: c for c in ls[sample.label_space]}
        plain = [s for s in sample.segments if not s.iscrowd]
        for seed in range(10):
            (out,) = fmt(sample, img, rng(seed))
            ex = out.example
            assert out.mode is DecodeMode.per_sample
            (question, answer), = ex.turns
            assert answer in T.SEG_ANSWERS and question.startswith("<image>\n")
            names = names_in(question)
            assert len(names) == len(set(names))
            assert ex.masks.shape == (len(plain), sample.image.height, sample.image.width)
            for k, seg in enumerate(plain):  # one mask per non-crowd segment, pixel exact, right name
                assert np.array_equal(ex.masks[k], mask_of(seg.mask))
                assert names[ex.labels[k]] == T.clean_category_name(cats[seg.category_id]["name"])
            positives = {T.clean_category_name(cats[s.category_id]["name"]) for s in plain}
            crowd_only = {T.clean_category_name(cats[s.category_id]["name"]) for s in sample.segments
                          if s.iscrowd} - positives
            assert positives | crowd_only <= set(names)  # panoptic lists crowd-only categories (X-SAM)
            listed = len(positives | crowd_only)
            assert 0 <= len(names) - listed <= 128 - listed


def test_generic_category_list_rule(shards):
    """T2: p=1/2 every category, else positives + randint(0, num_class - P) negatives; drawn once per record
    (same list on every read of a sample), the template per read; ~99% of prompts list every class."""
    data, ls = shards
    sample, img = data["fixture_coco_panoptic"][0]
    big = list(ls[sample.label_space]) + [{"id": 10_000 + i, "name": f"thing-{i}-other", "isthing": 1}
                                         for i in range(300)]
    n_cats = len(big)
    pos = {s.category_id for s in sample.segments}  # panoptic: crowd-only categories are listed too
    full, orders, templates = 0, set(), set()
    trials = 400
    for seed in range(trials):
        fmt = Formatter("s3", {sample.label_space: big}, seed=seed)
        reads = [fmt(sample, img, rng(r))[0].example.turns[0][0] for r in range(3)]
        lists = {tuple(names_in(q)) for q in reads}
        assert len(lists) == 1  # drawn once per record: every read (epoch) lists the same categories
        names = lists.pop()
        assert all("-" not in n and "other" not in n for n in names)  # cleaned
        assert len(names) == len(set(names)) and len(names) >= len(pos)
        full += len(names) == n_cats
        orders.add(names)
        templates.update(P_RE.sub("", q).split(":")[0][:30] for q in reads)
    # P(all) = 1/2 + 1/2 * P(randint(0, 10000 - P) >= n_cats - P)
    p_all = 0.5 + 0.5 * (10_000 - n_cats + 1) / (10_000 - len(pos) + 1)
    assert abs(full / trials - p_all) < 0.03 and full / trials > 0.95
    assert len(orders) == trials and len(templates) > 1
    # the negative branch alone (a small num_class shows its randint): counts vary, bounded by num_class
    counts = {len(names_in(Formatter("s3", {sample.label_space: big}, num_class=40, full_list_prob=0.0,
                                     seed=seed)(sample, img, rng(0))[0].example.turns[0][0]))
              for seed in range(60)}
    assert min(counts) >= len(pos) and max(counts) <= 40 and len(counts) > 10


def test_generic_category_targets_option(shards):
    data, ls = shards
    fmt = Formatter("s3", ls, generic_targets="category")
    for sample, img in data["fixture_coco_panoptic"]:
        cats = {c["id"]: c for c in ls[sample.label_space]}
        (out,) = fmt(sample, img, rng(3))
        names = names_in(out.example.turns[0][0])
        for m, lab in zip(out.example.masks, out.example.labels):
            ids = [s.id for s in sample.segments if not s.iscrowd
                   and T.clean_category_name(cats[s.category_id]["name"]) == names[lab]]
            assert ids and np.array_equal(m, union(sample, ids))


def test_determinism_and_variation(shards):
    data, ls = shards
    fmt = Formatter("s3", ls)
    for name in ("fixture_coco_panoptic", "fixture_refcoco", "fixture_reason_seg", "fixture_gcg_grandf",
                 "fixture_coco_vgd", "fixture_coco_interactive", "fixture_llava_mix665k"):
        sample, img = data[name][1]
        assert_same(fmt(sample, img, rng(7)), fmt(sample, img, rng(7)))
        texts = {tuple(t for f in fmt(sample, img, rng(seed)) for t in f.example.turns) for seed in range(50)}
        if name != "fixture_llava_mix665k" or len(sample.conversations) > 1:
            assert len(texts) > 1, name


# --------------------------------------------------------------------------- referring
def test_referring_records_as_the_original(shards):
    """T1: one record = every object of the image, one sentence each (record k = the k-th combination of
    itertools.product over the deduplicated lowercased sentences), no chunking, one read draws one record."""
    data, ls = shards
    fmt = Formatter("s3", ls)
    for name in ("fixture_refcoco", "fixture_grefcoco"):
        for sample, img in data[name]:
            objects = expansion.referring_objects(sample)
            combos = list(itertools.islice(itertools.product(*[s for s, _ in objects]),
                                           sum(len(s) for s, _ in objects)))
            assert expansion.num_records(sample) == len(combos)
            seen = set()
            for seed in range(40):
                (out,) = fmt(sample, img, rng(seed))
                ex = out.example
                assert out.mode is DecodeMode.per_phrase and len(ex.masks) == len(ex.turns) == len(objects)
                assert ex.labels == list(range(len(objects)))
                by_sentence = {}
                for k, (q, a) in enumerate(ex.turns):
                    assert q.startswith("<image>\n") == (k == 0) and a in T.REFERRING_ANSWERS
                    (sentence,) = names_in(q)
                    assert sentence == sentence.lower()
                    owner = [j for j, (sents, _) in enumerate(objects) if sentence in sents]
                    assert any(np.array_equal(ex.masks[k], union(sample, objects[j][1])) for j in owner)
                    by_sentence[owner[0]] = sentence
                record = tuple(by_sentence[j] for j in range(len(objects)))
                assert record in combos  # one of the image's records
                seen.add(record)
            assert len(seen) > min(1, len(combos) - 1)


def test_referring_expansion_counts_and_order():
    h, w, n = 40, 60, 19
    segs = [box_segment(i + 1, h, w, i, i + 10, 2 * i, 2 * i + 5, category_id=1) for i in range(n)]
    refs = [ReferringExpression(ref_id=str(i), sentences=[f"Object number {i}", f"thing {i}", f"object NUMBER {i}"],
                                segment_ids=[i + 1]) for i in range(n)]
    refs.append(ReferringExpression(ref_id="empty", sentences=["nothing"], segment_ids=[]))  # no target: dropped
    s = hand_sample(Task.referring_seg, h, w, segs, referring=refs)
    # 2 distinct sentences per object after lowercasing: min(2**19, 2 * 19) records
    assert expansion.num_records(s) == 38
    assert [expansion.combination([2] * 3, k) for k in range(4)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert expansion.count([1, 1, 1]) == 1 and expansion.count([3]) == 3 and expansion.count([]) == 0
    img = encode_image(np.zeros((h, w, 3), np.uint8))
    fmt = Formatter("s3", {}, seed=7)
    orders = {}
    for seed in range(30):
        (out,) = fmt(s, img, rng(seed))
        assert len(out.example.turns) == n  # all objects in one record, no chunking
        assert out.example.turns[0][0].startswith("<image>\n")
        assert all("<image>" not in q for q, _ in out.example.turns[1:])
        idx = [int(names_in(q)[0].split()[-1]) for q, _ in out.example.turns]
        for k, i in enumerate(idx):
            assert np.array_equal(out.example.masks[k], mask_of(segs[i].mask))
        assert sorted(idx) == list(range(n)) and idx != sorted(idx)  # every object once, shuffled
        sentences = tuple(sorted(names_in(q)[0] for q, _ in out.example.turns))
        orders.setdefault(sentences, set()).add(tuple(idx))
    assert len(orders) > 5  # different records are read
    assert all(len(o) == 1 for o in orders.values())  # a record's object order is drawn once (load time)


# --------------------------------------------------------------------------- reasoning
def test_reasoning_all_queries_as_turns_and_explain_per_turn(shards):
    """T6: one record per image, every query a turn (stored order) targeting the union mask; per turn the
    explanation branch at p=0.5 when an explanation exists; sentence queries LONG, phrase queries SHORT."""
    data, ls = shards
    fmt = Formatter("s3", ls)
    for sample, img in data["fixture_reason_seg"]:
        (rq,) = sample.reasoning
        queries = [q.strip() for q in rq.queries if q.strip()]
        explained = turns = 0
        for seed in range(50):
            (out,) = fmt(sample, img, rng(seed))
            ex = out.example
            assert out.mode is DecodeMode.per_phrase and ex.labels == list(range(len(queries)))
            assert [names_in(q)[0] for q, _ in ex.turns] == queries
            for k, (q, a) in enumerate(ex.turns):
                assert np.array_equal(ex.masks[k], union(sample, rq.segment_ids))
                q = q.removeprefix("<image>\n")
                turns += 1
                if q in {T.reasoning_question(queries[k], i, explain=True)
                         for i in range(len(T.REASONING_EXPLAIN_QUESTIONS))}:
                    explained += 1
                    assert a in {T.reasoning_answer(i, rq.explanation) for i in range(5)}
                else:
                    assert a in T.REFERRING_ANSWERS
                    qs = T.REASONING_QUESTIONS if rq.is_sentence else T.REASONING_SHORT_QUESTIONS
                    assert q in {T.reasoning_question(queries[k], i, rq.is_sentence) for i in range(len(qs))}
        if rq.explanation:
            assert 0.35 < explained / turns < 0.65
        else:
            assert explained == 0
    # the ignore region is never target: the reader paints shapes in decreasing area as LISA does, so a
    # target drawn over an ignore region keeps it and the ignore pixels under a target are gone
    with_ignore = [s for s, _ in data["fixture_reason_seg"] if s.ignore_mask is not None]
    assert with_ignore
    for s in with_ignore:
        assert not (mask_of(s.ignore_mask) & union_raw(s, s.reasoning[0].segment_ids)).any()


def union_raw(sample: Sample, ids) -> np.ndarray:
    segs = seg_by_id(sample)
    return np.any([mask_of(segs[i].mask) for i in ids], axis=0)


# --------------------------------------------------------------------------- GCG
def test_gcg_spans_wrap_phrases(shards):
    data, ls = shards
    fmt = Formatter("s3", ls)
    for name in ("fixture_gcg_grandf", "fixture_gcg_psg", "fixture_gcg_flickr", "fixture_gcg_refcocog"):
        for sample, img in data[name]:
            for seed in range(5):
                (out,) = fmt(sample, img, rng(seed))
                ex = out.example
                assert out.mode is DecodeMode.per_sample
                (q, a), = ex.turns
                assert q.removeprefix("<image>\n") in T.GCG_QUESTIONS
                caption, spans = parse_gcg(a)
                phrases = sorted(sample.gcg.phrases, key=lambda p: p.start)
                assert caption == sample.gcg.caption.strip().lower()
                assert [caption[s:e] for s, e in spans] == [p.text.lower() for p in phrases] == names_in(a)
                for k, p in enumerate(phrases):
                    assert np.array_equal(ex.masks[k], union(sample, p.segment_ids))
                assert ex.labels == list(range(len(phrases)))


def test_gcg_overlapping_spans_dropped():
    h, w = 30, 40
    segs = [box_segment(i + 1, h, w, 0, 10, 5 * i, 5 * i + 4) for i in range(4)]
    caption = "A big <SEG>red car near a tree."  # a stray marker: removed, offsets re-mapped
    phrases = [Phrase(start=24, end=30, text="a tree", segment_ids=[3]),
               Phrase(start=0, end=18, text="A big <SEG>red car", segment_ids=[1]),
               Phrase(start=11, end=18, text="red car", segment_ids=[2]),  # overlaps the previous: dropped
               Phrase(start=19, end=23, text="near", segment_ids=[])]  # no mask: dropped
    s = hand_sample(Task.gcg, h, w, segs, gcg=GroundedCaption(caption=caption, phrases=phrases))
    (out,) = Formatter("s3", {})(s, encode_image(np.zeros((h, w, 3), np.uint8)), rng(1))
    a = out.example.turns[0][1]
    assert a.startswith("<p>a big red car</p>  near <p>a tree</p> . ")
    assert names_in(a) == ["a big red car", "a tree"] and a.count("<SEG>") == 1
    assert np.array_equal(out.example.masks[0], mask_of(segs[0].mask))
    assert np.array_equal(out.example.masks[1], mask_of(segs[2].mask))


# --------------------------------------------------------------------------- VGD / interactive
def prompt_type_of(sample: Sample, region: np.ndarray) -> list[tuple[int, str]]:
    return [(vp.segment_id, vp.type.value) for vp in sample.visual_prompts if np.array_equal(mask_of(vp.mask), region)]


def test_vgd_regions_targets_and_prompt_types(shards):
    """Alone (a batch of one, format_regions step 3) every positive region takes an own-image prompt;
    negative regions (categories absent from the image: tests/train/test_vgd_prompts.py) have no prompt
    (NO_PROMPT, an all-False mask) and no target."""
    data, ls = shards
    fmt = Formatter("s3", ls)
    types_seen: Counter = Counter()
    per_instance: dict[tuple, set] = {}
    for sample, img in data["fixture_coco_vgd"]:
        segs = seg_by_id(sample)
        prompted = {vp.segment_id for vp in sample.visual_prompts}
        cats = {segs[i].category_id for i in prompted if not segs[i].iscrowd}
        for seed in range(50):
            outs = fmt(sample, img, rng(seed))
            if not cats:
                assert outs == []
                continue
            (out,) = outs
            ex = out.example
            assert out.mode is DecodeMode.per_sample
            (q, a), = ex.turns
            region_cats = [c for _, c in out.vgd.categories]
            assert q.count("<region>") == len(ex.region_masks) == len(region_cats) and a in T.SEG_ANSWERS
            assert cats <= set(region_cats) and len(region_cats) - len(cats) <= 5
            sources = ex.region_sources or [None] * len(region_cats)
            for r, (region, cat) in enumerate(zip(ex.region_masks, region_cats)):
                got = [ex.masks[k] for k in range(len(ex.masks)) if ex.labels[k] == r]
                if cat not in cats:  # a negative: no prompt alone, no target
                    assert sources[r] == -1 and not region.any() and got == []
                    continue
                assert sources[r] is None
                owners = prompt_type_of(sample, region)
                assert owners, "the region mask is a stored prompt mask"
                sid, ptype = owners[0]
                assert segs[sid].category_id == cat
                types_seen[ptype] += 1
                per_instance.setdefault((sample.provenance.source_id, sid), set()).add(ptype)
                expected = [s for s in sample.segments if not s.iscrowd and s.category_id == cat]
                assert len(got) == len(expected)  # every instance of the region's category, each its own mask
                for m, s in zip(got, expected):
                    assert np.array_equal(m, mask_of(s.mask))
    assert set(types_seen) == {"point", "scribble", "box", "mask"}
    assert any(len(v) > 1 for v in per_instance.values())  # the type varies per read for one instance


def test_vgd_prompt_type_restriction(shards):
    data, ls = shards
    fmt = Formatter("s3", ls, prompt_types=("box",))
    for sample, img in data["fixture_coco_vgd"]:
        for out in fmt(sample, img, rng(0)):
            sources = out.example.region_sources or [None] * len(out.example.region_masks)
            for region, source in zip(out.example.region_masks, sources):
                if source != -1:  # -1: a negative region, no prompt alone
                    assert {t for _, t in prompt_type_of(sample, region)} == {"box"}


def test_interactive_one_region_per_annotation(shards):
    data, ls = shards
    fmt = Formatter("s3", ls)
    for sample, img in data["fixture_coco_interactive"]:
        prompted = {vp.segment_id for vp in sample.visual_prompts}
        segs = seg_by_id(sample)
        for seed in range(5):
            (out,) = fmt(sample, img, rng(seed))
            ex = out.example
            assert len(ex.region_masks) == len(ex.masks) == len(prompted) and ex.labels == list(range(len(prompted)))
            used = set()
            for region, target in zip(ex.region_masks, ex.masks):
                sids = {sid for sid, _ in prompt_type_of(sample, region)}
                (sid,) = [i for i in sids if np.array_equal(target, mask_of(segs[i].mask))]
                used.add(sid)
            assert used == prompted


# --------------------------------------------------------------------------- S1
def test_s1_labels_contiguous_and_masks_follow_jitter(shards):
    """The formatter draws the jitter and keeps every non-crowd mask in order (one the crop empties stays,
    empty, as the reference does); image and masks stay at the original size (the device transform
    resamples them)."""
    data, ls = shards
    fmt = Formatter("s1", ls, sam_size=256)
    emptied = 0
    for sample, img in data["fixture_coco_panoptic"]:
        order = [c["id"] for c in ls[sample.label_space]]
        plain = [s for s in sample.segments if not s.iscrowd]
        for seed in range(12):
            (out,) = fmt(sample, img, rng(seed))
            ex = out.example
            h, w = sample.image.height, sample.image.width
            assert ex.turns == [] and out.mode is DecodeMode.per_sample
            assert ex.image.shape == (h, w, 3) and ex.masks.shape[1:] == (h, w) and ex.masks.dtype == bool
            scale = rng(seed).uniform(0.1, 2.0)  # the jitter's one draw
            (nh, nw), (oy, ox), (ch, cw) = jitter_geometry(h, w, scale, 256)
            assert out.crop == ResizeCrop(resized=(nh, nw), offset=(oy, ox), valid=(ch, cw))
            framed = crop_masks(torch.from_numpy(ex.masks), out.crop, 256).numpy()
            assert not framed[:, ch:].any() and not framed[:, :, cw:].any()
            for k, seg in enumerate(plain):
                m = mask_of(seg.mask)
                # the reference's nearest rule, with its float order: (dst + 0.5) * (src / dst_size)
                rows = np.minimum(((np.arange(oy, oy + ch) + 0.5) * (h / nh)).astype(int), h - 1)
                cols = np.minimum(((np.arange(ox, ox + cw) + 0.5) * (w / nw)).astype(int), w - 1)
                assert np.array_equal(ex.masks[k], m)
                assert np.array_equal(framed[k, :ch, :cw], m[rows][:, cols])
                assert ex.labels[k] == order.index(seg.category_id)
            assert len(plain) == len(ex.masks) == len(ex.labels)
            assert all(0 <= lab < len(order) for lab in ex.labels)
            emptied += int((~framed.any(axis=(1, 2))).sum())
    assert emptied > 0  # the case issue 10 T9 is about (a mask the crop empties stays a target) occurred


def test_jitter_keeps_mask_on_image_and_bbox_scales():
    h, w, size = 60, 80, 256
    image = np.zeros((h, w, 3), np.uint8)
    image[...] = (0, 0, 255)
    image[20:40, 30:60] = (255, 0, 0)
    mask = np.zeros((1, h, w), bool)
    mask[0, 20:40, 30:60] = True
    scales = []
    for seed in range(12):
        jit = large_scale_jitter(image, mask, rng(seed), size)
        scales.append(jit.scale)
        ry, rx = jit.ratio
        oy, ox = jit.offset
        ys, xs = np.nonzero(jit.masks[0])
        if len(ys) == 0:
            continue
        # the box scales with the jitter factor (up to the crop window and one pixel of rounding)
        ch, cw = jit.valid_size
        exp = [max(0, 20 * ry - oy), min(ch, 40 * ry - oy), max(0, 30 * rx - ox), min(cw, 60 * rx - ox)]
        got = [ys.min(), ys.max() + 1, xs.min(), xs.max() + 1]
        assert np.allclose(got, exp, atol=1.0), (jit.scale, got, exp)
        assert abs(ry * h - size * jit.scale * h / w) <= 1.0  # longest side (w) -> size * scale
        # the image moved with the mask: the half-intensity edge of the (bilinear) red box lies within one
        # pixel of the (nearest) mask's edge
        ry_, rx_ = np.nonzero(jit.image[:ch, :cw, 0] > 127)
        assert np.allclose([ry_.min(), ry_.max() + 1, rx_.min(), rx_.max() + 1], got, atol=1.0)
        assert jit.image[jit.masks[0]][:, 0].mean() > 200
        assert jit.image[:ch, :cw][~jit.masks[0][:ch, :cw]][:, 0].mean() < 60
    assert min(scales) < 0.6 and max(scales) > 1.2 and all(0.1 <= s <= 2.0 for s in scales)


def test_collate_s1_and_forward(shards):
    """collate_s1 ships uint8 images and bool masks at the original size; prepared (here on the CPU) they
    equal the CPU reference jitter: masks exactly, pixels within 1 grey level (PIL's uint8 rounding)."""
    from xsam.model.builder import build_model
    from xsam.model.stages import STAGES

    data, ls = shards
    cfg = tiny()
    size = cfg.sam.image_size
    fmt = Formatter("s1", ls, sam_size=size)
    pairs = data["fixture_coco_panoptic"][:3]
    items = [f for i, (s, img) in enumerate(pairs) for f in fmt(s, img, rng(i))]
    raw = collate_s1(items)
    assert raw.raw and len(raw) == 3 and raw.crops == [f.crop for f in items]
    for f, im, t in zip(items, raw.images, raw.targets):
        assert im.dtype == torch.uint8 and im.shape == (3, *f.example.image.shape[:2])
        assert t["masks"].dtype == torch.bool and t["masks"].shape[1:] == f.example.image.shape[:2]
        assert t["labels"].tolist() == f.example.labels
    prepared = raw.prepared(size)
    assert prepared.sam_pixels.shape == (3, 3, size, size) and not prepared.raw
    for i, ((sample, img), f, x, t) in enumerate(zip(pairs, items, prepared.sam_pixels, prepared.targets)):
        segs = [s for s in sample.segments if not s.iscrowd]
        image = decode_image(img)
        ref = large_scale_jitter(image, np.stack([mask_of(s.mask) for s in segs]), rng(i), size)
        h, w = ref.valid_size
        assert (x[:, h:, :] == 0).all() and (x[:, :, w:] == 0).all()
        grey = x[:, :h, :w] * torch.tensor(SAM_STD)[:, None, None] + torch.tensor(SAM_MEAN)[:, None, None]
        assert (grey - torch.from_numpy(ref.image[:h, :w]).permute(2, 0, 1).float()).abs().max() <= 1.0 + 1e-3
        keep = ref.masks.any(axis=(1, 2))
        assert t["masks"].dtype == torch.bool and torch.equal(t["masks"], torch.from_numpy(ref.masks[keep]))
    torch.manual_seed(0)
    model = build_model(cfg, STAGES["s1"].parts)
    losses, _ = model(raw)  # the model prepares the raw batch itself
    assert torch.isfinite(losses["total"])


# --------------------------------------------------------------------------- the rest
def test_every_task_collates(shards, tmp_path):
    """The examples go through the model's collate (tiny tokenizer): placeholders and spans line up."""
    data, ls = shards
    tok = build_tiny_tokenizer(tmp_path / "tok")
    cfg = tiny()
    fmt = Formatter("s3", ls, num_class=8, full_list_prob=0.0)
    for items in data.values():
        outs = [f for i, (s, img) in enumerate(items) for f in fmt(s, img, rng(i))]
        by_mode: dict = {}
        for f in outs:
            by_mode.setdefault(f.mode, []).append(f.example)
        for mode, exs in by_mode.items():
            batch = collate(exs, mode, tok, cfg)
            for b, ex in enumerate(exs):
                ids = batch.input_ids[b].tolist()
                assert ids.count(-200) == 1
                assert ids.count(-300) == (0 if ex.region_masks is None else len(ex.region_masks))
            if mode is DecodeMode.per_phrase:
                assert len(batch.targets) == sum(len(ex.masks) for ex in exs)
            elif mode is DecodeMode.per_sample:
                for ex, t in zip(exs, batch.targets):
                    spans = sum(len(names_in(q + a)) + q.count("<region>") for q, a in ex.turns)
                    assert t["labels"].numel() == 0 or int(t["labels"].max()) < max(spans, 1)


def test_image_decode_ignores_exif_orientation():
    image = np.zeros((20, 50, 3), np.uint8)
    data = encode_image(image, exif_orientation=6)  # "rotate 90": a viewer would show 50 x 20 upright
    assert decode_image(data).shape == (20, 50, 3)
    s = hand_sample(Task.chat, 50, 20, [])
    with pytest.raises(ValueError, match="record says"):
        decode_image(data, s)


def test_empty_results(shards):
    data, ls = shards
    fmt = Formatter("s3", ls)
    eval_gcg = hand_sample(Task.gcg, 10, 10, [], gcg=GroundedCaption(caption="A caption.", phrases=[]))
    assert fmt(eval_gcg, encode_image(np.zeros((10, 10, 3), np.uint8)), rng(0)) == []
    no_pos = hand_sample(Task.generic_seg, 10, 10, [], label_space="x")
    assert Formatter("s3", {"x": [{"id": 1, "name": "a"}]})(no_pos, encode_image(np.zeros((10, 10, 3), np.uint8)),
                                                             rng(0)) == []
    with pytest.raises(ValueError, match="label space"):
        Formatter("s3", {})(data["fixture_coco_panoptic"][0][0], data["fixture_coco_panoptic"][0][1], rng(0))


# --------------------------------------------------------------------------- issue 10, T10 small rules
def _gcg_answer(caption: str, phrases: list[Phrase], h: int = 10, w: int = 12) -> str:
    segs = [box_segment(i + 1, h, w, 0, 5, i, i + 1) for i in range(len(phrases))]
    s = hand_sample(Task.gcg, h, w, segs, gcg=GroundedCaption(caption=caption, phrases=phrases))
    (out,) = Formatter("s3", {})(s, encode_image(np.zeros((h, w, 3), np.uint8)), rng(0))
    return out.example.turns[0][1]


def test_gcg_caption_lowercased_offsets_kept():
    # gcgseg_dataset.py: caption.strip('"').strip().lower(); a char whose lowercase has another length
    # ("\u0130" -> 2 chars) is kept so the stored offsets stay valid
    a = _gcg_answer("The Red Car near \u0130stanbul Bay.", [Phrase(start=4, end=11, text="Red Car", segment_ids=[1]),
                                                         Phrase(start=17, end=25, text="\u0130stanbul", segment_ids=[2])])
    assert a.startswith("the <p>red car</p>  near <p>\u0130stanbul</p>  bay. ")


def test_gcg_one_extra_space_after_end_p():
    # gcgseg_map_fn.py tag_caption: f"{caption[:start]}<p>{phrase}</p> {caption[end:]}", .strip(), " " + answer
    a = _gcg_answer("a man rides a red bike.", [Phrase(start=2, end=5, text="man", segment_ids=[1]),
                                                Phrase(start=14, end=22, text="red bike", segment_ids=[2])])
    suffix = a.split("</p> . ", 1)[1]
    assert suffix in T.GCG_ANSWER_SUFFIXES
    assert a == f"a <p>man</p>  rides a <p>red bike</p> . {suffix}"


def test_gcg_overlap_rule_of_the_reference():
    # _remove_overlapping_intervals: sort by start (stable), keep x only if x.start > previous kept end:
    # a span starting exactly at the previous end is dropped; of two spans with one start the stored first wins
    caption = "blue skyline over the sea"
    phrases = [Phrase(start=0, end=8, text="blue sky", segment_ids=[1]),
               Phrase(start=8, end=12, text="line", segment_ids=[2]),  # touches: 8 > 8 is false -> dropped
               Phrase(start=18, end=25, text="the sea", segment_ids=[3]),
               Phrase(start=18, end=21, text="the", segment_ids=[4])]  # same start, stored later -> dropped
    a = _gcg_answer(caption, phrases)
    assert names_in(a) == ["blue sky", "the sea"]
    a = _gcg_answer(caption, [phrases[1], phrases[0]])  # sorted by start first: "blue sky" is kept, "line" not
    assert names_in(a) == ["blue sky"]


@pytest.mark.parametrize("task", [Task.generic_seg, Task.instance_seg])
def test_generic_crowd_only_categories_as_the_reference(task):
    # panoptic (generic_seg): crowd segments enter X-SAM's _sample_cats -> a crowd-only category is always
    # listed (no target); instance / semantic: crowd anns are dropped first -> it is only a negative candidate
    h, w = 8, 8
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["person", "car", "tree", "dog", "cat", "sky"])]
    segs = [box_segment(1, h, w, 0, 4, 0, 4, category_id=1),
            box_segment(2, h, w, 4, 8, 4, 8, category_id=2).model_copy(update={"iscrowd": 1})]
    s = hand_sample(task, h, w, segs, label_space="six")
    listed = 0
    for seed in range(200):  # a small num_class and no full list: the negative draw shows
        fmt = Formatter("s3", {"six": cats}, num_class=2, full_list_prob=0.0, seed=seed)
        (out,) = fmt(s, encode_image(np.zeros((h, w, 3), np.uint8)), rng(seed))
        names = names_in(out.example.turns[0][0])
        assert "person" in names and out.example.masks.shape[0] == 1 and names[out.example.labels[0]] == "person"
        listed += "car" in names
    if task is Task.generic_seg:
        assert listed == 200
    else:
        assert 0 < listed < 200  # drawn as a negative in some reads only
