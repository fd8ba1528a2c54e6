"""ShardIndex: tar-header offsets read back the same bytes as the real webdataset reader; the stored
index of each split is read instead of the shards when valid, and rebuilt when not."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import convert_fixtures, read_split

from xsam.data import storage
from xsam.data.shards import iter_tar, shard_urls
from xsam.train import index_cache
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
            assert ref.image_ext == "image" and want_ext == sample.image.format  # one image member name
            assert sample == want_sample
            assert (sample.dataset, sample.split) == (ref.dataset, ref.split) == (dataset, split)
            total += 1
    assert total == len(index) == sum(index.counts().values())
    assert len({r.shard for refs in index.refs.values() for r in refs}) > len(SPLITS)  # several shards per split
    index.close()


def test_stream_walk_equals_seek_walk(converted):
    seek = ShardIndex.build(converted, SPLITS, headers="seek", threads=1, cache=False)
    stream = ShardIndex.build(converted, SPLITS, headers="stream", threads=4, cache=False)
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


# ---------------------------------------------------------------- the stored index of each split


@pytest.fixture
def shards(converted, tmp_path):
    """A private copy of the converted shards without stored indexes (these tests write and damage them)."""
    return str(shutil.copytree(converted, tmp_path / "shards", ignore=shutil.ignore_patterns("index-*.bin")))


@pytest.fixture
def opened(monkeypatch):
    """Every location the storage layer resolves (each open, read, stat or write goes through it)."""
    seen: list[str] = []
    real = storage.resolve

    def spy(location):
        seen.append(location)
        return real(location)

    monkeypatch.setattr(storage, "resolve", spy)
    return seen


def index_files(root) -> list[Path]:
    return sorted(Path(root).glob("_meta/*/*/index-*.bin"))


def test_second_build_reads_one_stored_file_per_split_and_no_shard(shards, opened, monkeypatch):
    moves = []
    monkeypatch.setattr(storage, "move", lambda *a: moves.append(a))
    built = ShardIndex.build(shards, SPLITS)
    assert any(loc.endswith(".tar") for loc in opened), "the first build walks the shards"
    assert not moves, "the index is written straight to its final name"
    files = index_files(shards)
    assert len(files) == len(SPLITS)
    for dataset, split in SPLITS:  # beside its manifest, named by the digest of the manifest's bytes
        manifest = Path(shards, "_meta", dataset, split, "manifest.json")
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        assert Path(shards, "_meta", dataset, split, f"index-{digest}.bin") in files
    opened.clear()
    loaded = ShardIndex.build(shards, SPLITS)
    assert not [loc for loc in opened if loc.endswith(".tar")], "a shard was opened despite the stored index"
    assert {loc for loc in opened if "index-" in loc} == {str(f) for f in files}
    assert loaded.refs == built.refs and loaded.manifests == built.manifests
    assert loaded.fingerprint() == built.fingerprint()
    assert loaded.refs == ShardIndex.build(shards, SPLITS, cache=False, headers="stream").refs
    ref = loaded.refs["fixture_refcoco"][0]
    assert loaded.read(ref) == built.read(ref)
    tars = sum(f.stat().st_size for f in Path(shards).rglob("*.tar"))
    assert sum(f.stat().st_size for f in files) < tars / 20


def test_a_changed_manifest_is_indexed_again(shards, opened):
    built = ShardIndex.build(shards, SPLITS)
    manifest = Path(shards, "_meta", "fixture_refcoco", "train", "manifest.json")
    before = manifest.read_bytes()
    manifest.write_text(json.dumps(json.loads(before), indent=3) + "\n")  # same content, other bytes
    assert manifest.read_bytes() != before
    opened.clear()
    again = ShardIndex.build(shards, SPLITS)
    walked = {loc for loc in opened if loc.endswith(".tar")}
    assert walked and all("/fixture_refcoco/train/" in loc for loc in walked), "only the changed split"
    assert again.refs == built.refs
    assert len(list(Path(shards, "_meta", "fixture_refcoco", "train").glob("index-*.bin"))) == 2  # old + new digest


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_a_body_byte(data: bytes) -> bytes:
    i = len(data) - 40
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]


@pytest.mark.parametrize("damage", [_truncate, _flip_a_body_byte, lambda d: b"", lambda d: b"{not an index"],
                         ids=["truncated", "flipped-byte", "empty", "garbage"])
def test_a_damaged_index_is_rebuilt_never_trusted(shards, opened, damage):
    built = ShardIndex.build(shards, SPLITS)
    target = next(f for f in index_files(shards) if "fixture_coco_vgd" in str(f))
    target.write_bytes(damage(target.read_bytes()))
    opened.clear()
    again = ShardIndex.build(shards, SPLITS)
    assert {loc for loc in opened if loc.endswith(".tar")}, "the damaged split was walked again"
    assert again.refs == built.refs
    opened.clear()
    ShardIndex.build(shards, SPLITS)  # and its index was written again, whole
    assert not [loc for loc in opened if loc.endswith(".tar")]


def test_a_valid_index_of_another_split_is_not_trusted(shards, opened):
    built = ShardIndex.build(shards, SPLITS)
    (mine,) = Path(shards, "_meta", "fixture_coco_panoptic", "val").glob("index-*.bin")
    (other,) = Path(shards, "_meta", "fixture_coco_panoptic", "train").glob("index-*.bin")
    mine.write_bytes(other.read_bytes())  # intact checksum, wrong split / digest / shards
    opened.clear()
    assert ShardIndex.build(shards, SPLITS).refs == built.refs
    assert any("/fixture_coco_panoptic/val/" in loc and loc.endswith(".tar") for loc in opened)


def test_the_stored_index_round_trips_exactly(converted):
    index = ShardIndex.build(converted, SPLITS, cache=False)
    for dataset, split in SPLITS:
        refs = [r for r in index.refs[dataset] if r.split == split]
        directory = str(Path(converted, dataset, split))
        manifest, digest = index.manifest(dataset, split), "ab" * 32
        data = index_cache.encode(directory, dataset, split, manifest, digest, refs)
        assert index_cache.decode(data, directory, dataset, split, manifest, digest) == refs
        with pytest.raises(ValueError, match="manifest_sha256"):
            index_cache.decode(data, directory, dataset, split, manifest, "cd" * 32)


def test_cache_false_writes_nothing(shards):
    ShardIndex.build(shards, SPLITS, cache=False)
    assert not index_files(shards)


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


def test_records_after_expansion_reach_the_schedule(converted):
    """T1: the converter counts each sample's training records into the manifest (referring: min(prod, sum)
    of the objects' sentence counts), the index hands records / samples to the Schedule as `repeats`, so
    r_d = max(1, sqrt(t / f_d)) sees the expanded f_d; an old manifest without the count is counted by reading."""
    from xsam.data import expansion
    from xsam.data.shards import read_manifest, meta_dir, split_dir
    from xsam.train.sampling import Schedule

    index = ShardIndex.build(converted, SPLITS)
    by_reading: dict[str, int] = {}
    for d, refs in index.refs.items():
        by_reading[d] = sum(expansion.num_records(index.read(r)[0]) for r in refs)
    assert index.records() == by_reading
    counts = index.counts()
    assert by_reading["fixture_refcoco"] > counts["fixture_refcoco"]  # referring images expand
    assert all(by_reading[d] == counts[d] for d in counts if d != "fixture_refcoco")
    manifest = read_manifest(storage.join(meta_dir(converted, "fixture_refcoco", "train"), "manifest.json"))
    assert manifest.num_records == by_reading["fixture_refcoco"]
    assert sum(s.num_records for s in manifest.shards) == manifest.num_records

    sched = Schedule(counts, t=0.5, repeats=index.expansions())
    total = sum(by_reading.values())
    for d, n in by_reading.items():
        assert sched.repeat_factors()[d] == pytest.approx(max(1.0, (0.5 / (n / total)) ** 0.5))
        assert sched.expected_draws()[d] == pytest.approx(sched.repeat_factors()[d] * n)

    # a manifest written before records were counted: the index counts them by reading the samples
    old = ShardIndex(index.root, index.refs,
                     {k: m.model_copy(update={"num_records": None}) for k, m in index.manifests.items()})
    assert old.records() == by_reading
