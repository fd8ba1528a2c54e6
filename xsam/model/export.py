"""Model exports in the Hugging Face layout, written without copies, loaded with completeness checks.

An export is a folder or an s3:// prefix:

    config.json                            transformers-style: model_type "xsam", architectures, the
                                           stage, every size (XSAMConfig.to_dict()), special-token ids;
                                           `AutoConfig.from_pretrained(export)` reads it once this module
                                           (or xsam.model.hf_config) is imported
    model-00001-of-0000n.safetensors ...   shards of at most `max_shard_size` bytes (whole file, header
                                           included); a single larger tensor gets a shard of its own
    model.safetensors.index.json           {"metadata": {"total_size"}, "weight_map": {key: shard}}
    tokenizer.json, tokenizer_config.json  tokenizer.save_pretrained output, at the root (if a tokenizer)
    manifest.json                          written LAST: stage, config, keys {name: shape}, the caller's
                                           extra fields (credentials in their strings masked),
                                           files {name: {size, sha256}}, tokenizer_files

Writing: an existing manifest.json is deleted first, then every file is written once, straight to its
final name or key (`storage.write_bytes`: one PUT or multipart upload on S3, whose completion is
atomic; no temporary name, no rename, no CopyObject - S3 refuses to copy objects over 5 GiB), and
the manifest last. So an export is complete exactly when its manifest exists; a crash mid-write
leaves no manifest. Files of an earlier export that the new one does not list (more shards before)
are left in place and ignored: only what the manifest lists is read.

Loading (`load_export`) reads local paths and s3:// directly (into memory, no local copy) and
checks: the manifest exists; every file it lists exists with its size (and, by default, its sha256:
~1.5 GB/s on one core, ~6 s for the 8.6 GiB paper S3 export, less than reading it from S3); the
index names exactly the manifest's keys; each shard holds exactly the keys the index gives it, with
the manifest's shapes. Any failure is an `ExportError` naming the file or key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from xsam.data import storage
from xsam.logs import UserError
from xsam.model.config import XSAMConfig
from xsam.model.hf_config import MODEL_TYPE  # importing it registers model_type "xsam" with AutoConfig
from xsam.model.tokenizer import SPECIAL_TOKENS, token_id
from xsam.model.xsam import XSAM

DEFAULT_SHARD_SIZE = 2 * 10**9  # bytes ("2GB" as transformers counts it)
MANIFEST = "manifest.json"
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
ARCHITECTURE = XSAM.__name__
_SHARD_METADATA = {"format": "pt"}
_RESERVED = ("stage", "config", "keys", "files", "tokenizer_files")


class ExportError(UserError):
    """An incomplete or inconsistent export; the message names the missing or wrong file / key. A
    UserError (a ValueError): a command given such an export answers with that one line."""


def shard_name(k: int, n: int) -> str:
    """transformers' shard naming (1-based), also for n = 1."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


# --------------------------------------------------------------------------- planning
def _header_bound(name: str, tensor: torch.Tensor) -> int:
    """Upper bound of the bytes `name` adds to a safetensors header (compact JSON, offsets <= 20 digits)."""
    shape = json.dumps(list(tensor.shape), separators=(",", ":"))
    return len(json.dumps(name)) + len('{"dtype":"F8_E4M3","shape":,"data_offsets":[,]},') + len(shape) + 40


# 8-byte length prefix, braces, the metadata entry, up to 7 bytes of alignment padding
_HEADER_BASE = 8 + 2 + len(json.dumps({"__metadata__": _SHARD_METADATA}, separators=(",", ":"))) + 1 + 7


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> tuple[list[list[str]], list[str]]:
    """Greedy packing in key order into shards whose FILE size (data + header bound) stays within
    `max_shard_size`. Returns (keys per shard, keys that alone exceed the limit: each gets its own shard)."""
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    shards: list[list[str]] = []
    oversized: list[str] = []
    current: list[str] = []
    size = _HEADER_BASE
    for name, t in tensors.items():
        cost = t.numel() * t.element_size() + _header_bound(name, t)
        if _HEADER_BASE + cost > max_shard_size:
            oversized.append(name)
            shards.append([name])
            continue
        if current and size + cost > max_shard_size:
            shards.append(current)
            current, size = [], _HEADER_BASE
        current.append(name)
        size += cost
    if current or not shards:
        shards.append(current)
    return shards, oversized


