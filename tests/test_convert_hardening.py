"""Issue 13: a sample can never hang or kill a conversion, a rerun never replaces good shards with worse
ones silently, one bad annotation file fails only its dataset, a damaged shard is never trusted."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from xsam.data import masks
from xsam.data.convert import convert
from xsam.data.errors import SampleError
from xsam.data.fixtures import generate
from xsam.data.readers.base import ConvertSettings
from xsam.data.registry import load_registry
from xsam.data.shards import manifest_location

PAN = "fixture_coco_panoptic"
INST = "fixture_coco_instances"


def _fx(tmp_path, formats):
    generate(tmp_path / "fx", formats)
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems
    return entries, str(tmp_path / "fx" / "data"), str(tmp_path / "out")


def _run(entries, data, out, **kw):
    return {(o.dataset, o.split): o for o in convert(list(entries.values()), data, out, log=lambda _: None, **kw)}


def _tars(out) -> dict[str, bytes]:
    """The shards readers see (not the staged tars of a split that failed its checks)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*.tar"))
            if "_meta" not in p.parts}


def _temps(out) -> list[str]:
    return [str(p) for p in Path(out).rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- 1. a sample cannot kill the job


@pytest.mark.parametrize("value", [1e300, 1e8, -5e7])
def test_polygon_far_outside_the_image_is_quarantined_before_rasterising(tmp_path, value):
    entries, data, out = _fx(tmp_path, ["coco_instances"])
    ann = Path(data) / "coco_instances" / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    poly = next(i for i, a in enumerate(doc["annotations"]) if isinstance(a["segmentation"], list))
    doc["annotations"][poly]["segmentation"][0][2] = value  # serially this was a segfault (1e300) or GBs
    ann.write_text(json.dumps(doc))
    o = _run(entries, data, out)[(INST, "train")]
    assert o.status == "converted" and o.manifest.num_quarantined == 1
    (q,) = [json.loads(x) for x in Path(manifest_location(out, INST, "train")).with_name("quarantine.jsonl")
            .read_text().splitlines()]
    assert q["field"] == f"annotations.{poly}.segmentation.0" and q["file"].endswith("instances_train.json")
    assert "outside the" in q["reason"] and str(doc["annotations"][poly]["image_id"]) == q["source_id"]


def test_polygon_edges_are_bounded_in_total():
    zigzag = [float(v) for i in range(4000) for v in ((0, 0) if i % 2 else (99, 99))]  # 2000 diagonals
    masks.rle_from_source([zigzag[:8]], 100, 100, field="s")  # a small one is fine
    with pytest.raises(SampleError, match="edges total") as e:
        masks.rle_from_source([zigzag] * 20, 100, 100, field="s")
    assert e.value.field == "s"
    with pytest.raises(SampleError, match=r"vertex \(250, 3\)") as e:
        masks.rle_from_source([[0, 0, 250, 3, 5, 5]], 100, 100, field="seg")  # > 1 image width outside
    assert e.value.field == "seg.0"
    assert masks.decode(masks.rle_from_source([[-99, -99, 199, 0, 0, 199]], 100, 100, field="s")).any()


def test_a_shard_task_whose_worker_keeps_dying_fails_its_split_only_on_ray(tmp_path):
    """Real local Ray: the worker converting one sample dies (SIGKILL) on every attempt. The task is
    retried a bounded number of times, its split fails naming the shard's samples, the other splits
    get their manifests, and no temporary file is left."""
    import ray
    from dying_reader import swap_reader

    from xsam.pipelines.convert import SHARD_TASK_RETRIES, ray_executor

    entries, data, out = _fx(tmp_path, ["coco_panoptic"])
    doc = json.loads((Path(data) / "coco_panoptic" / "annotations" / "panoptic_train.json").read_text())
    victim = str(doc["images"][3]["id"])

    def executor(specs):
        for spec in specs:
            if spec.name.startswith(f"{PAN}-train-"):
                spec.reader = swap_reader(spec.reader, victim)
        return ray_executor(specs)

    tests_dir = str(Path(__file__).parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests_dir, *sys.path[1:]])}})
    try:
        outcomes = {(o.dataset, o.split): o for o in convert(
            list(entries.values()), data, out, executor=executor, max_samples=2, log=lambda _: None)}
    finally:
        ray.shutdown()
    failed = outcomes[(PAN, "train")]
    assert failed.status == "failed" and failed.manifest is None
    assert f"failed {SHARD_TASK_RETRIES + 1} times" in failed.error
    assert f"source id '{victim}'" in failed.error and "2 sample(s)" in failed.error
    assert {k: o.status for k, o in outcomes.items() if k != (PAN, "train")} == {
        (PAN, "val"): "converted", ("fixture_coco_semantic", "val"): "converted"}
    assert not Path(manifest_location(out, PAN, "train")).exists()
    assert not _temps(out)


