"""Random access into converted WebDataset shards: an index of byte ranges, read back with ranged reads.

The training loader needs sample-level random access (balanced, shuffled, single-task global
batches cut across datasets), which a sequential WebDataset pipeline cannot give. The shards are
plain USTAR tars with members sorted by key (`xsam/data/shards.py`), so a sample is two byte
ranges in one file. `ShardIndex.build` reads each split's `manifest.json`, then walks each shard's
tar HEADERS (data offsets and sizes, no member data kept) and records one `SampleRef` per sample;
`ShardIndex.read(ref)` fetches the two members with ONE ranged read (they are adjacent: image and
JSON member with one 512-byte header between them).

How the headers are walked (`headers=`):
- "seek" (default for local folders): tarfile over a seekable pyarrow input file; each header is a
  512-byte read and the member data is skipped by seeking. Nothing but headers is read.
- "stream" (default for s3:// and other URIs): tarfile over a sequential pyarrow input stream.
  The member data flows through and is dropped. On an object store this is one GET per shard at
  full bandwidth instead of two small ranged GETs per sample (a 10k-sample shard would be 20k
  round trips of ~20 ms each); it costs the shard's size in transfer, once.
With `verify` (the default) every walked shard is read in full as a stream and its size and sha256
must equal its manifest's: a damaged shard fails the build naming it (`DamagedShard`), it never
trains. A split with no sample (an `allow_empty` split) is refused (`EmptySplit`), naming it.
Shards are walked in parallel (`threads`), and only once per split: the index of a split is stored
beside its manifest as `index-<sha256 of manifest.json>.bin` (`xsam/train/index_cache.py`)
and a (re)start reads that one small file instead of the shards. A changed manifest has another
digest, so another file; a truncated or corrupt file fails its checks and the split is walked again.

Thread safety: `read` may be called from several threads (the loader's prefetch threads); the
per-shard open-file cache is guarded by a lock and pyarrow's `read_at` is safe to call
concurrently. A pickled index (e.g. sent to a worker process) drops its open files.
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from xsam.data import expansion, storage
from xsam.data.label_spaces import LabelSpaces
from xsam.data.schema import Sample
from xsam.data.shards import (
    Manifest,
    ShardInfo,
    manifest_location,
    old_layout_error,
    sample_members,
    split_dir,
)


class DamagedShard(ValueError):
    """A shard whose bytes differ from what its manifest records: reconvert its split."""


class EmptySplit(ValueError):
    """A converted split with no sample: nothing to train or evaluate on."""


class _HashingStream:
    """Read-only file-like wrapper counting and hashing what is read through it."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n) if n is not None and n >= 0 else self.raw.read()
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(8 << 20):
            pass


@dataclass(frozen=True, slots=True)
class SampleRef:
    """Where one sample's two tar members live. `shard` is the shard's location string."""

    dataset: str
    split: str
    shard: str
    image_offset: int
    image_size: int
    json_offset: int
    json_size: int
    image_ext: str
    key: str


def _walk_shard(location: str, dataset: str, split: str, headers: str,
                expect: ShardInfo | None = None) -> list[SampleRef]:
    """Tar headers of one shard -> SampleRefs in member order (= key order). With `expect`, the whole
    shard is read as a stream and its size and sha256 checked against it (DamagedShard)."""
    fs, path = storage.resolve(location)
    hashed = None
    if expect is not None:
        hashed = _HashingStream(fs.open_input_stream(path))
        f, mode = hashed, "r|"
    elif headers == "seek":
        f, mode = fs.open_input_file(path), "r:"
    elif headers == "stream":
        f, mode = fs.open_input_stream(path), "r|"
    else:
        raise ValueError(f"headers must be 'seek' or 'stream', not {headers!r}")
    members: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    with (hashed.raw if hashed is not None else f), tarfile.open(fileobj=f, mode=mode) as tar:
        for m in tar:  # iterating reads the next header; data is skipped (seek) or streamed past
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if key not in members:
                members[key] = {}
                order.append(key)
            if ext in members[key]:
                raise ValueError(f"{location}: member {m.name} appears twice")
            members[key][ext] = (m.offset_data, m.size)
        if hashed is not None:
            hashed.drain()
    if hashed is not None and (hashed.bytes, hashed.sha.hexdigest()) != (expect.bytes, expect.sha256):
        raise DamagedShard(f"{location}: damaged shard ({hashed.bytes} bytes, sha256 {hashed.sha.hexdigest()[:16]}...; "
                           f"its manifest says {expect.bytes} bytes, sha256 {expect.sha256[:16]}...): reconvert "
                           f"{dataset}/{split} (xsam-convert --datasets {dataset} ...; --verify checks a tree)")
    refs = []
    for key in order:
        parts = members[key]
        sample_members(location, key, list(parts))
        (json_off, json_size) = parts.pop("json")
        ((ext, (img_off, img_size)),) = parts.items()
        refs.append(SampleRef(dataset, split, location, img_off, img_size, json_off, json_size, ext, key))
    return refs