# --------------------------------------------------------------------------- writing
@dataclass
class ExportResult:
    location: str
    files: dict[str, int] = field(default_factory=dict)  # every file written (manifest included) -> bytes
    oversized: list[str] = field(default_factory=list)  # tensors alone over max_shard_size (own shard each)


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The X-SAM tokens' ids and the tokenizer's own (bos / eos / pad / unk), for config.json."""
    ids: dict[str, int | None] = {}
    for t in SPECIAL_TOKENS:
        try:
            ids[t] = token_id(tokenizer, t)
        except KeyError:
            ids[t] = None
    for role in ("bos", "eos", "pad", "unk"):
        ids[f"{role}_token_id"] = getattr(tokenizer, f"{role}_token_id", None)
    return ids


def hf_config(cfg: XSAMConfig, stage: str, dtype: torch.dtype | None, tokenizer=None) -> dict:
    """config.json: every size of the preset at the top level plus model_type / architectures / stage,
    the tensors' dtype and the tokenizer's size and special-token ids."""
    out = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "stage": stage, **cfg.to_dict()}
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    if tokenizer is not None:
        ids = special_token_ids(tokenizer)
        out["special_token_ids"] = {t: ids[t] for t in SPECIAL_TOKENS}
        out.update({k: v for k, v in ids.items() if k.endswith("_token_id")})
        out["tokenizer_size"] = len(tokenizer)
    return out


def _json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, indent=1, default=str).encode()


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        out = {}
        for root, _, names in os.walk(tmp):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, tmp).replace(os.sep, "/")] = f.read()
        return out


def write_export(location: str | os.PathLike, tensors: dict[str, torch.Tensor], cfg: XSAMConfig, stage: str, *,
                 tokenizer=None, extra: dict | None = None, max_shard_size: int = DEFAULT_SHARD_SIZE) -> ExportResult:
    """Write `tensors` (name -> tensor of any shape, dtype and device; moved to the host one shard at a
    time) as an export at `location` (a folder or s3:// prefix). `extra` adds fields to the manifest
    (not the reserved ones). Host memory peaks at about twice one shard (its tensors + its bytes)."""
    location = str(location)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"manifest fields {clash} are written by the exporter, not passed in `extra`")
    tok_files = _tokenizer_files(tokenizer) if tokenizer is not None else {}
    taken = [n for n in tok_files if n in (MANIFEST, CONFIG, INDEX) or (n.startswith("model-") and
                                                                          n.endswith(".safetensors"))]
    if taken:
        raise ValueError(f"tokenizer file names {taken} collide with the export's own files")
    plan, oversized = plan_shards(tensors, max_shard_size)

    storage.delete(storage.join(location, MANIFEST))  # first: a half-rewritten export is never complete
    result = ExportResult(location, oversized=oversized)
    files: dict[str, dict] = {}

    def put(name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(location, name), data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        result.files[name] = len(data)

    weight_map = {}
    for k, keys in enumerate(plan, start=1):
        name = shard_name(k, len(plan))
        # one shard at a time on the host: a state on the GPU never has a full CPU copy
        data = save_safetensors({key: tensors[key].detach().to("cpu").contiguous() for key in keys},
                                metadata=_SHARD_METADATA)
        if len(data) > max_shard_size and len(keys) > 1:  # the header bound is an upper bound: cannot happen
            raise AssertionError(f"{name}: {len(data)} bytes over max_shard_size {max_shard_size}")
        put(name, data)
        del data
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    put(INDEX, _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map}))
    by_dtype: dict[torch.dtype, int] = {}
    for t in tensors.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else None
    put(CONFIG, _json_bytes(hf_config(cfg, stage, dtype, tokenizer)))
    for name, data in sorted(tok_files.items()):
        put(name, data)

    manifest = {"stage": stage, "config": cfg.to_dict(), "keys": {k: list(v.shape) for k, v in sorted(tensors.items())},
                **_redacted(extra), "files": files, "tokenizer_files": sorted(tok_files)}
    data = _json_bytes(manifest)
    storage.write_bytes(storage.join(location, MANIFEST), data)
    result.files[MANIFEST] = len(data)
    return result


def _redacted(value):
    """`value` (the caller's manifest fields: JSON-like) with every string through xsam.logs.redact: an
    export travels further than its run, and a training config's tracking URI may carry a password."""
    from xsam.logs import redact

    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    return value


# --------------------------------------------------------------------------- loading
def read_manifest(location: str | os.PathLike) -> dict:
    """The manifest of a complete export; ExportError naming manifest.json when it is absent."""
    loc = storage.join(str(location), MANIFEST)
    if not storage.exists(loc):
        raise ExportError(f"incomplete export: {loc} missing (not an export, or one being written or interrupted)")
    try:
        manifest = json.loads(storage.read_bytes(loc))
    except json.JSONDecodeError as e:
        raise ExportError(f"{loc}: not valid JSON ({e})") from e
    for key in ("stage", "config", "keys", "files"):
        if key not in manifest:
            raise ExportError(f"{loc}: no {key!r} field (an export of an older layout? re-export it)")
    return manifest


def check_files(location: str | os.PathLike, manifest: dict) -> None:
    """Every file the manifest lists exists with its size (one listing per folder, no request per file)."""
    location = str(location)
    names = sorted(manifest["files"])
    stats = storage.file_stats([storage.join(location, n) for n in names])
    for name, (size, _) in zip(names, stats):
        want = manifest["files"][name]["size"]
        if size < 0:
            raise ExportError(f"incomplete export: {storage.join(location, name)} missing (listed in {MANIFEST})")
        if size != want:
            raise ExportError(f"incomplete export: {storage.join(location, name)} has {size} bytes, "
                              f"{MANIFEST} says {want}")


def _read_listed(location: str, name: str, manifest: dict, verify: bool) -> bytes:
    loc = storage.join(location, name)
    if name not in manifest["files"]:
        raise ExportError(f"{storage.join(location, MANIFEST)}: files does not list {name}")
    try:
        data = storage.read_bytes(loc)
    except OSError as e:
        raise ExportError(f"incomplete export: cannot read {loc} (listed in {MANIFEST}): {e}") from e
    entry = manifest["files"][name]
    if len(data) != entry["size"]:
        raise ExportError(f"incomplete export: {loc} has {len(data)} bytes, {MANIFEST} says {entry['size']}")
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ExportError(f"{loc}: sha256 differs from {MANIFEST} (corrupt or overwritten)")
    return data


def load_export(location: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, manifest) of a complete export (folder or s3:// prefix), read into memory.
    `verify`: also compare every shard's sha256 with the manifest (sizes are always checked)."""
    location = str(location)
    manifest = read_manifest(location)
    check_files(location, manifest)
    index = json.loads(_read_listed(location, INDEX, manifest, verify))
    weight_map: dict[str, str] = index.get("weight_map", {})
    where = storage.join(location, INDEX)
    for key in manifest["keys"]:
        if key not in weight_map:
            raise ExportError(f"{where}: key {key!r} of {MANIFEST} missing from weight_map")
    for key in weight_map:
        if key not in manifest["keys"]:
            raise ExportError(f"{where}: key {key!r} is not in {MANIFEST}'s keys")
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    state: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        tensors = load_safetensors(_read_listed(location, shard, manifest, verify))
        shard_loc = storage.join(location, shard)
        for key in sorted(keys):
            if key not in tensors:
                raise ExportError(f"incomplete export: key {key!r} missing from {shard_loc}")
            if list(tensors[key].shape) != list(manifest["keys"][key]):
                raise ExportError(f"{shard_loc}: {key!r} has shape {list(tensors[key].shape)}, "
                                  f"{MANIFEST} says {manifest['keys'][key]}")
        stray = sorted(set(tensors) - keys)
        if stray:
            raise ExportError(f"{shard_loc}: keys {stray[:5]} are not assigned to it by {INDEX}")
        state.update(tensors)
    return state, manifest


def load_tokenizer(location: str | os.PathLike, *, verify: bool = True):
    """The tokenizer saved in an export (AutoTokenizer over exactly the files the manifest lists)."""
    from transformers import AutoTokenizer

    location = str(location)
    manifest = read_manifest(location)
    names = manifest.get("tokenizer_files") or []
    if not names:
        raise ExportError(f"{storage.join(location, MANIFEST)}: the export holds no tokenizer (pass one)")
    with tempfile.TemporaryDirectory() as tmp:  # only the tokenizer's files: config.json is not a tokenizer's
        for name in names:
            path = os.path.join(tmp, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(_read_listed(location, name, manifest, verify))
        return AutoTokenizer.from_pretrained(tmp)
