"""The conversion job's guarantees: determinism, idempotence, incremental rebuild, crash and resume."""

import json
import os
from pathlib import Path

import pytest
from helpers import read_split

from xsam.data.convert import ShardResult, convert, write_shard
from xsam.data.fixtures import generate
from xsam.data.registry import load_registry
from xsam.data.shards import read_manifest


@pytest.fixture()
def fx(tmp_path):
    generate(tmp_path / "fx", ["coco_panoptic"])
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems
    return tmp_path, list(entries.values()), str(tmp_path / "fx" / "data")


def _files(out: str) -> dict[str, bytes]:
    root = Path(out)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tars(out: str) -> dict[str, bytes]:
    return {k: v for k, v in _files(out).items() if k.endswith(".tar")}


def test_rerun_gives_identical_bytes_and_sorted_members(fx):
    tmp, entries, data = fx
    convert(entries, data, str(tmp / "a"), max_samples=2, log=lambda _: None)
    convert(entries, data, str(tmp / "b"), max_samples=2, log=lambda _: None)
    a, b = _tars(str(tmp / "a")), _tars(str(tmp / "b"))
    assert len(a) >= 5 and a == b  # several shards per split, byte for byte the same
    import tarfile

    for name in a:
        with tarfile.open(tmp / "a" / name) as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == sorted(m.name for m in members)
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    ma = read_manifest(str(tmp / "a" / "_meta" / "fixture_coco_panoptic" / "train" / "manifest.json"))
    assert ma.num_samples == 6 and [s.num_samples for s in ma.shards] == [2, 2, 2]
    import hashlib

    for shard in ma.shards:
        data_bytes = (tmp / "a" / "fixture_coco_panoptic" / "train" / shard.name).read_bytes()
        assert hashlib.sha256(data_bytes).hexdigest() == shard.sha256 and len(data_bytes) == shard.bytes


def test_unchanged_source_does_no_work_and_changed_dataset_alone_rebuilds(fx):
    tmp, entries, data = fx
    out = str(tmp / "out")
    first = convert(entries, data, out, log=lambda _: None)
    assert {o.status for o in first} == {"converted"}
    before = {p: os.stat(Path(out) / p).st_mtime_ns for p in _files(out)}
    again = convert(entries, data, out, log=lambda _: None)
    assert {o.status for o in again} == {"up-to-date"}
    assert {p: os.stat(Path(out) / p).st_mtime_ns for p in _files(out)} == before

    # change the val annotations (drop the last image's annotation)
    ann = Path(data) / "coco_panoptic" / "annotations" / "panoptic_val.json"
    doc = json.loads(ann.read_text())
    doc["annotations"] = doc["annotations"][:-1]
    ann.write_text(json.dumps(doc))
    third = {(o.dataset, o.split): o for o in convert(entries, data, out, log=lambda _: None)}
    assert third[("fixture_coco_panoptic", "train")].status == "up-to-date"
    assert third[("fixture_coco_panoptic", "val")].status == "converted"
    assert third[("fixture_coco_semantic", "val")].status == "converted"
    assert third[("fixture_coco_panoptic", "val")].manifest.num_samples == 3
    assert len(read_split(out, "fixture_coco_panoptic", "val")) == 3


def test_crash_mid_job_then_rerun_completes_without_duplicates(fx):
    tmp, entries, data = fx
    reference = str(tmp / "reference")
    convert(entries, data, reference, max_samples=2, log=lambda _: None)
    out = str(tmp / "out")

    class Crash(Exception):
        pass

    def crashing_executor(specs):
        # the first two shards commit, the third is killed half-written, then the driver dies
        yield write_shard(specs[0])
        yield write_shard(specs[1])
        partial = Path(specs[2].location + ".tmp-deadbeef0000")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"half a tar")
        raise Crash()

    with pytest.raises(Crash):
        convert(entries, data, out, max_samples=2, executor=crashing_executor, log=lambda _: None)
    assert not list(Path(out).rglob("manifest.json"))  # nothing looks complete
    outcomes = convert(entries, data, out, max_samples=2, log=lambda _: None)
    assert sum(o.shards_kept for o in outcomes) == 2  # committed shards are not redone
    assert _tars(out) == _tars(reference)
    assert not [p for p in _files(out) if ".tmp-" in p]
    for o in outcomes:
        got = read_split(out, o.dataset, o.split)
        assert len(got) == o.manifest.num_read  # each sample exactly once


