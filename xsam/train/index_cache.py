"""The stored index of one converted split: `<out>/_meta/<dataset>/<split>/index-<sha256 of manifest.json>.bin`.

`ShardIndex.build` walks a split's shards once and stores its SampleRefs here; every later (re)start,
on every rank, reads this one file instead of every shard. The name carries the digest of the
manifest's bytes, so a reconverted split (new manifest) never meets an old index.

Written straight to its final name (no temporary name, no rename: on S3 a rename is a copy, and a PUT
is atomic anyway). Ranks that miss it at the same time all walk the split and write the same bytes,
so the last writer leaves a correct file whatever the interleaving. A reader trusts nothing: the file
ends with the sha256 of everything before it, its header must name this dataset, split, manifest
digest and shard list, and the per-shard sample counts must equal the manifest's. Anything else (a
truncated upload, a torn local write, garbage) is `None` from `load`, and the split is walked again.

Layout (little-endian), for n samples in key order:

    b"XSAMIDX\\n" | u64 header length | header JSON | zlib(body) | sha256 of all the preceding bytes
    header: version, dataset, split, manifest_sha256, n, shards [names], exts [names], key_width w
    body:   int64 [n, 4] (image offset, image size, json offset, json size) | uint32 [n] shard number
            | uint16 [n] ext number | bytes [n, w] key (UTF-8, NUL-padded)

About 30 bytes per sample after compression: ~3.4 MB for COCO train's 118k samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import zlib

import numpy as np

from xsam.data import storage
from xsam.data.shards import Manifest, meta_dir_of
from xsam.train.shard_index import SampleRef

VERSION = 1
MAGIC = b"XSAMIDX\n"
log = logging.getLogger(__name__)


def location(split_dir: str, manifest_sha256: str) -> str:
    return storage.join(meta_dir_of(split_dir), f"index-{manifest_sha256}.bin")  # beside the manifest


def encode(split_dir: str, dataset: str, split: str, manifest: Manifest, manifest_sha256: str,
           refs: list[SampleRef]) -> bytes:
    """The file's bytes for `refs` (one split, key order; ref.shard = storage.join(split_dir, shard name))."""
    names = [s.name for s in manifest.shards]
    number = {storage.join(split_dir, name): i for i, name in enumerate(names)}
    exts = sorted({r.image_ext for r in refs})
    ext_number = {e: i for i, e in enumerate(exts)}
    keys = [r.key.encode("utf-8") for r in refs]
    width = max((len(k) for k in keys), default=1)
    header = json.dumps({"version": VERSION, "dataset": dataset, "split": split,
                         "manifest_sha256": manifest_sha256, "n": len(refs), "shards": names, "exts": exts,
                         "key_width": width},
                        separators=(",", ":")).encode()
    body = b"".join([
        np.array([[r.image_offset, r.image_size, r.json_offset, r.json_size] for r in refs],
                 dtype="<i8").reshape(len(refs), 4).tobytes(),
        np.array([number[r.shard] for r in refs], dtype="<u4").tobytes(),
        np.array([ext_number[r.image_ext] for r in refs], dtype="<u2").tobytes(),
        np.array(keys, dtype=f"S{width}").tobytes()])
    data = MAGIC + struct.pack("<Q", len(header)) + header + zlib.compress(body, 1)
    return data + hashlib.sha256(data).digest()


def decode(data: bytes, split_dir: str, dataset: str, split: str, manifest: Manifest,
           manifest_sha256: str) -> list[SampleRef]:
    """SampleRefs from the file's bytes; ValueError saying what is wrong when anything does not check out."""
    if len(data) < len(MAGIC) + 8 + 32 or not data.startswith(MAGIC):
        raise ValueError("not an index file (bad magic or too short)")
    content, digest = data[:-32], data[-32:]
    if hashlib.sha256(content).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    (header_len,) = struct.unpack_from("<Q", content, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(content[start:start + header_len])
    want = {"version": VERSION, "dataset": dataset, "split": split, "manifest_sha256": manifest_sha256,
            "n": manifest.num_samples, "shards": [s.name for s in manifest.shards]}
    wrong = sorted(k for k, v in want.items() if header.get(k) != v)
    if wrong:
        raise ValueError(f"header does not match the manifest: {', '.join(wrong)}")
    n, width, exts = header["n"], header["key_width"], header["exts"]
    body = zlib.decompress(content[start + header_len:])
    sizes = [n * 32, n * 4, n * 2, n * width]
    if len(body) != sum(sizes):
        raise ValueError(f"body of {len(body)} bytes, expected {sum(sizes)}")
    cuts = np.cumsum([0, *sizes])
    offsets = np.frombuffer(body[cuts[0]:cuts[1]], dtype="<i8").reshape(n, 4)
    shard_no = np.frombuffer(body[cuts[1]:cuts[2]], dtype="<u4")
    ext_no = np.frombuffer(body[cuts[2]:cuts[3]], dtype="<u2")
    keys = np.frombuffer(body[cuts[3]:cuts[4]], dtype=f"S{width}")
    counts = np.bincount(shard_no, minlength=len(manifest.shards)).tolist()
    if counts != [s.num_samples for s in manifest.shards]:
        raise ValueError("per-shard sample counts differ from the manifest's")
    if n and (int(ext_no.max()) >= len(exts) or int(offsets.min()) < 0):
        raise ValueError("ext number or offset out of range")
    shards = [storage.join(split_dir, s.name) for s in manifest.shards]
    return [SampleRef(dataset, split, shards[s], io, isz, jo, jsz, exts[e], k.decode("utf-8"))
            for (io, isz, jo, jsz), s, e, k in zip(offsets.tolist(), shard_no.tolist(), ext_no.tolist(),
                                                     keys.tolist())]


def load(split_dir: str, dataset: str, split: str, manifest: Manifest,
         manifest_sha256: str) -> list[SampleRef] | None:
    """The stored refs of a split, or None when there are none or they are not valid (then rebuild)."""
    where = location(split_dir, manifest_sha256)
    if not storage.exists(where):
        return None
    try:
        return decode(storage.read_bytes(where), split_dir, dataset, split, manifest, manifest_sha256)
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, zlib.error) as e:
        log.warning("%s: %s; walking the shards again", where, e)
        return None


def store(split_dir: str, dataset: str, split: str, manifest: Manifest, manifest_sha256: str,
          refs: list[SampleRef]) -> None:
    """Write the split's index to its final name. Best effort: a failure (e.g. a read-only root) is logged."""
    where = location(split_dir, manifest_sha256)
    try:
        storage.write_bytes(where, encode(split_dir, dataset, split, manifest, manifest_sha256, refs))
    except OSError as e:
        log.warning("%s: could not store the shard index (%s); the next start walks the shards again",
                    where, e)
