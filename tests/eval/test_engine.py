"""The batched evaluation engine gives exactly what one query at a time gives (CPU, fp32): every
prediction (masks, labels, scores, generated text) and therefore every metric, on the fixture shards;
plus the protocol rules it evaluates (E2: every deduplicated sentence; E4: every ReasonSeg query with
the ignore mask), bf16 on the CPU, the prefetching and the progress line."""

import copy
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from helpers import convert_fixtures
from model_fixtures import gcg_example, tiny_model, tiny_tokenizer

from xsam.data import masks as rle
from xsam.data import storage
from xsam.data.schema import RLE, ImageInfo, Provenance, ReasoningQuery, Sample, Segment, Task
from xsam.data.shards import read_manifest
from xsam.eval.benchmark import GCG_MAX_NEW_TOKENS, Benchmark, referring_sentences
from xsam.eval.engine import Engine, one_at_a_time
from xsam.eval.engine_io import Progress, prefetched
from xsam.eval.gcg import GCGAccumulator
from xsam.model.batching import collate
from xsam.model.predict import Prediction, predict
from xsam.model.templates import gcg_question, with_image
from xsam.model.xsam import DecodeMode
from xsam.train.format_common import decode_image
from xsam.train.shard_index import ShardIndex

BENCHMARKS = ["fixture_refcoco/val", "fixture_grefcoco/testA", "fixture_reason_seg/val", "fixture_coco_panoptic/val",
              "fixture_coco_semantic/val", "fixture_coco_interactive/val", "fixture_coco_vgd/val"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    _, shards, _ = convert_fixtures(tmp, ["coco_panoptic", "refer", "labelme", "gcg_eval", "psalm_interactive",
                                          "coco_vgd"])
    tok = tiny_tokenizer(tmp / "tok")
    _, model = tiny_model(tok, "s3", seed=0)
    return shards, model.eval(), tok


def _load(shards: str, name: str):
    dataset, split = name.split("/")
    m = read_manifest(storage.join(shards, "_meta", dataset, split, "manifest.json"))
    bench = Benchmark(dataset, split, Task(m.task), m.categories)
    index = ShardIndex.build(shards, [(dataset, split)])
    raw = [(r.key, *index.read(r)) for r in index.refs[dataset]]
    return bench, index, raw


def _same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _assert_same_predictions(bench, model, tok, raw, engine, max_new_tokens=GCG_MAX_NEW_TOKENS, new=None):
    """Engine.predict against `predict` query by query (seeded per sample as Benchmark.evaluate seeds)
    -> (the engine's predictions, accumulators of the one-at-a-time predictions, of the engine's)."""
    samples = [(s, decode_image(b, s)) for _, s, b in raw]
    new = new or bench.new
    every, acc_ref, acc_got = [], new(), new()
    for (sample, image), (queries, preds) in zip(samples, engine.predict(bench, samples)):
        torch.manual_seed(bench.torch_seed(sample))
        refs = []
        for q, got in zip(queries, preds):
            r = q.request
            refs.append(predict(model, tok, image, r.task, r.prompt, r.prompt_masks, r.is_thing,
                                max_new_tokens=max_new_tokens, is_sentence=r.is_sentence))
            ref = refs[-1]
            assert np.array_equal(ref.masks, got.masks) and ref.labels == got.labels, (sample.image.id, r.prompt)
            assert ref.scores == got.scores and ref.text == got.text, (sample.image.id, r.prompt)
            every.append(got)
        bench.score(sample, queries, refs, acc_ref)
        bench.score(sample, queries, preds, acc_got)
    return every, acc_ref, acc_got


@pytest.mark.parametrize("name", BENCHMARKS)
def test_engine_equals_one_query_at_a_time(setup, name):
    shards, model, tok = setup
    bench, index, raw = _load(shards, name)
    # small batches: several images per encoder batch, several LLM / decoder batches per image batch
    engine = Engine(model, tok, image_batch=2, max_sequences=3, threads=2, prefetch=2)
    n = len(_assert_same_predictions(bench, model, tok, raw, engine)[0])
    ref, ref_pngs = one_at_a_time(bench, model, tok, raw, overlays=2)
    got, pngs = engine.score_shards(bench, index, index.refs[bench.dataset], overlays=2)
    r_ref, r_got = bench.result(ref), bench.result(got)
    assert _same_metrics(r_ref, r_got), (r_ref, r_got)
    assert r_got["n_images"] == len(raw) and r_got["n_queries"] == n > 0
    assert pngs == ref_pngs  # the same overlays (PNG bytes) of the same samples


def test_referring_queries_are_every_deduplicated_sentence(setup):
    """E2: every deduplicated lowercased sentence of every ref is one query."""
    shards, model, tok = setup
    assert referring_sentences(["The man", "the man", "A dog", "a dog ", "A DOG"]) == ["a dog", "a dog ", "the man"]
    for name in ("fixture_refcoco/val", "fixture_grefcoco/testA"):
        bench, index, raw = _load(shards, name)
        expected = sum(len({s.lower() for s in r.sentences}) for _, sample, _ in raw for r in sample.referring)
        assert expected > sum(len(sample.referring) for _, sample, _ in raw)  # more than one sentence per ref
        acc, _ = Engine(model, tok).score_shards(bench, index, index.refs[bench.dataset])
        assert bench.result(acc)["n_queries"] == expected == len(acc["ref"])
        queries = bench.queries(raw[0][1])
        assert [q.request.prompt for q in queries] == [s for r in raw[0][1].referring
                                                        for s in referring_sentences(r.sentences)]


def _reason_sample() -> Sample:
    h, w = 6, 8
    target = np.zeros((h, w), bool)
    target[1:5, 1:5] = True
    ignore = np.zeros((h, w), bool)
    ignore[0:3, 3:8] = True
    enc, area, box = rle.encode_with_stats(target)
    return Sample(dataset="d", split="val", task=Task.reasoning_seg,
                  image=ImageInfo(id="1", file_name="1.png", width=w, height=h, format="png"),
                  segments=[Segment(id=1, bbox=tuple(box), area=area, mask=RLE(**enc))],
                  reasoning=[ReasoningQuery(queries=["What holds water?", "the cup"], is_sentence=False,
                                            segment_ids=[1])],
                  ignore_mask=RLE(**rle.encode(ignore)),
                  provenance=Provenance(source_file="f", source_id="1", reader="labelme", reader_version=1))


def test_reasonseg_every_query_with_the_ignore_mask():
    """E4: every query, the reasoning template (is_sentence kept), ignore pixels out of pred AND GT."""
    sample = _reason_sample()
    bench = Benchmark("d", "val", Task.reasoning_seg, None)
    queries = bench.queries(sample)
    assert [(q.request.task.value, q.request.prompt, q.request.is_sentence) for q in queries] == [
        ("reasoning", "What holds water?", False), ("reasoning", "the cup", False)]
    target, ignore = rle.decode(sample.segments[0].mask).astype(bool), rle.decode(sample.ignore_mask).astype(bool)
    everything = np.ones_like(target)
    preds = [Prediction(q.request.task, m[None], [q.request.prompt], [1.0]) for q, m in zip(queries, [everything, target])]
    acc = bench.new()
    bench.score(sample, queries, preds, acc)
    keep = ~ignore
    inter = (everything & target & keep).sum() + (target & keep).sum()
    union = ((everything | target) & keep).sum() + (target & keep).sum()
    result = bench.result(acc)
    assert result["ciou"] == pytest.approx(100.0 * inter / union)
    assert result["giou"] == pytest.approx(50.0 * ((target & keep).sum() / keep.sum() + 1.0))
    assert result["n_queries"] == 2 and result["n_images"] == 1


@pytest.fixture(scope="module")
def gcg_model(setup):
    """A tiny model overfitted on one GCG answer, so greedy generation gives <p>...</p> phrases to decode."""
    _, _, tok = setup
    cfg, model = tiny_model(tok, "s3", seed=1)
    ex = gcg_example(1)
    ex.turns = [(with_image(gcg_question(0)), ex.turns[0][1])]
    batch = collate([ex], DecodeMode.per_sample, tok, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    torch.manual_seed(0)
    for _ in range(150):
        losses, _ = model(batch)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    return model.eval()


def test_gcg_generation_batched_with_the_kv_cache_is_identical(setup, gcg_model):
    shards, _, tok = setup
    bench, _, raw = _load(shards, "fixture_gcg_eval/val")
    engine = Engine(gcg_model, tok, image_batch=3, max_sequences=2, max_new_tokens=32)
    # the texts are compared as they are; the metrics without METEOR / CIDEr (seconds of Java each)
    new = lambda: {**bench.new(), "gcg": GCGAccumulator(caption_metrics=False)}
    preds, ref, got = _assert_same_predictions(bench, gcg_model, tok, raw, engine, max_new_tokens=32, new=new)
    assert len(preds) == len(raw) and all(p.text for p in preds)
    assert sum(len(p.labels) for p in preds) > 0  # phrases were generated and their pass decoded
    assert _same_metrics(bench.result(ref), bench.result(got))


def test_bf16_on_the_cpu_gives_finite_metrics(setup):
    shards, model, tok = setup
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert bf16.compute_dtype is torch.bfloat16
    for name in ("fixture_refcoco/val", "fixture_coco_panoptic/val", "fixture_coco_interactive/val"):
        bench, index, raw = _load(shards, name)
        acc, _ = Engine(bf16, tok).score_shards(bench, index, index.refs[bench.dataset])
        result = bench.result(acc)
        assert math.isfinite(result[bench.primary]) and result["n_images"] == len(raw), (name, result)


def test_prefetch_keeps_order_and_raises_where_it_belongs():
    assert list(prefetched(range(20), lambda k: k * k, threads=3, ahead=4)) == [k * k for k in range(20)]
    assert list(prefetched(range(5), str, threads=0)) == ["0", "1", "2", "3", "4"]

    def load(k):
        if k == 3:
            raise ValueError("bad sample 3")
        return k

    it = prefetched(range(10), load, threads=2, ahead=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad sample 3"):
        next(it)


def test_progress_line_per_benchmark():
    out = io.StringIO()
    p = Progress("fixture_refcoco/val", 10, every_s=1e-9, stream=out)
    p.update(4, 30)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[eval] fixture_refcoco/val: 4/10 images, 30 queries")
    assert lines[1].endswith("(done)")
    quiet = io.StringIO()
    q = Progress("x", 3, every_s=None, stream=quiet)
    q.update(3, 3)
    q.close()
    assert quiet.getvalue() == ""
