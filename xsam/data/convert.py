"""The conversion job, without Ray: plan every dataset split, write shards through an executor,
commit manifests. pipelines/convert.py passes an executor that runs the shard tasks on Ray Data;
`serial_executor` runs them in this process.

Idempotence and resume, per dataset split:
- its fingerprint hashes the reader and schema versions, the registry entry, the conversion
  settings and the whole plan (every record's annotations, the size and mtime of every file it reads);
- manifest.json present with the same fingerprint -> nothing to do;
- otherwise each shard whose commit record (parts/<shard>.json) carries the same fingerprint is
  kept and the others are (re)written under a temporary name; the old manifest is deleted before
  the first tar is renamed into place, the new one written last, stale files removed.
(Locations: xsam/data/shards.py.)

A split must give at least one good sample: when every record is quarantined (or there is none)
the split fails with the main quarantine reasons, and nothing of an earlier conversion is replaced
- a shard with no good sample is never renamed over an existing tar by a worker; the driver writes
it (an empty tar) only once the split as a whole has samples.

A label space name is bound to one category list (xsam/data/label_spaces.py): a split whose
categories differ from those another dataset of the run, or of the output tree, gave the same
name fails before any of its shards is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from xsam.data import expansion, storage
from xsam.data.errors import QuarantineRecord, SampleError, SourceError
from xsam.data.label_spaces import LabelSpaceClash, LabelSpaces
from xsam.data.readers import READERS
from xsam.data.readers.base import ConvertSettings, Plan, Reader, WorkItem
from xsam.data.registry import RegistryEntry
from xsam.data.schema import SCHEMA_VERSION
from xsam.data.shards import (
    LAYOUT_VERSION,
    Manifest,
    ShardInfo,
    ShardWriter,
    commit_record_location,
    json_line,
    list_splits,
    manifest_location,
    meta_dir,
    quarantine_location,
    read_manifest,
    shard_name,
    split_dir,
)

DEFAULT_MAX_SAMPLES = 10_000
DEFAULT_MAX_BYTES = 1_000_000_000

_log = logging.getLogger(__name__)


@dataclass
class ShardSpec:
    """One shard task: everything a worker needs, picklable."""

    reader: Reader
    items: list[WorkItem]
    location: str
    record_location: str
    fingerprint: str
    manifest_location: str  # deleted before this shard's tar replaces anything

    @property
    def name(self) -> str:
        return self.location.rsplit("/", 1)[-1]


@dataclass
class ShardResult:
    """What a shard task did: `shard` committed, or an `error`, or neither: no good sample, nothing
    committed (the driver writes the empty tar once the split has samples)."""

    name: str
    fingerprint: str
    shard: ShardInfo | None = None
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "fingerprint": self.fingerprint,
                           "shard": self.shard.model_dump() if self.shard else None,
                           "quarantined": [q.to_dict() for q in self.quarantined], "error": self.error})

    @classmethod
    def from_json(cls, text: str | bytes) -> "ShardResult":
        d = json.loads(text)
        return cls(name=d["name"], fingerprint=d["fingerprint"],
                   shard=ShardInfo.model_validate(d["shard"]) if d["shard"] else None,
                   quarantined=[QuarantineRecord(**q) for q in d["quarantined"]], error=d["error"])


@dataclass
class SplitJob:
    entry: RegistryEntry
    split: str
    directory: str  # the shards' folder
    output: str
    plan: Plan
    fingerprint: str
    specs: list[ShardSpec]  # shards to write
    kept: list[ShardResult]  # shards already committed by an earlier run


@dataclass
class SplitOutcome:
    dataset: str
    split: str
    status: str  # "converted" | "up-to-date" | "failed"
    manifest: Manifest | None = None
    error: str | None = None
    shards_written: int = 0
    shards_kept: int = 0


Executor = Callable[[list[ShardSpec]], Iterable[ShardResult]]


def write_shard(spec: ShardSpec) -> ShardResult:
    """Convert the items of one shard and commit the tar, then its commit record.

    A bad sample is quarantined; any other failure (storage down, a bug) fails the shard, which
    fails its split but not the job. A shard with no good sample commits nothing."""
    try:
        reader = spec.reader
        quarantined: list[QuarantineRecord] = []
        writer = ShardWriter(spec.location)
        records = 0
        try:
            for item in spec.items:
                try:
                    image, sample = reader.convert(item)
                    record = sample.to_json_bytes()
                except SampleError as e:
                    quarantined.append(reader.quarantine(item.source_id, e, item.source_file))
                    continue
                except SourceError as e:  # a per-sample annotation file (e.g. LabelMe JSON) is unreadable
                    err = SampleError(e.reason, field=e.field, file=e.file)
                    quarantined.append(reader.quarantine(item.source_id, err, item.source_file))
                    continue
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    err = SampleError(f"malformed sample ({type(e).__name__}: {e})", file=item.files[0] if item.files else None)
                    quarantined.append(reader.quarantine(item.source_id, err, item.source_file))
                    continue
                writer.add(item.key, image, record)
                records += expansion.num_records(sample)
            if writer.num_samples == 0:
                writer.abort()
                return ShardResult(name=spec.name, fingerprint=spec.fingerprint, quarantined=quarantined)
            storage.delete(spec.manifest_location)  # the split stops looking complete before a tar changes
            info = writer.commit()
            info.num_records = records
        except BaseException:
            writer.abort()
            raise
        result = ShardResult(name=spec.name, fingerprint=spec.fingerprint, shard=info, quarantined=quarantined)
        storage.write_bytes_atomic(spec.record_location, result.to_json().encode())
        return result
    except Exception as e:  # noqa: BLE001 - reported per shard, fails its split
        return ShardResult(name=spec.name, fingerprint=spec.fingerprint,
                           error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")


def serial_executor(specs: list[ShardSpec]) -> Iterable[ShardResult]:
    return [write_shard(s) for s in specs]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(entry: RegistryEntry, split: str, reader: Reader, plan: Plan, settings: ConvertSettings,
                 max_samples: int, max_bytes: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"schema": SCHEMA_VERSION, "layout": LAYOUT_VERSION, "format": entry.format, "reader_version": reader.version,
                         "entry": entry.digest(split), "settings": settings.__dict__, "max_samples": max_samples,
                         "max_bytes": max_bytes, "expansion": expansion.EXPANSION_VERSION, "categories": plan.categories, "excluded": plan.excluded},
                        sort_keys=True, default=str).encode())
    for item in plan.items:
        h.update(json.dumps([item.key, item.files, item.stats, item.payload], sort_keys=True, default=str).encode())
    for q in plan.quarantined:
        h.update(json_line(q.to_dict()).encode())
    return h.hexdigest()


def _cut(items: list[WorkItem], max_samples: int, max_bytes: int) -> list[list[WorkItem]]:
    """Group key-sorted items into shards of at most max_samples and about max_bytes."""
    shards: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    size = 0
    for item in items:
        if current and (len(current) >= max_samples or size + item.est_bytes > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.est_bytes
    if current:
        shards.append(current)
    return shards


def _committed(record_location: str, fingerprint: str, tar_location: str) -> ShardResult | None:
    if not storage.exists(record_location):
        return None
    try:
        result = ShardResult.from_json(storage.read_bytes(record_location))
    except (ValueError, KeyError, TypeError):
        return None
    if result.fingerprint != fingerprint or result.shard is None or storage.size(tar_location) != result.shard.bytes:
        return None
    return result


def prepare_split(entry: RegistryEntry, split: str, data_root: str, output: str, settings: ConvertSettings,
                  max_samples: int, max_bytes: int, force: bool = False) -> SplitJob | SplitOutcome:
    """Plan a split; return an up-to-date outcome, or the shard tasks still to run."""
    reader = READERS[entry.format](entry, split, data_root, settings)
    plan = reader.plan()
    plan.items.sort(key=lambda it: it.key)
    keys = [it.key for it in plan.items]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise SourceError(f"two records share a source id (keys {dupes})", file=reader.root)
    stats = storage.file_stats([f for it in plan.items for f in it.files])
    pos = 0
    for it in plan.items:
        it.stats = stats[pos:pos + len(it.files)]
        pos += len(it.files)
    fp = _fingerprint(entry, split, reader, plan, settings, max_samples, max_bytes)
    directory = split_dir(output, entry.name, split)
    manifest_loc = manifest_location(output, entry.name, split)
    manifest = read_manifest(manifest_loc)
    if not force and manifest is not None and manifest.source_fingerprint == fp and all(
            storage.size(storage.join(directory, s.name)) == s.bytes for s in manifest.shards):
        return SplitOutcome(entry.name, split, "up-to-date", manifest=manifest)
    specs, kept = [], []
    for index, items in enumerate(_cut(plan.items, max_samples, max_bytes)):
        name = shard_name(entry.name, split, index)
        location = storage.join(directory, name)
        record = commit_record_location(output, entry.name, split, name)
        shard_fp = hashlib.sha256(f"{fp}/{name}".encode()).hexdigest()
        done = None if force else _committed(record, shard_fp, location)
        if done is not None:
            kept.append(done)
        else:
            specs.append(ShardSpec(reader=reader, items=items, location=location, record_location=record,
                                   fingerprint=shard_fp, manifest_location=manifest_loc))
    return SplitJob(entry, split, directory, output, plan, fp, specs, kept)


def _no_samples(job: SplitJob, quarantined: list[QuarantineRecord]) -> str:
    """Why a split gave no good sample: its read count and its main quarantine reasons."""
    where = quarantine_location(job.output, job.entry.name, job.split)
    if not quarantined:
        excluded = ", ".join(f"{k}: {n}" for k, n in sorted(job.plan.excluded.items())) or "none"
        return f"the source has no sample (records excluded by the format's rules: {excluded})"
    top = Counter(q.reason for q in quarantined).most_common(3)
    reasons = "; ".join(f"{reason!r} x{n}" for reason, n in top)
    return (f"0 good samples: all {len(quarantined)} records were quarantined - top reasons: {reasons} "
            f"(every record in {where}); the shards of an earlier conversion were left as they were")


def _commit_empty(job: SplitJob, result: ShardResult) -> ShardResult:
    """Write the empty tar (and its commit record) of a shard whose samples were all quarantined."""
    location = storage.join(job.directory, result.name)
    storage.delete(manifest_location(job.output, job.entry.name, job.split))
    writer = ShardWriter(location)
    info = writer.commit()
    info.num_records = 0
    done = ShardResult(name=result.name, fingerprint=result.fingerprint, shard=info, quarantined=result.quarantined)
    storage.write_bytes_atomic(commit_record_location(job.output, job.entry.name, job.split, result.name),
                               done.to_json().encode())
    return done


def finalize_split(job: SplitJob, results: list[ShardResult]) -> SplitOutcome:
    """Write quarantine.jsonl and, if every shard committed and the split has samples, manifest.json;
    remove stale files."""
    errors = [r for r in results if r.error]
    if errors:
        return SplitOutcome(job.entry.name, job.split, "failed",
                            error=f"{len(errors)} shard(s) failed; first: {errors[0].name}: {errors[0].error}")
    done = sorted(job.kept + results, key=lambda r: r.name)
    quarantined = sorted(job.plan.quarantined + [q for r in done for q in r.quarantined], key=lambda q: q.key)
    storage.write_bytes_atomic(quarantine_location(job.output, job.entry.name, job.split),
                               "".join(json_line(q.to_dict()) + "\n" for q in quarantined).encode("utf-8"))
    if not any(r.shard is not None and r.shard.num_samples for r in done):
        return SplitOutcome(job.entry.name, job.split, "failed", error=_no_samples(job, quarantined))
    done = [r if r.shard is not None else _commit_empty(job, r) for r in done]
    shards = [r.shard for r in done]
    num_samples = sum(s.num_samples for s in shards)
    num_read = len(job.plan.items) + len(job.plan.quarantined)
    if num_samples + len(quarantined) != num_read:  # a reconciliation failure is a bug, never silent
        raise RuntimeError(f"{job.entry.name}/{job.split}: read {num_read} != written {num_samples} "
                           f"+ quarantined {len(quarantined)}")
    spec = job.entry.split_spec(job.split)
    manifest = Manifest(dataset=job.entry.name, split=job.split, task=job.entry.task.value, format=job.entry.format,
                        reader_version=READERS[job.entry.format].version, role=spec.role,
                        label_space=job.entry.label_space, categories=job.plan.categories,
                        source_fingerprint=job.fingerprint, num_read=num_read, num_samples=num_samples,
                        num_quarantined=len(quarantined), excluded=job.plan.excluded, shards=shards,
                        num_records=None if any(s.num_records is None for s in shards)
                        else sum(s.num_records for s in shards))
    # the shards' folder holds the current tars only (this also clears the sidecars of layout 1)
    keep = {storage.join(job.directory, s.name) for s in shards}
    keep |= {commit_record_location(job.output, job.entry.name, job.split, s.name) for s in shards}
    parts = storage.join(meta_dir(job.output, job.entry.name, job.split), "parts")
    for loc in storage.list_files(job.directory, recursive=True) + storage.list_files(parts):
        if loc not in keep:
            storage.delete(loc)
    storage.write_bytes_atomic(manifest_location(job.output, job.entry.name, job.split),
                               manifest.model_dump_json(indent=2).encode())
    return SplitOutcome(job.entry.name, job.split, "converted", manifest=manifest,
                        shards_written=len(results), shards_kept=len(job.kept))


def _tree_label_spaces(output: str, skip: set[str]) -> LabelSpaces:
    """The label spaces the converted splits under `output` bind, except those of the datasets `skip`."""
    spaces = LabelSpaces()
    for dataset, split in list_splits(output):
        if dataset in skip:
            continue
        m = read_manifest(manifest_location(output, dataset, split))
        try:
            spaces.bind(m.label_space, m.categories, f"{dataset}/{split}")
        except LabelSpaceClash:
            pass  # a clash within the old tree is reported by --validate-only; this run binds its own
    return spaces


def convert(entries: list[RegistryEntry], data_root: str, output: str, executor: Executor = serial_executor,
            settings: ConvertSettings | None = None, max_samples: int = DEFAULT_MAX_SAMPLES,
            max_bytes: int = DEFAULT_MAX_BYTES, force: bool = False,
            log: Callable[[str], None] | None = None) -> list[SplitOutcome]:
    """Convert every split of `entries`; one executor pass for all shard tasks of all datasets. Per-split
    lines go to `log` (default: this module's logger at DEBUG), failures to its logger at WARNING too."""
    log = log or _log.debug
    warn = _log.warning if log is _log.debug else log
    settings = settings or ConvertSettings()
    outcomes: list[SplitOutcome] = []
    jobs: list[SplitJob] = []
    spaces = _tree_label_spaces(output, {e.name for e in entries})
    for entry in entries:
        for split in entry.splits:
            t0 = time.perf_counter()
            try:
                job = prepare_split(entry, split, data_root, output, settings, max_samples, max_bytes, force)
            except (SourceError, SampleError) as e:  # the split's source cannot be planned at all
                warn(f"[convert] {entry.name}/{split}: FAILED: {e}")
                outcomes.append(SplitOutcome(entry.name, split, "failed", error=str(e)))
                continue  # only this split fails; the other splits and datasets go on
            categories = job.manifest.categories if isinstance(job, SplitOutcome) else job.plan.categories
            try:
                spaces.bind(entry.label_space, categories, f"{entry.name}/{split}")
            except LabelSpaceClash as e:
                warn(f"[convert] {entry.name}/{split}: FAILED: {e}")
                outcomes.append(SplitOutcome(entry.name, split, "failed", error=str(e)))
                continue
            if isinstance(job, SplitOutcome):
                log(f"[convert] {entry.name}/{split}: up to date ({job.manifest.num_samples} samples)")
                outcomes.append(job)
                continue
            log(f"[convert] {entry.name}/{split}: planned {len(job.plan.items)} samples "
                f"({len(job.plan.quarantined)} quarantined at planning), {len(job.specs)} shard(s) to write, "
                f"{len(job.kept)} kept, in {time.perf_counter() - t0:.1f}s")
            jobs.append(job)
    job_of = {spec.name: job for job in jobs for spec in job.specs}  # shard names are unique
    results: dict[tuple[str, str], list[ShardResult]] = {(job.entry.name, job.split): [] for job in jobs}
    specs = [spec for job in jobs for spec in job.specs]
    for result in executor(specs) if specs else []:
        job = job_of[result.name]
        results[(job.entry.name, job.split)].append(result)
    for job in jobs:
        outcome = finalize_split(job, results[(job.entry.name, job.split)])
        if outcome.status == "failed":
            warn(f"[convert] {job.entry.name}/{job.split}: FAILED: {outcome.error}")
        else:
            m = outcome.manifest
            log(f"[convert] {job.entry.name}/{job.split}: {m.num_samples} samples in {len(m.shards)} shard(s), "
                f"{m.num_quarantined} quarantined")
        outcomes.append(outcome)
    return outcomes
