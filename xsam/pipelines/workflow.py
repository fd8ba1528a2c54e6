"""The workflow's plan (pipelines/full_run.py): which datasets it converts, the content keys of its steps,
and which steps a failed conversion blocks. No Ray here: these decide what runs, before anything runs.

- A run converts the datasets its stages train on and its benchmarks score (or `--datasets`).
- The convert key covers every registry file (`*.yaml` and `*.yml`) and the sources' fingerprint: the
  (path, size, mtime) of every file and folder a selected entry's splits name, folders listed
  recursively (a stat listing, not a read: one LIST per 1,000 objects on S3).
- A stage key covers what changes the stage's result: TrainConfig.identity() (RESULT_NEUTRAL left
  out), except that S3's checkpoints are the selection candidates, so its checkpoint_every and
  keep_checkpoints (which checkpoints exist) are part of S3's key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from xsam.train.config import STAGES, TrainConfig

CANDIDATE_STAGE = "s3"  # its kept checkpoints are the candidates the evaluate step scores
CANDIDATE_SETTINGS = ("checkpoint_every", "keep_checkpoints")  # decide which of its checkpoints exist


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_of(name: str) -> str:
    """"dataset/split" -> dataset."""
    return name.split("/", 1)[0]


def needed_datasets(cfgs: dict[str, TrainConfig], benchmarks: list[str] | None) -> dict[str, list[str]]:
    """{dataset: the steps that need it (stages by their `datasets`, `evaluate` by the benchmarks)}."""
    users: dict[str, list[str]] = {}
    for stage, cfg in cfgs.items():
        for item in cfg.datasets:
            users.setdefault(dataset_of(item), []).append(stage)
    for item in benchmarks or []:
        users.setdefault(dataset_of(item), []).append("evaluate")
    return {d: sorted(set(steps), key=list(STAGES + ("evaluate",)).index) for d, steps in sorted(users.items())}


def _stat_listing(location: str) -> list:
    """[(path, size, mtime_ns)] of a file, or of every file under a folder; [(path, "missing")] if absent."""
    import pyarrow.fs as pafs

    from xsam.data import storage

    fs, path = storage.resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(location, info.size, info.mtime_ns)]
    if info.type == pafs.FileType.Directory:
        return sorted((i.path, i.size, i.mtime_ns) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                      if i.type == pafs.FileType.File)
    return [(location, "missing")]


def source_fingerprint(entries: dict, data_root: str, names: list[str]) -> str:
    """Hash of the stat listing of every location the named registry entries' splits name (each text
    field of a split other than its role, resolved as the reader resolves it)."""
    import posixpath

    from xsam.data import storage

    listing = []
    for name in sorted(names):
        entry = entries[name]
        root = entry.source_root(data_root)
        for split in sorted(entry.splits):
            for field, value in sorted(entry.split_spec(split).model_dump().items()):
                if field != "role" and isinstance(value, str) and value:
                    listing.append((name, split, field, _stat_listing(storage.join(root, posixpath.normpath(value)))))
    return key(listing)


def registry_text(registry: str) -> list[tuple[str, str]]:
    """(file name, text) of every registry file the conversion reads (`*.yaml` and `*.yml`)."""
    from xsam.data.registry import registry_files

    return [(f.name, f.read_text()) for f in registry_files(registry)]


def convert_key(registry: str, data_root: str, shards: str, names: list[str], version: str) -> str:
    from xsam.data.registry import load_registry

    entries, _ = load_registry(registry)
    known = [n for n in names if n in entries]
    return key("convert", Path(registry).resolve().as_posix(), data_root, shards, sorted(names), version,
               registry_text(registry), source_fingerprint(entries, data_root, known))


def stage_key(cfg: TrainConfig, upstream: list[str], version: str) -> str:
    """The key of a training stage: what decides its weights (and, for S3, which checkpoints it keeps)."""
    settings = cfg.identity()
    if cfg.stage == CANDIDATE_STAGE:
        settings.update({k: getattr(cfg, k) for k in CANDIDATE_SETTINGS})
    return key(cfg.stage, settings, upstream, version)


def resolve_stage_exports(init_from: list[str], exports: dict[str, str]) -> list[str]:
    """init_from with each stage name replaced by that stage's export (`exports`: stage -> location)."""
    return [exports[item] if item in STAGES else item for item in init_from]


def first_blocked(steps: list[tuple[str, list[str]]], failed: dict[str, str]) -> tuple[str, dict[str, str]] | None:
    """The first step (in run order) that needs a split whose conversion failed: -> (step, {dataset/split:
    why}), or None when every step can run. `steps`: (step, the dataset/split items it needs) in run
    order; `failed`: the convert step's failed splits, dataset/split -> the conversion's error (which
    names the missing file or folder)."""
    for step, datasets in steps:
        hit = {d: failed[d] for d in datasets if d in failed}
        if hit:
            return step, hit
    return None


def blocked_message(step: str, hit: dict[str, str]) -> str:
    lines = [f"stopping before step {step!r}: it needs data whose conversion failed:"]
    lines += [f"  {item}: {why}" for item, why in hit.items()]
    lines.append("fix the source(s) and rerun: the steps before it are recorded and will be skipped")
    return "\n".join(lines)
