"""WebDataset shards: deterministic tar writing, the per-split manifest, and reading back.

Layout of a conversion output (layout version 2)::

    <out>/<dataset>/<split>/<dataset>-<split>-000000.tar           shards ONLY, members sorted by key
    <out>/_meta/<dataset>/<split>/manifest.json                    written last: the split is complete
    <out>/_meta/<dataset>/<split>/quarantine.jsonl                 rejected samples with reasons
    <out>/_meta/<dataset>/<split>/parts/<dataset>-<split>-000000.json   per-shard commit record
    <out>/_meta/<dataset>/<split>/staging/<dataset>-<split>-000000.tar  a new tar until its split commits
    <out>/_meta/<dataset>/<split>/index-<sha256>.bin               the training index cache

Every WebDataset reader opens the shards as they are: a split folder and the whole tree hold
nothing but tars (`ray.data.read_webdataset` lists every file of a folder, but skips a path whose
part below the folder it was given starts with "_", so `_meta` is invisible from `<out>`), and
`<dataset>-<split>-{000000..00000N}.tar` brace-expands. A sample is two members, `<key>.image`
(the original encoded bytes, whatever the encoding: the record's `image.format` says which) and
`<key>.json` (the record): one member name for every image keeps the columns of every shard the
same, so a tree mixing JPEG and PNG datasets reads as one table.

An output of layout 1 (sidecars beside the tars, image members `.jpg`/`.png`) is refused by the
readers with `OldLayoutError`, which says to reconvert (the converter rebuilds such a split and
removes the old sidecars).

Tar members get mtime 0, uid/gid 0, no user names and mode 0644, in USTAR format, so the same
samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import uuid
from collections.abc import Iterator

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


LAYOUT_VERSION = 2
META = "_meta"  # the sidecar tree; "_" keeps it out of ray.data's folder listing
IMAGE = "image"  # the member suffix of every sample's image
_OLD_SIDECARS = ("manifest.json", "quarantine.jsonl")  # layout 1 kept these beside the tars


class OldLayoutError(RuntimeError):
    """A split converted with layout 1: reconvert it."""


def split_dir(output: str, dataset: str, split: str) -> str:
    """The folder of a split's shards (tars only)."""
    return storage.join(output, dataset, split)


def meta_dir(output: str, dataset: str, split: str) -> str:
    """The folder of a split's sidecar files (manifest, quarantine, commit records, index cache)."""
    return storage.join(output, META, dataset, split)


def meta_dir_of(split_directory: str) -> str:
    """`meta_dir` of the split whose shards are in `split_directory` (= split_dir(output, dataset, split))."""
    head, split = posixpath.split(split_directory.rstrip("/"))
    output, dataset = posixpath.split(head)
    return meta_dir(output, dataset, split)


def manifest_location(output: str, dataset: str, split: str) -> str:
    return storage.join(meta_dir(output, dataset, split), "manifest.json")


def quarantine_location(output: str, dataset: str, split: str) -> str:
    return storage.join(meta_dir(output, dataset, split), "quarantine.jsonl")


def commit_record_location(output: str, dataset: str, split: str, shard: str) -> str:
    """The commit record of shard `shard` (its file name)."""
    return storage.join(meta_dir(output, dataset, split), "parts", shard.removesuffix(".tar") + ".json")


def staging_location(output: str, dataset: str, split: str, shard: str) -> str:
    """Where a shard task commits the tar `shard` (its file name) until the driver moves it into place."""
    return storage.join(meta_dir(output, dataset, split), "staging", shard)


def file_sha256(location: str, chunk: int = 8 << 20) -> str:
    """sha256 hex of a file's bytes, read as a stream."""
    fs, path = storage.resolve(location)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def read_manifest(location: str) -> Manifest | None:
    if not storage.exists(location):
        return None
    return Manifest.model_validate_json(storage.read_bytes(location))


def old_layout_error(output: str, dataset: str, split: str) -> OldLayoutError | None:
    """The error to raise when `dataset/split` under `output` was written with layout 1, else None."""
    directory = split_dir(output, dataset, split)
    if storage.exists(storage.join(directory, "manifest.json")):
        return OldLayoutError(
            f"{directory} was converted by an older xsam (manifest.json beside the tars, image members "
            f".jpg/.png); this version reads {manifest_location(output, dataset, split)} and '<key>.{IMAGE}' "
            f"members: reconvert it (python pipelines/convert.py --datasets {dataset} --output {output} ...)")
    return None


def split_manifest(output: str, dataset: str, split: str) -> Manifest | None:
    """The manifest of a converted split, None when it is not (completely) converted;
    OldLayoutError when it was converted with layout 1."""
    manifest = read_manifest(manifest_location(output, dataset, split))
    if manifest is None and (old := old_layout_error(output, dataset, split)) is not None:
        raise old
    return manifest


def list_splits(output: str) -> list[tuple[str, str]]:
    """(dataset, split) of every completely converted split under `output`, sorted."""
    root = storage.join(output, META)
    out = []
    for loc in storage.list_files(root, suffix="/manifest.json", recursive=True):
        parts = loc[len(root):].strip("/").replace("\\", "/").split("/")
        if len(parts) == 3:
            out.append((parts[0], parts[1]))
    return sorted(out)


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
    """Write samples (in key order) into one tar at a temporary name; `commit()` renames it. `tag` goes
    into the temporary name (`<location>.tmp-<tag>-<unique>`) so a run can find the files its dead
    tasks left."""

    def __init__(self, location: str, tag: str | None = None):
        self.location = location
        self.tmp = f"{location}.tmp-{tag}-{uuid.uuid4().hex[:12]}" if tag else storage.temp_name(location)
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

    def add(self, key: str, image: bytes, record: bytes) -> None:
        if key <= self._last_key:
            raise ValueError(f"keys must be added in increasing order ({key!r} after {self._last_key!r})")
        self._last_key = key
        # members sorted by name within the sample: "<key>.image" < "<key>.json"
        for name, data in sorted([(f"{key}.{IMAGE}", image), (f"{key}.json", record)]):
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
    manifest = split_manifest(output, dataset, split)
    if manifest is None:
        raise FileNotFoundError(f"{manifest_location(output, dataset, split)} does not exist: "
                                f"convert {dataset}/{split} first")
    directory = split_dir(output, dataset, split)
    return [storage.join(directory, s.name) for s in manifest.shards]


def sample_members(location: str, key: str, suffixes: list[str]) -> None:
    """Check that sample `key` of shard `location` has exactly the members of this layout."""
    if sorted(suffixes) == [IMAGE, "json"]:
        return
    if "json" in suffixes and len(suffixes) == 2:
        raise OldLayoutError(f"{location}: sample {key} has members {sorted(suffixes)}: a shard of an older xsam "
                             f"layout (image member .jpg/.png, not .{IMAGE}): reconvert its split")
    raise ValueError(f"{location}: sample {key} has members {sorted(suffixes)}, want {IMAGE} + json")


def iter_tar(location: str) -> Iterator[tuple[str, bytes, str, Sample]]:
    """Plain reader for tools and tests: yields (key, image bytes, image encoding, sample)."""
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
        sample_members(location, key, list(parts))
        sample = Sample.from_json_bytes(parts["json"])
        yield key, parts[IMAGE], sample.image.format, sample


def json_line(obj: dict) -> str:
    """One JSONL line, ASCII-escaped so that lone surrogates from broken source text survive."""
    return json.dumps(obj, sort_keys=True)
