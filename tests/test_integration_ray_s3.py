"""The real job end to end: the CLI on a local Ray, Ray Data reading the shards back, and an S3
round trip against a moto server on loopback started and stopped here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xsam.data.fixtures import generate
from xsam.data.schema import Sample

from helpers import start_moto  # tests/ is on sys.path (conftest)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "pipelines" / "convert.py")]



@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fx")
    generate(tmp, ["coco_panoptic"])
    return tmp


@pytest.fixture(scope="module")
def local_run(fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = subprocess.run(CONVERT + ["--registry", str(fixtures / "registry"), "--data-root", str(fixtures / "data"),
                                     "--output", str(out), "--num-cpus", "2", "--max-samples-per-shard", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_cli_on_local_ray_shows_progress_and_summary(local_run):
    out, proc = local_run
    assert "3 split(s) ready (14 samples, 0 quarantined), 0 failed" in proc.stdout
    assert "[convert] fixture_coco_panoptic/train: planned" in proc.stdout  # a line per split
    noise = [ln for ln in (proc.stdout + proc.stderr).splitlines() if not ln.startswith("[convert]")]
    assert len(noise) <= 2, noise  # Ray's own INFO lines stay out of a normal run
    assert len(list(out.rglob("*.tar"))) == 7


def test_ray_data_reads_the_shards(local_run):
    import ray

    out, _ = local_run
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        ds = ray.data.read_webdataset(str(out / "fixture_coco_panoptic" / "train"), decoder=None,
                                      file_extensions=["tar"])
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert len(rows) == 6
    for row in rows:
        sample = Sample.from_json_bytes(row["json"])
        assert row["__key__"] and sample.split == "train" and len(sample.segments) >= 1
        assert row["image"][:3] == b"\xff\xd8\xff"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    proc, endpoint, client = start_moto("xsam")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1"}
    yield client, env
    proc.terminate()
    proc.wait(timeout=10)


def test_s3_round_trip_matches_local_bytes(s3, fixtures, local_run):
    client, env = s3
    data = fixtures / "data"
    for path in data.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "xsam", f"sources/{path.relative_to(data)}")
    run_env = {**os.environ, **env}
    args = CONVERT + ["--registry", str(fixtures / "registry"), "--data-root", "s3://xsam/sources",
                      "--output", "s3://xsam/shards", "--num-cpus", "2", "--max-samples-per-shard", "2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=run_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local_out, _ = local_run
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="xsam", Prefix="shards/")["Contents"])
    tars = [k for k in keys if k.endswith(".tar")]
    assert len(tars) == 7 and not [k for k in keys if ".tmp-" in k]
    for key in tars:
        remote = client.get_object(Bucket="xsam", Key=key)["Body"].read()
        assert remote == (local_out / key.removeprefix("shards/")).read_bytes(), key
    assert "shards/_meta/fixture_coco_panoptic/val/manifest.json" in keys

    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=run_env)
    assert again.returncode == 0 and again.stdout.count("up to date") == 3