# ---------------------------------------------------------------- 2. no silent loss on a rerun


def test_rerun_with_the_sources_offline_fails_and_keeps_the_shards(tmp_path):
    entries, data, out = _fx(tmp_path, ["coco_panoptic"])
    _run(entries, data, out, max_samples=2)
    good, manifest = _tars(out), Path(manifest_location(out, PAN, "train")).read_bytes()
    images = Path(data) / "coco_panoptic" / "images" / "train"
    images.rename(images.with_name("train-offline"))
    o = _run(entries, data, out, max_samples=2)
    assert o[(PAN, "train")].status == "failed"
    assert "none of the 6 images of the split exists" in o[(PAN, "train")].error
    assert str(images) in o[(PAN, "train")].error
    assert o[(PAN, "val")].status == "up-to-date"
    assert _tars(out) == good and Path(manifest_location(out, PAN, "train")).read_bytes() == manifest
    shutil.move(Path(data) / "coco_panoptic", Path(data) / "elsewhere")  # the whole source folder
    o = _run(entries, data, out, max_samples=2)
    assert {x.status for x in o.values()} == {"failed"}
    assert "the source folder does not exist" in o[(PAN, "val")].error
    assert _tars(out) == good


def test_a_split_that_shrinks_below_half_fails_unless_allowed(tmp_path):
    entries, data, out = _fx(tmp_path, ["coco_panoptic"])
    _run(entries, data, out, max_samples=2)
    good = _tars(out)
    images = sorted((Path(data) / "coco_panoptic" / "images" / "train").iterdir())
    for image in images[:4]:  # 2 of 6 samples stay good
        image.write_bytes(b"not an image")
    o = _run(entries, data, out, max_samples=2)[(PAN, "train")]
    assert o.status == "failed"
    assert "2 good samples, fewer than 50% of the 6 of the previous conversion (4 quarantined" in o.error
    assert "--allow-shrink" in o.error
    assert _tars(out) == good and not _temps(out)
    o = _run(entries, data, out, max_samples=2, settings=ConvertSettings(allow_shrink=True))[(PAN, "train")]
    assert o.status == "converted" and (o.manifest.num_samples, o.manifest.num_quarantined) == (2, 4)
    assert not list((Path(out) / "_meta" / PAN / "train" / "staging").glob("*"))


def test_an_empty_split_fails_unless_its_entry_allows_it_and_is_refused_downstream(tmp_path):
    from xsam.pipelines.evaluate import discover_benchmarks
    from xsam.train.shard_index import EmptySplit, ShardIndex

    entries, data, out = _fx(tmp_path, ["coco_panoptic"])
    ann = Path(data) / "coco_panoptic" / "annotations" / "panoptic_val.json"
    doc = json.loads(ann.read_text())
    ann.write_text(json.dumps({**doc, "images": [], "annotations": []}))
    o = _run(entries, data, out)[(PAN, "val")]
    assert o.status == "failed" and "the source has no sample" in o.error
    registry = tmp_path / "fx" / "registry" / f"{PAN}.yaml"
    registry.write_text(registry.read_text().replace("role: eval", "role: eval\n    allow_empty: true", 1))
    entries, problems = load_registry(tmp_path / "fx" / "registry")
    assert not problems and entries[PAN].split_spec("val").allow_empty
    o = _run(entries, data, out)[(PAN, "val")]
    assert o.status == "converted" and (o.manifest.num_samples, o.manifest.shards) == (0, [])
    with pytest.raises(EmptySplit, match=f"{PAN}/val .*have no sample"):
        ShardIndex.build(out, [(PAN, "train"), (PAN, "val")])
    with pytest.raises(ValueError, match=f"benchmark {PAN}/val: the converted split has no sample"):
        discover_benchmarks(out, None, seed=0)


