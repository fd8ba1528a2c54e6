"""Loader: resume from state() reproduces the uninterrupted run; ranks cover an epoch without duplicates."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers import convert_fixtures

from xsam.data.images import UndecodableImage
from xsam.train.formatting import Formatter, collate_s1, decode_image
from xsam.train.loader import Loader
from xsam.train.sampling import Schedule
from xsam.train.shard_index import ShardIndex

SPLITS = [("fixture_coco_panoptic", "train"), ("fixture_refcoco", "train"), ("fixture_llava_mix665k", "train"),
          ("fixture_coco_vgd", "train")]
SEED = 11


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    _, out, outcomes = convert_fixtures(tmp, ["coco_panoptic", "refer", "llava", "coco_vgd"], max_samples=2,
                                        log=lambda _: None)
    assert all(o.status == "converted" for o in outcomes)
    idx = ShardIndex.build(out, SPLITS)
    yield idx
    idx.close()


def fmt(sample, image, rng):
    """One item per referring expression (several per sample), else one; records the rng draw."""
    n, draw = max(1, len(sample.referring)), int(rng.integers(2**62))
    return [(sample.dataset, sample.provenance.source_id, k, draw, len(image)) for k in range(n)]


def collate(items):
    return tuple(items)


def schedule(index, world_size=2, seed=SEED):
    return Schedule(index.counts(), t=0.5, batch_per_rank=2, world_size=world_size, seed=seed)


def run(loader, limit=None):
    out = []
    for item in loader:
        out.append(item)
        if limit is not None and len(out) == limit:
            break
    return out


def test_schedule_has_repeats(index):
    s = schedule(index)
    assert any(r > 1 and r != int(r) for r in s.repeat_factors().values())
    assert min(s.steps_per_epoch(e) for e in range(3)) > 3


@pytest.mark.parametrize("prefetch,threads", [(0, 1), (3, 2)])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(index, prefetch, threads):
    s = schedule(index)
    full = run(Loader(index, s, 1, fmt, collate, SEED, num_epochs=2))
    steps = [s.steps_per_epoch(0), s.steps_per_epoch(1)]
    assert [p for p, _, _ in full] == [(e, k) for e in range(2) for k in range(steps[e])]  # crosses epochs

    first = Loader(index, s, 1, fmt, collate, SEED, num_epochs=2, prefetch=prefetch, threads=threads)
    assert first.state() == (0, 0) and len(first) == len(full)
    cut = steps[0] // 2 + 1
    head = run(first, limit=cut)
    assert first.state() == (0, cut)  # what was yielded, not what was prefetched
    # a fresh process: new index object, new schedule object, start from the stored state
    resumed = Loader(index, schedule(index), 1, fmt, collate, SEED, start=first.state(), num_epochs=2,
                     prefetch=prefetch, threads=threads)
    assert len(resumed) == len(full) - cut
    tail = run(resumed)
    assert head + tail == full
    assert resumed.state() == (2, 0)

    # resuming exactly at an epoch boundary, given as (epoch, steps) or (epoch + 1, 0)
    at_end = Loader(index, s, 1, fmt, collate, SEED, start=(0, steps[0]), num_epochs=2)
    assert at_end.state() == (1, 0)
    assert run(at_end) == full[steps[0]:]


def test_two_ranks_cover_the_epoch_without_duplicates_beyond_repeats(index):
    s = schedule(index)
    mult = s.multipliers()
    by_rank = [run(Loader(index, s, r, fmt, collate, SEED, num_epochs=1)) for r in range(2)]
    assert [p for p, _, _ in by_rank[0]] == [p for p, _, _ in by_rank[1]]
    seen = {d: Counter() for d in index.counts()}
    draws = set()
    for (p0, d0, b0), (p1, d1, b1) in zip(*by_rank):
        assert d0 == d1  # single-task steps on both ranks
        for dataset, sid, k, draw, _ in b0 + b1:
            assert dataset == d0
            if k == 0:
                seen[dataset][sid] += 1
            draws.add(draw)
    for dataset, n in index.counts().items():
        sid = [index.read(r)[0].provenance.source_id for r in index.refs[dataset]]
        assert set(seen[dataset]) == set(sid)  # every sample of every dataset in the epoch
        # exactly what the schedule holds (balancing draws + tail padding), nothing twice across ranks
        planned = Counter(sid[i] for gb in s.epoch(0) if gb.dataset == dataset for i in gb.indices)
        assert seen[dataset] == planned
        # the balancing draws alone: every sample floor(m) or floor(m) + 1 times
        # (the fixture sets are smaller than the padding, so the padding may add more; see test_sampling)
        lo = math.floor(mult[dataset])
        balanced = Counter(i for gb in s.epoch(0) if gb.dataset == dataset for i in gb.indices[:4 - gb.pad])
        assert all(lo <= balanced[i] <= lo + 1 for i in range(n)), (dataset, balanced, mult[dataset])
    # per-sample rng: a different stream at every (epoch, global position), items of one sample share it
    n_items = sum(len(b) for run_ in by_rank for _, _, b in run_)
    n_samples = len(s.epoch(0)) * s.global_batch
    assert n_items > n_samples and len(draws) == n_samples


def test_same_position_same_content_other_seed_other_draws(index):
    s = schedule(index)
    a = Loader(index, s, 0, fmt, collate, SEED, num_epochs=1)
    pos = (0, 2)
    assert a.build(pos) == a.build(pos)
    other = Loader(index, s, 0, fmt, collate, SEED + 1, num_epochs=1).build(pos)
    assert [x[:3] for x in other[1]] == [x[:3] for x in a.build(pos)[1]]  # same samples (same schedule)
    assert [x[3] for x in other[1]] != [x[3] for x in a.build(pos)[1]]  # different per-read randomness


def test_errors_surface_at_their_batch(index):
    s = schedule(index)
    calls = []

    def bad(sample, image, rng):
        calls.append(1)
        if len(calls) > 6:
            raise RuntimeError("boom")
        return fmt(sample, image, rng)

    loader = Loader(index, s, 0, bad, collate, SEED, num_epochs=1, prefetch=2, threads=1)
    got = []
    with pytest.raises(RuntimeError, match="boom"):
        got.extend(loader)
    assert len(got) == 3 and loader.state() == (0, 3)  # 2 samples per batch: the 4th batch failed
    with pytest.raises(ValueError, match="not in the index"):
        Loader(index, Schedule({"nope": 3}), 0, fmt, collate, SEED)


def _assert_same_s1_batches(a, b):
    assert [(p, d) for p, d, _ in a] == [(p, d) for p, d, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b):
        assert x.raw and x.crops == y.crops
        assert all(torch.equal(i, j) and i.dtype == torch.uint8 for i, j in zip(x.images, y.images, strict=True))
        for s, t in zip(x.targets, y.targets, strict=True):
            assert torch.equal(s["labels"], t["labels"]) and torch.equal(s["masks"], t["masks"])
            assert s["masks"].dtype == torch.bool


def test_real_batches_are_the_same_with_threads_and_after_a_resume(index):
    """The real S1 formatter (decode, RLE, jitter draw) + collate_s1: 3 loader threads give the batches of
    1 thread without prefetch, also resumed mid-epoch; loader threads run torch single-threaded."""
    fmt = Formatter("s1", index.label_spaces(), sam_size=64)
    s = Schedule({"fixture_coco_panoptic": index.counts()["fixture_coco_panoptic"]}, t=0.5, batch_per_rank=2,
                 world_size=2, seed=SEED)
    torch_threads = []

    def collate_s1_recording(items):
        torch_threads.append(torch.get_num_threads())
        return collate_s1(items)

    main_threads = torch.get_num_threads()
    full = run(Loader(index, s, 1, fmt, collate_s1, SEED, num_epochs=2))
    assert len(full) >= 4
    threaded = Loader(index, s, 1, fmt, collate_s1_recording, SEED, num_epochs=2, prefetch=6, threads=3)
    head = run(threaded, limit=len(full) // 2 + 1)
    tail = run(Loader(index, s, 1, fmt, collate_s1_recording, SEED, start=threaded.state(), num_epochs=2,
                      prefetch=6, threads=3))
    _assert_same_s1_batches(head + tail, full)
    assert set(torch_threads) == {1} and torch.get_num_threads() == main_threads


def _break_huffman_table(jpeg: bytes) -> bytes:
    """The stored JPEG with its Huffman table overwritten: header and end marker intact (it passes the
    converter's quick probe), the image does not decode."""
    data = bytearray(jpeg)
    dht = data.index(b"\xff\xc4")
    data[dht + 5:dht + 21] = b"\xff" * 16
    return bytes(data)


def test_an_undecodable_image_is_replaced_on_every_rank_and_logged_once(index, caplog):
    """A stored image that does not decode (training's real decode) does not stop its rank: the sample is
    replaced by the next one of its dataset, the same wherever and however often it is drawn, every batch
    stays full, the output is the same with prefetch threads, and each rank logs the key once."""
    dataset = "fixture_coco_panoptic"
    refs = index.refs[dataset]
    bad_ref = refs[0]
    bad = index.read(bad_ref)[0].provenance.source_id
    after = index.read(refs[1])[0].provenance.source_id
    with pytest.raises(UndecodableImage, match=f"{dataset}/{bad}: image data does not decode"):
        decode_image(_break_huffman_table(index.read(bad_ref)[1]), index.read(bad_ref)[0])

    def decoding(sample, image, rng):
        if sample.dataset == dataset and sample.provenance.source_id == bad:
            image = _break_huffman_table(image)
        decode_image(image, sample)  # the formatter's decode
        return fmt(sample, image, rng)

    s = schedule(index)
    b = s.batch_per_rank
    caplog.set_level("WARNING", logger="xsam.train.loader")
    def warnings():
        found = [r.getMessage() for r in caplog.records if r.name == "xsam.train.loader"]
        caplog.clear()
        return found

    drawn, per_rank = 0, []
    for rank in range(2):
        caplog.clear()
        got = run(Loader(index, s, rank, decoding, collate, SEED, num_epochs=6))
        logged = warnings()
        assert run(Loader(index, s, rank, decoding, collate, SEED, num_epochs=6, prefetch=3, threads=2)) == got
        assert warnings() == logged  # one loader, one line per broken sample, whatever the threads
        on_rank = drawn
        for (epoch, step), d, batch in got:
            firsts = [item[1] for item in batch if item[2] == 0]
            assert len(firsts) == b and bad not in firsts  # a full batch, without the broken sample
            if d == dataset:
                for slot, i in enumerate(s.epoch(epoch)[step].indices[rank * b:(rank + 1) * b]):
                    if i == 0:
                        drawn += 1
                        assert firsts[slot] == after  # its replacement: the next sample of the dataset
        per_rank.append(drawn - on_rank)
        assert len(logged) == 1  # once, however often this rank drew it
        assert bad_ref.key in logged[0] and bad_ref.shard in logged[0] and "does not decode" in logged[0]
    assert min(per_rank) >= 1 and max(per_rank) > 1, per_rank  # drawn on both ranks, more than once