def test_damaged_committed_shard_is_rewritten(fx):
    tmp, entries, data = fx
    out = str(tmp / "out")
    convert(entries, data, out, max_samples=2, log=lambda _: None)
    good = _tars(out)
    split = Path(out) / "fixture_coco_panoptic" / "train"
    (Path(out) / "_meta" / "fixture_coco_panoptic" / "train" / "manifest.json").unlink()
    shard = split / "fixture_coco_panoptic-train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated after its commit record
    outcomes = {(o.dataset, o.split): o for o in convert(entries, data, out, max_samples=2, log=lambda _: None)}
    assert outcomes[("fixture_coco_panoptic", "train")].shards_written == 1
    assert _tars(out) == good


def test_shards_cut_by_bytes_and_stale_shards_removed(fx):
    tmp, entries, data = fx
    out = str(tmp / "out")
    convert(entries, data, out, max_bytes=1, log=lambda _: None)  # every sample alone
    m = read_manifest(str(Path(out) / "_meta" / "fixture_coco_panoptic" / "train" / "manifest.json"))
    assert [s.num_samples for s in m.shards] == [1] * 6
    convert(entries, data, out, log=lambda _: None)  # settings changed: one shard per split now
    m = read_manifest(str(Path(out) / "_meta" / "fixture_coco_panoptic" / "train" / "manifest.json"))
    assert len(m.shards) == 1
    left = sorted(p.name for p in (Path(out) / "fixture_coco_panoptic" / "train").rglob("*") if p.is_file())
    assert left == ["fixture_coco_panoptic-train-000000.tar"]  # the shards' folder holds tars only
    meta = Path(out) / "_meta" / "fixture_coco_panoptic" / "train"
    assert sorted(str(p.relative_to(meta)) for p in meta.rglob("*") if p.is_file()) == [
        "manifest.json", "parts/fixture_coco_panoptic-train-000000.json", "quarantine.jsonl"]


def test_shard_failure_fails_its_split_only(fx):
    tmp, entries, data = fx
    out = str(tmp / "out")

    def flaky(specs):
        for spec in specs:
            if spec.name.startswith("fixture_coco_semantic"):
                yield ShardResult(name=spec.name, fingerprint=spec.fingerprint, error="OSError: disk full")
            else:
                yield write_shard(spec)

    outcomes = {o.dataset: o for o in convert(entries, data, out, executor=flaky, log=lambda _: None)
                if o.split == "val"}
    assert outcomes["fixture_coco_semantic"].status == "failed"
    assert "disk full" in outcomes["fixture_coco_semantic"].error
    assert outcomes["fixture_coco_panoptic"].status == "converted"
    assert not (Path(out) / "_meta" / "fixture_coco_semantic" / "val" / "manifest.json").exists()