# ---------------------------------------------------------------- 3. one bad file fails its dataset only


@pytest.mark.parametrize("value", [2000.0, True])  # written as 2000.0 / true; lax parsing took them for ints
def test_an_image_id_must_be_a_json_integer_or_string(tmp_path, value):
    entries, data, out = _fx(tmp_path, ["coco_instances"])
    ann = Path(data) / "coco_instances" / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    doc["images"][0]["id"] = value
    ann.write_text(json.dumps(doc))
    o = _run(entries, data, out)[(INST, "train")]
    assert o.status == "converted"
    rows = [json.loads(x) for x in Path(manifest_location(out, INST, "train")).with_name("quarantine.jsonl")
            .read_text().splitlines()]
    refused = [q for q in rows if q["field"] and q["field"].startswith("images.0.id")]
    assert refused and refused[0]["file"].endswith("instances_train.json"), rows


@pytest.mark.parametrize("payload,reason", [
    ("9" * 5000, "unreadable JSON value: Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
])
def test_an_annotation_file_the_parser_cannot_take_fails_only_its_dataset(tmp_path, payload, reason):
    entries, data, out = _fx(tmp_path, ["coco_instances", "coco_panoptic"])
    ann = Path(data) / "coco_instances" / "annotations" / "instances_train.json"
    ann.write_text(ann.read_text()[:-1] + f', "x": {payload}}}')
    o = _run(entries, data, out)
    assert o[(INST, "train")].status == "failed"
    assert reason in o[(INST, "train")].error and str(ann) in o[(INST, "train")].error
    assert {k: x.status for k, x in o.items() if k != (INST, "train")} == dict.fromkeys(
        [(INST, "val"), (PAN, "train"), (PAN, "val"), ("fixture_coco_semantic", "val")], "converted")


# ---------------------------------------------------------------- 4. shard integrity


def test_a_damaged_shard_is_found_by_verify_and_the_index_and_rebuilt_by_the_converter(tmp_path, capsys):
    from xsam.pipelines.convert import main
    from xsam.train.shard_index import DamagedShard, ShardIndex

    entries, data, out = _fx(tmp_path, ["coco_panoptic"])
    _run(entries, data, out, max_samples=2)
    good = _tars(out)
    assert main(["--verify", "--output", out]) == 0
    assert "7 shard(s) checked, 0 bad" in capsys.readouterr().out
    shard = Path(out) / PAN / "train" / f"{PAN}-train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # one bit, same size: only the sha256 can tell
    shard.write_bytes(bytes(raw))
    assert main(["--verify", "--output", out]) == 1
    err = capsys.readouterr().err
    assert f"BAD {shard}: sha256" in err and err.count("BAD") == 1
    with pytest.raises(DamagedShard, match=f"{shard}: damaged shard"):
        ShardIndex.build(out, [(PAN, "train")], cache=False)
    o = _run(entries, data, out, max_samples=2)
    assert o[(PAN, "train")].status == "converted" and o[(PAN, "train")].shards_written == 1
    assert o[(PAN, "val")].status == "up-to-date"
    assert _tars(out) == good
    assert len(ShardIndex.build(out, [(PAN, "train")], cache=False)) == 6
    assert np.all([main(["--verify", "--output", out]) == 0])