class ShardIndex:
    """Per dataset, the SampleRefs of its splits (each split in key order, splits in the order given)."""

    def __init__(self, root: str, refs: dict[str, list[SampleRef]], manifests: dict[tuple[str, str], Manifest],
                 open_files: int = 32):
        self.root = root
        self.refs = refs
        self.manifests = manifests
        self._max_open = open_files
        self._files: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- building

    @staticmethod
    def read_manifests(root: str, datasets: list[tuple[str, str]]) -> dict[tuple[str, str], Manifest]:
        return {key: m for key, (m, _) in _read_manifests(root, datasets).items()}

    @classmethod
    def build(cls, root: str, datasets: list[tuple[str, str]], *, headers: str = "auto", threads: int = 8,
              cache: bool = True, verify: bool = True) -> ShardIndex:
        """Index the converted splits `datasets` [(dataset, split)] under `root` (a folder or s3://).

        cache: read each split's stored index when it is there and valid; walk the shards of the
        others and store theirs (best effort: a read-only root only logs a warning).
        verify: check each walked shard's size and sha256 against the manifest (DamagedShard); a stored
        index is written only after its shards were checked.
        """
        from xsam.train import index_cache

        loaded = _read_manifests(root, datasets)
        empty = [f"{d}/{s}" for (d, s), (m, _) in loaded.items() if m.num_samples == 0]
        if empty:
            raise EmptySplit(f"split(s) {', '.join(empty)} under {root} have no sample (their manifests list 0; "
                             f"converted with allow_empty or every record quarantined): drop them from the run")
        per_split: dict[tuple[str, str], list[SampleRef]] = {}
        for (dataset, split), (manifest, digest) in loaded.items():
            directory = split_dir(root, dataset, split)
            stored = index_cache.load(directory, dataset, split, manifest, digest) if cache else None
            if stored is not None:
                per_split[(dataset, split)] = stored
        missing = [key for key in loaded if key not in per_split]
        if headers == "auto":
            headers = "stream" if storage.is_uri(root) else "seek"
        jobs = []
        for dataset, split in missing:
            per_split[(dataset, split)] = []
            directory = split_dir(root, dataset, split)
            jobs += [(storage.join(directory, s.name), dataset, split, s)
                     for s in loaded[(dataset, split)][0].shards]
        with ThreadPoolExecutor(max(1, min(threads, len(jobs) or 1))) as pool:
            walked = list(pool.map(lambda j: _walk_shard(j[0], j[1], j[2], headers, j[3] if verify else None),
                                   jobs))
        for (location, dataset, split, info), shard_refs in zip(jobs, walked):
            if len(shard_refs) != info.num_samples:
                raise ValueError(f"{location}: {len(shard_refs)} samples, the manifest says {info.num_samples}")
            per_split[(dataset, split)].extend(shard_refs)
        for dataset, split in missing:
            # key order within a split: the writer sorts members within a shard; sort across shards too
            refs = per_split[(dataset, split)] = sorted(per_split[(dataset, split)], key=lambda r: r.key)
            if cache:
                manifest, digest = loaded[(dataset, split)]
                index_cache.store(split_dir(root, dataset, split), dataset, split, manifest, digest, refs)
        refs_by_dataset: dict[str, list[SampleRef]] = {d: [] for d, _ in datasets}
        for dataset, split in datasets:
            refs_by_dataset[dataset].extend(per_split[(dataset, split)])
        return cls(root, refs_by_dataset, {key: m for key, (m, _) in loaded.items()})

    # ---------------------------------------------------------------- metadata

    @property
    def datasets(self) -> list[str]:
        return list(self.refs)

    def counts(self) -> dict[str, int]:
        """Samples per dataset: what `Schedule(counts=...)` takes."""
        return {d: len(r) for d, r in self.refs.items()}

    def records(self) -> dict[str, int]:
        """Training records per dataset after the recipe's expansion (`xsam.data.expansion`), from the
        manifests; a split whose manifest predates the count is counted here by reading its samples."""
        out: dict[str, int] = {}
        for (d, s), m in self.manifests.items():
            n = m.num_records
            if n is None:
                n = sum(expansion.num_records(self.read(ref)[0]) for ref in self.refs[d] if ref.split == s)
            out[d] = out.get(d, 0) + n
        return out

    def expansions(self) -> dict[str, float]:
        """records / samples per dataset: the `repeats` a Schedule balances with (datasets with samples)."""
        counts, records = self.counts(), self.records()
        return {d: records[d] / n for d, n in counts.items() if n and records.get(d)}

    def __len__(self) -> int:
        return sum(len(r) for r in self.refs.values())

    def manifest(self, dataset: str, split: str | None = None) -> Manifest:
        if split is None:
            splits = [s for d, s in self.manifests if d == dataset]
            if len(splits) != 1:
                raise KeyError(f"{dataset} has splits {splits}: name one")
            split = splits[0]
        return self.manifests[(dataset, split)]

    def label_spaces(self) -> dict[str, list[dict]]:
        """label space name -> its categories, from the manifests; LabelSpaceClash (a ValueError naming both
        datasets and the first differing category) when two manifests bind one name to different ones."""
        spaces = LabelSpaces()
        for (dataset, split), m in self.manifests.items():
            spaces.bind(m.label_space, m.categories, f"{dataset}/{split}")
        return spaces.categories()

    def fingerprint(self) -> str:
        return _fingerprint(self.manifests)

    # ---------------------------------------------------------------- reading

    def _file(self, location: str):
        with self._lock:
            f = self._files.get(location)
            if f is not None:
                self._files.move_to_end(location)
                return f
        fs, path = storage.resolve(location)
        f = fs.open_input_file(path)
        with self._lock:
            if location in self._files:  # another thread opened it meanwhile
                f.close()
                f = self._files[location]
            else:
                self._files[location] = f
                while len(self._files) > self._max_open:
                    # not closed here: a thread may be reading from it; freed with its last reference
                    self._files.popitem(last=False)
            return f

    def read_raw(self, ref: SampleRef) -> tuple[bytes, bytes]:
        """(image bytes, json bytes) of one sample, with one ranged read."""
        f = self._file(ref.shard)
        start = min(ref.image_offset, ref.json_offset)
        end = max(ref.image_offset + ref.image_size, ref.json_offset + ref.json_size)
        if end - start <= ref.image_size + ref.json_size + 2048:  # adjacent members: one read
            buf = f.read_at(end - start, start)
            if len(buf) != end - start:
                raise OSError(f"{ref.shard}: short read at {start} ({len(buf)} of {end - start} bytes)")
            image = buf[ref.image_offset - start: ref.image_offset - start + ref.image_size]
            record = buf[ref.json_offset - start: ref.json_offset - start + ref.json_size]
        else:
            image = f.read_at(ref.image_size, ref.image_offset)
            record = f.read_at(ref.json_size, ref.json_offset)
        return bytes(image), bytes(record)

    def read(self, ref: SampleRef) -> tuple[Sample, bytes]:
        image, record = self.read_raw(ref)
        return Sample.from_json_bytes(record), image

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __getstate__(self):
        return {"root": self.root, "refs": self.refs, "manifests": self.manifests, "max_open": self._max_open}

    def __setstate__(self, state):
        self.__init__(state["root"], state["refs"], state["manifests"], state["max_open"])


def _read_manifests(root: str,
                    datasets: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[Manifest, str]]:
    """(dataset, split) -> (its manifest, sha256 hex of the manifest.json bytes), in the order given."""
    out: dict[tuple[str, str], tuple[Manifest, str]] = {}
    for dataset, split in datasets:
        location = manifest_location(root, dataset, split)
        if not storage.exists(location):
            if (old := old_layout_error(root, dataset, split)) is not None:
                raise old
            raise FileNotFoundError(f"{location} does not exist: convert {dataset}/{split} first")
        if (dataset, split) in out:
            raise ValueError(f"{dataset}/{split} listed twice")
        data = storage.read_bytes(location)
        out[(dataset, split)] = (Manifest.model_validate_json(data), hashlib.sha256(data).hexdigest())
    return out


def _fingerprint(manifests: dict[tuple[str, str], Manifest]) -> str:
    h = hashlib.sha256()
    for (dataset, split), m in manifests.items():
        h.update(f"{dataset}\x1f{split}\x1f{m.schema_version}\n".encode())
        for s in m.shards:
            h.update(f"{s.name}\x1f{s.num_samples}\x1f{s.sha256}\n".encode())
    return h.hexdigest()