def test_replaced_image_of_same_size_rebuilds_its_split(fx):
    tmp, entries, data = fx
    out = str(tmp / "out")
    convert(entries, data, out, log=lambda _: None)
    image = sorted((Path(data) / "coco_panoptic" / "images" / "train").iterdir())[0]
    raw = bytearray(image.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size, other pixels (still decodes: a full decode checks every image)
    image.write_bytes(bytes(raw))
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    outcomes = {(o.dataset, o.split): o.status for o in convert(entries, data, out, log=lambda _: None)}
    assert outcomes == {("fixture_coco_panoptic", "train"): "converted", ("fixture_coco_panoptic", "val"): "up-to-date",
                        ("fixture_coco_semantic", "val"): "up-to-date"}
    sample_bytes = {img for _, img, _ in read_split(out, "fixture_coco_panoptic", "train").values()}
    assert bytes(raw) in sample_bytes


def test_a_split_whose_every_sample_is_quarantined_fails_and_keeps_the_earlier_shards(fx):
    from xsam.data.shards import manifest_location

    tmp, entries, data = fx
    out = str(tmp / "out")
    convert(entries, data, out, max_samples=2, log=lambda _: None)
    good = _tars(out)
    manifest = Path(manifest_location(out, "fixture_coco_panoptic", "train")).read_bytes()
    for image in (Path(data) / "coco_panoptic" / "images" / "train").iterdir():
        image.write_bytes(b"not an image at all")  # every train sample is now quarantined
    logged = []
    outcomes = {(o.dataset, o.split): o for o in convert(entries, data, out, max_samples=2, log=logged.append)}
    failed = outcomes[("fixture_coco_panoptic", "train")]
    assert failed.status == "failed" and failed.manifest is None
    assert "0 good samples: all 6 records were quarantined - top reasons:" in failed.error
    assert any(line.startswith("[convert] fixture_coco_panoptic/train: FAILED: 0 good samples") for line in logged)
    assert outcomes[("fixture_coco_panoptic", "val")].status == "up-to-date"
    assert _tars(out) == good  # no shard of the earlier run was replaced, its manifest still describes them
    assert Path(manifest_location(out, "fixture_coco_panoptic", "train")).read_bytes() == manifest
    quarantined = [json.loads(x) for x in (Path(out) / "_meta" / "fixture_coco_panoptic" / "train"
                                           / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantined) == 6 and quarantined[0]["reason"] in failed.error


def test_the_cli_exits_nonzero_for_a_split_with_no_good_sample(fx):
    import subprocess
    import sys

    tmp, _, data = fx
    for image in (Path(data) / "coco_panoptic" / "images" / "val").iterdir():
        image.write_bytes(b"garbage")
    res = subprocess.run([sys.executable, "-m", "xsam.pipelines.convert", "--registry", str(tmp / "fx" / "registry"),
                          "--data-root", data, "--output", str(tmp / "out"), "--serial"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED fixture_coco_panoptic/val: 0 good samples" in res.stderr
    assert "1 split(s) ready" in res.stdout  # the train split converted


def test_a_label_space_name_is_bound_to_one_category_list(tmp_path):
    from xsam.data.label_spaces import LabelSpaceClash
    from xsam.data.shards import manifest_location
    from xsam.train.shard_index import ShardIndex

    generate(tmp_path / "fx", ["coco_panoptic", "semantic_png"])
    registry = tmp_path / "fx" / "registry"
    png = registry / "fixture_semantic_png.yaml"
    png.write_text(png.read_text().replace("label_space: fixture_semantic_png", "label_space: fixture_coco_panoptic"))
    entries, problems = load_registry(registry)
    assert not problems
    data, out = str(tmp_path / "fx" / "data"), str(tmp_path / "out")
    # in one run: the later split fails, naming both datasets and the first differing category
    outcomes = {(o.dataset, o.split): o for o in convert(list(entries.values()), data, out, log=lambda _: None)}
    bad = outcomes[("fixture_semantic_png", "val")]
    assert bad.status == "failed" and "label space 'fixture_coco_panoptic' of fixture_semantic_png/val" in bad.error
    assert "differs from the one of fixture_coco_panoptic/train: category #0:" in bad.error
    assert not (Path(out) / "fixture_semantic_png").exists()  # refused before any shard was written
    assert {o.status for k, o in outcomes.items() if k[0] != "fixture_semantic_png"} == {"converted"}
    # in a later run, against what the output tree already binds
    (again,) = convert([entries["fixture_semantic_png"]], data, out, log=lambda _: None)
    assert again.status == "failed" and "fixture_coco_panoptic/" in again.error
    # training refuses a tree that binds one name twice (e.g. written before this check)
    ok_png = convert([entries["fixture_semantic_png"]], data, str(tmp_path / "other"), log=lambda _: None)
    assert ok_png[0].status == "converted"
    import shutil

    shutil.copytree(tmp_path / "other" / "fixture_semantic_png", Path(out) / "fixture_semantic_png")
    shutil.copytree(tmp_path / "other" / "_meta" / "fixture_semantic_png", Path(out) / "_meta" / "fixture_semantic_png")
    index = ShardIndex.build(out, [("fixture_coco_panoptic", "train"), ("fixture_semantic_png", "val")], cache=False)
    with pytest.raises(LabelSpaceClash, match="fixture_semantic_png/val differs from the one of "
                                              "fixture_coco_panoptic/train: category #0"):
        index.label_spaces()
    assert Path(manifest_location(out, "fixture_semantic_png", "val")).exists()
