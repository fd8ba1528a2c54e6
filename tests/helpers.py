"""Shared test helpers: generate fixture datasets, convert them, read the shards back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import webdataset as wds

from xsam.data import masks
from xsam.data.convert import SplitOutcome, convert, serial_executor
from xsam.data.fixtures import FixtureDataset, generate
from xsam.data.registry import load_registry
from xsam.data.schema import Sample
from xsam.data.shards import read_manifest, shard_urls, split_dir
from xsam.data import storage


def convert_fixtures(tmp: Path, formats: list[str], executor=serial_executor, **kwargs
                     ) -> tuple[dict[str, FixtureDataset], str, list[SplitOutcome]]:
    """Generate the fixtures of `formats` under tmp/fx, convert them to tmp/out (in process)."""
    made = generate(tmp / "fx", formats)
    entries, problems = load_registry(tmp / "fx" / "registry")
    assert not problems, problems
    out = str(tmp / "out")
    outcomes = convert(list(entries.values()), str(tmp / "fx" / "data"), out, executor=executor, **kwargs)
    return made, out, outcomes


def read_split(out: str, dataset: str, split: str) -> dict[str, tuple[Sample, bytes, str]]:
    """Read a converted split with the real `webdataset` reader: source_id -> (sample, image bytes, ext)."""
    urls = shard_urls(out, dataset, split)
    got: dict[str, tuple[Sample, bytes, str]] = {}
    for rec in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample = Sample.from_json_bytes(rec["json"])
        exts = [k for k in rec if k not in ("json", "__key__", "__url__", "__local_path__")]
        assert len(exts) == 1, exts
        assert sample.image.format == exts[0]
        assert sample.provenance.source_id not in got
        got[sample.provenance.source_id] = (sample, rec[exts[0]], exts[0])
    manifest = read_manifest(storage.join(split_dir(out, dataset, split), "manifest.json"))
    assert manifest.num_samples == len(got)
    return got


def mask_of(rle) -> np.ndarray:
    return masks.decode(rle).astype(bool)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(bucket: str, env: dict | None = None):
    """A moto S3 server on a free loopback port with `bucket` created -> (process, endpoint, boto3 client).
    The caller stops exactly that process (proc.terminate(); proc.wait())."""
    import subprocess
    import sys
    import time

    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    for _ in range(200):
        try:
            client.list_buckets()
            break
        except Exception:  # noqa: BLE001 - any failure means "not up yet"
            time.sleep(0.1)
    client.create_bucket(Bucket=bucket)
    return proc, endpoint, client
