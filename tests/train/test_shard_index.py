"""ShardIndex: tar-header offsets read back the same bytes as the real webdataset reader."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import convert_fixtures, read_split

from xsam.data.shards import iter_tar, shard_urls
from xsam.train import shard_index as si
from xsam.train.shard_index import SampleRef, ShardIndex

SPLITS = [("fixture_coco_panoptic", "train"), ("fixture_coco_panoptic", "val"), ("fixture_refcoco", "train"),
          ("fixture_llava_mix665k", "train"), ("fixture_coco_vgd", "train")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shard_index")
    _, out, outcomes = convert_fixtures(tmp, ["coco_panoptic", "refer", "llava", "coco_vgd"], max_samples=2,
                                        log=lambda _: None)
    assert all(o.status == "converted" for o in outcomes), outcomes
    return out


def test_every_sample_matches_the_webdataset_reader(converted):
    index = ShardIndex.build(converted, SPLITS)
    # two splits of one dataset: one list, splits in the order given, each in key order
    assert index.datasets == ["fixture_coco_panoptic", "fixture_refcoco", "fixture_llava_mix665k",
                              "fixture_coco_vgd"]
    total = 0
    for dataset, split in SPLITS:
        expected = read_split(converted, dataset, split)  # source_id -> (sample, image bytes, ext)
        refs = [r for r in index.refs[dataset] if r.split == split]
        assert len(refs) == len(expected) == index.manifest(dataset, split).num_samples
        keys = [key for url in shard_urls(converted, dataset, split) for key, *_ in iter_tar(url)]
        assert [r.key for r in refs] == sorted(keys)
        for ref in refs:
            sample, image = index.read(ref)
            want_sample, want_image, want_ext = expected[sample.provenance.source_id]
            assert image == want_image
            assert ref.image_ext == want_ext
            assert sample == want_sample
            assert (sample.dataset, sample.split) == (ref.dataset, ref.split) == (dataset, split)
            total += 1
    assert total == len(index) == sum(index.counts().values())
    assert len({r.shard for refs in index.refs.values() for r in refs}) > len(SPLITS)  # several shards per split
    index.close()


def test_stream_walk_equals_seek_walk(converted):
    seek = ShardIndex.build(converted, SPLITS, headers="seek", threads=1)
    stream = ShardIndex.build(converted, SPLITS, headers="stream", threads=4)
    assert seek.refs == stream.refs
    assert seek.fingerprint() == stream.fingerprint()


def test_manifests_label_spaces_and_fingerprint(converted):
    index = ShardIndex.build(converted, SPLITS)
    m = index.manifest("fixture_coco_panoptic", "train")
    assert m.label_space == "fixture_coco_panoptic" and m.categories
    assert index.label_spaces()["fixture_coco_panoptic"] == m.categories
    with pytest.raises(KeyError):
        index.manifest("fixture_coco_panoptic")  # two splits: must name one
    assert index.manifest("fixture_refcoco").split == "train"
    fp = index.fingerprint()
    assert len(fp) == 64 and fp == ShardIndex.build(converted, SPLITS).fingerprint()
    assert fp != ShardIndex.build(converted, SPLITS[:2]).fingerprint()
    changed = dict(index.manifests)
    key = ("fixture_refcoco", "train")
    shards = [s.model_copy(update={"sha256": "0" * 64}) if i == 0 else s
              for i, s in enumerate(changed[key].shards)]
    changed[key] = changed[key].model_copy(update={"shards": shards})
    assert si._fingerprint(changed) != fp


def test_cache_is_used_only_when_it_matches(converted, tmp_path, monkeypatch):
    cache = str(tmp_path / "index.json")
    built = ShardIndex.build(converted, SPLITS, cache=cache)

    def no_walk(*a, **k):
        raise AssertionError("walked the shards despite a valid cache")

    monkeypatch.setattr(si, "_walk_shard", no_walk)
    loaded = ShardIndex.build(converted, SPLITS, cache=cache)
    assert loaded.refs == built.refs and loaded.fingerprint() == built.fingerprint()
    ref = loaded.refs["fixture_refcoco"][0]
    assert loaded.read(ref)[1] == built.read(ref)[1]
    with pytest.raises(AssertionError, match="despite"):  # other splits: the cache does not match
        ShardIndex.build(converted, SPLITS[:2], cache=cache)
    (tmp_path / "index.json").write_text("{not json")
    monkeypatch.undo()
    assert ShardIndex.build(converted, SPLITS, cache=cache).refs == built.refs  # corrupt cache: rebuilt


def test_pickle_and_concurrent_reads(converted):
    index = ShardIndex.build(converted, SPLITS)
    refs = [r for lst in index.refs.values() for r in lst]
    want = [index.read_raw(r) for r in refs]
    copy = pickle.loads(pickle.dumps(index))  # open files are not pickled
    assert copy.refs == index.refs
    small = ShardIndex(copy.root, copy.refs, copy.manifests, open_files=2)  # forces evictions
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(copy.read_raw, refs)) == want
        assert [small.read_raw(r) for r in refs * 2] == want * 2
    assert isinstance(refs[0], SampleRef) and not hasattr(refs[0], "__dict__")  # slots: small


def test_missing_split_names_the_manifest(converted):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardIndex.build(converted, [("fixture_refcoco", "nope")])
