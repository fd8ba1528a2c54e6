"""WebDataset shards: deterministic tar writing, the per-split manifest, and reading back.

Layout of one converted dataset split::

    <out>/<dataset>/<split>/<dataset>-<split>-000000.tar     shards, members sorted by key
    <out>/<dataset>/<split>/_parts/<dataset>-<split>-000000.json   per-shard commit record
    <out>/<dataset>/<split>/quarantine.jsonl                 rejected samples with reasons
    <out>/<dataset>/<split>/manifest.json                    written last: the split is complete

Tar members get mtime 0, uid/gid 0, no user names and mode 0644, in USTAR format, so the same
samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Iterator

from pydantic import BaseModel

from xsam.data import storage
from xsam.data.schema import SCHEMA_VERSION, Sample


class ShardInfo(BaseModel):
    name: str
    num_samples: int
    bytes: int
    sha256: str
    num_records: int | None = None  # training records after the recipe's expansion (xsam.data.expansion)


class Manifest(BaseModel):
    schema_version: str = SCHEMA_VERSION
    dataset: str
    split: str
    task: str
    format: str
    reader_version: int
    role: str
    label_space: str | None
    categories: list[dict] | None
    source_fingerprint: str
    num_read: int  # records found in the source (= num_samples + num_quarantined)
    num_samples: int
    num_quarantined: int
    # training records after the recipe's per-sample expansion (xsam.data.expansion; referring: one per
    # sentence combination); None in a manifest written before it was counted
    num_records: int | None = None
    excluded: dict[str, int]  # records the format's rules drop before reading (e.g. text-only chat)
    shards: list[ShardInfo]


def split_dir(output: str, dataset: str, split: str) -> str:
    return storage.join(output, dataset, split)


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def read_manifest(location: str) -> Manifest | None:
    if not storage.exists(location):
        return None
    return Manifest.model_validate_json(storage.read_bytes(location))


class _HashingWriter:
    """File-like wrapper counting and hashing what tarfile writes."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        self.raw.write(data)
        return len(data)


class ShardWriter:
    """Write samples (in key order) into one tar at a temporary name; `commit()` renames it."""

    def __init__(self, location: str):
        self.location = location
        self.tmp = storage.temp_name(location)
        self._raw = storage.open_output(self.tmp)
        self._out = _HashingWriter(self._raw)
        self._tar = tarfile.open(fileobj=self._out, mode="w|", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0
        self._last_key = ""

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, image_ext: str, image: bytes, record: bytes) -> None:
        if key <= self._last_key:
            raise ValueError(f"keys must be added in increasing order ({key!r} after {self._last_key!r})")
        self._last_key = key
        # members sorted by name within the sample: "<key>.jpg" < "<key>.json", "<key>.json" < "<key>.png"
        for name, data in sorted([(f"{key}.{image_ext}", image), (f"{key}.json", record)]):
            self._member(name, data)
        self.num_samples += 1

    def commit(self) -> ShardInfo:
        self._tar.close()
        self._raw.close()
        storage.move(self.tmp, self.location)
        return ShardInfo(name=self.location.rsplit("/", 1)[-1], num_samples=self.num_samples,
                         bytes=self._out.bytes, sha256=self._out.sha.hexdigest())

    def abort(self) -> None:
        try:
            self._tar.close()
            self._raw.close()
        finally:
            storage.delete(self.tmp)


def shard_urls(output: str, dataset: str, split: str) -> list[str]:
    """The shard locations of a converted split, in order, from its manifest."""
    directory = split_dir(output, dataset, split)
    manifest = read_manifest(storage.join(directory, "manifest.json"))
    if manifest is None:
        raise FileNotFoundError(f"{directory} has no manifest.json: convert the split first")
    return [storage.join(directory, s.name) for s in manifest.shards]


def iter_tar(location: str) -> Iterator[tuple[str, bytes, str, Sample]]:
    """Plain reader for tools and tests: yields (key, image bytes, image ext, sample)."""
    data = storage.read_bytes(location)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        members: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            if key not in members:
                members[key] = {}
                order.append(key)
            members[key][ext] = tar.extractfile(m).read()
    for key in order:
        parts = members[key]
        sample = Sample.from_json_bytes(parts.pop("json"))
        (ext, image), = parts.items()
        yield key, image, ext, sample


def json_line(obj: dict) -> str:
    """One JSONL line, ASCII-escaped so that lone surrogates from broken source text survive."""
    return json.dumps(obj, sort_keys=True)
