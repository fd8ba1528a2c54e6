"""Shared test helpers: generate fixture datasets, convert them, read the shards back; servers a test
starts (moto S3, a Ray head of its own) and stops itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from xsam.data import masks
from xsam.data.convert import SplitOutcome, convert, serial_executor
from xsam.data.fixtures import FixtureDataset, generate
from xsam.data.registry import load_registry
from xsam.data.schema import Sample
from xsam.data.shards import read_manifest, shard_urls, meta_dir, split_dir
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
        members = [k for k in rec if k not in ("json", "__key__", "__url__", "__local_path__")]
        assert members == ["image"], members  # one image member name, whatever the encoding
        assert sample.provenance.source_id not in got
        got[sample.provenance.source_id] = (sample, rec["image"], sample.image.format)
    manifest = read_manifest(storage.join(meta_dir(out, dataset, split), "manifest.json"))
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


# -- a Ray head of a test's own ---------------------------------------------------------------------------

RAY_CLI = str(Path(sys.executable).parent / "ray")


@dataclass(frozen=True)
class RayHead:
    """A Ray head a test started: its GCS address, its job API (dashboard) URL and its root process."""

    gcs: str
    dashboard: str
    proc: subprocess.Popen
    temp_dir: str


def process_tree(pid: int, marker: str | None = None) -> list:
    """The process `pid` and every process below it, plus (with `marker`) any process whose command line
    holds `marker` and the processes below those (a Ray process that left the tree) -> psutil.Process list.
    Collect before killing: a child whose parent dies first is reparented out of the tree."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    roots = []
    try:
        roots.append(psutil.Process(pid))
    except psutil.NoSuchProcess:
        pass
    if marker:
        roots += [p for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in p.info["cmdline"] or ())]
    for root in roots:
        procs[root.pid] = root
        try:
            procs.update((c.pid, c) for c in root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    procs.pop(os.getpid(), None)
    return list(procs.values())


def stop_processes(procs: list, grace_s: float = 10.0) -> None:
    """SIGTERM exactly these processes, SIGKILL the ones still alive after `grace_s`. Unlike `ray stop`,
    which ends every Ray process on the machine (other users' clusters, other tests' heads)."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


@contextmanager
def ray_head(env: dict | None = None, num_cpus: int = 2, timeout_s: float = 180.0) -> Iterator[RayHead]:
    """Start a Ray head of this test's own and stop exactly it on exit.

    `ray start --head --block` on free loopback ports (GCS, dashboard / job API, Ray client, dashboard
    agent: no fixed port another cluster on the machine may hold) with its own temp dir; --block keeps the
    `ray start` process as the root of every process the head starts, so stopping that tree (and anything
    naming the temp dir) ends this head and nothing else. Ready when `ray start` reports it started."""
    temp = tempfile.mkdtemp(prefix="xr-", dir="/tmp")  # short: Ray's unix socket paths live below it
    gcs, dash, client, agent = free_port(), free_port(), free_port(), free_port()
    log = Path(temp) / "ray-start.log"
    cmd = [RAY_CLI, "start", "--head", "--block", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--include-dashboard", "true", "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--num-cpus", str(num_cpus), "--temp-dir", temp]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up (exit {proc.poll()}):\n"
                                   + log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        yield RayHead(gcs=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", proc=proc, temp_dir=temp)
    finally:
        stop_processes(process_tree(proc.pid, marker=temp))
        shutil.rmtree(temp, ignore_errors=True)
