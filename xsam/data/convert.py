"""The conversion job, without Ray: plan every dataset split, write shards through an executor,
commit manifests. pipelines/convert.py passes an executor that runs the shard tasks on Ray Data;
`serial_executor` runs them in this process.

Idempotence and resume, per dataset split:
- its fingerprint hashes the reader and schema versions, the registry entry, the conversion
  settings and the whole plan (every record's annotations, the size and mtime of every file it reads);
- manifest.json present with the same fingerprint -> nothing to do;
- a shard's bytes are checked against the sha256 its manifest / commit record gives: a damaged
  shard is never trusted, its split is rebuilt;
- otherwise each shard whose commit record (parts/<shard>.json) carries the same fingerprint (and
  whose tar checks out) is kept and the others are written by the workers into the split's STAGING
  folder (_meta/.../staging/, under a temporary name tagged with this run, then renamed); only once
  the split as a whole passes its checks does the driver delete the old manifest, move the staged
  tars into place, write the new manifest last and remove stale files. A split that fails keeps the
  earlier conversion's shards and manifest as they were. (Locations: xsam/data/shards.py.)

A rerun never replaces good shards with worse ones silently; the split fails and keeps the earlier
shards when
- its source folder is missing, or none of the images it reads exists (an offline mount);
- it gives no good sample (every record quarantined, or none at all: an empty split is an error
  unless its registry entry says `allow_empty: true`);
- its good-sample count falls below `SHRINK_LIMIT` (half) of the previous manifest's, unless
  `ConvertSettings.allow_shrink` (CLI `--allow-shrink`).

A shard task that dies (its worker crashes) fails its split, naming the shard's samples; the executor
bounds its retries (pipelines/convert.py) and the other splits finish. Any error while planning a
split (a reader bug, an annotation file that breaks the parser) fails that split only, naming its
annotation files.

A label space name is bound to one category list (xsam/data/label_spaces.py): a split whose
categories differ from those another dataset of the run, or of the output tree, gave the same
name fails before any of its shards is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from xsam.data import expansion, storage
from xsam.data.errors import QuarantineRecord, SampleError, SourceError
from xsam.data.label_spaces import LabelSpaceClash, LabelSpaces
from xsam.data.readers import READERS
from xsam.data.readers.base import ConvertSettings, Plan, Reader, WorkItem
from xsam.data.registry import RegistryEntry
from xsam.data.schema import SCHEMA_VERSION
from xsam.data.shard_task import ShardResult, ShardSpec, serial_executor, write_shard
from xsam.data.shards import (
    LAYOUT_VERSION,
    Manifest,
    ShardWriter,
    commit_record_location,
    file_sha256,
    json_line,
    list_splits,
    manifest_location,
    meta_dir,
    quarantine_location,
    read_manifest,
    shard_name,
    split_dir,
    staging_location,
)

DEFAULT_MAX_SAMPLES = 10_000
DEFAULT_MAX_BYTES = 1_000_000_000
SHRINK_LIMIT = 0.5  # a rerun giving fewer than this fraction of the previous good samples fails its split

_log = logging.getLogger(__name__)

__all__ = ["ShardResult", "ShardSpec", "SplitJob", "SplitOutcome", "convert", "finalize_split", "prepare_split",
           "serial_executor", "write_shard"]


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
    settings: ConvertSettings = field(default_factory=ConvertSettings)
    previous: Manifest | None = None  # the manifest of the earlier conversion, if any


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


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(entry: RegistryEntry, split: str, reader: Reader, plan: Plan, settings: ConvertSettings,
                 max_samples: int, max_bytes: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"schema": SCHEMA_VERSION, "layout": LAYOUT_VERSION, "format": entry.format, "reader_version": reader.version,
                         "entry": entry.digest(split), "settings": settings.fingerprint_fields(), "max_samples": max_samples,
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


def _intact(location: str, size: int, sha256: str) -> bool:
    """The file at `location` has these size and sha256 (read in full: a damaged shard is never trusted)."""
    try:
        return storage.exists(location) and storage.size(location) == size and file_sha256(location) == sha256
    except OSError:
        return False


def _committed(record_location: str, fingerprint: str, staged: str, final: str) -> ShardResult | None:
    """The commit record of a shard an earlier run wrote for this fingerprint, when its tar (staged or
    already moved into place) is intact."""
    if not storage.exists(record_location):
        return None
    try:
        result = ShardResult.from_json(storage.read_bytes(record_location))
    except (ValueError, KeyError, TypeError):
        return None
    if result.fingerprint != fingerprint or result.shard is None:
        return None
    if any(_intact(loc, result.shard.bytes, result.shard.sha256) for loc in (staged, final)):
        return result
    return None


def _check_sources(reader: Reader, plan: Plan) -> None:
    """SourceError when the split's images are all missing: an offline or unmounted image folder
    would otherwise quarantine every sample (and, on a rerun, look like a shrunken dataset)."""
    images = [(it.files[0], it.stats[0]) for it in plan.items if it.files]
    if images and all(stat == (-1, -1) for _, stat in images):
        folder = images[0][0].rsplit("/", 1)[0]
        raise SourceError(f"none of the {len(images)} images of the split exists (e.g. {images[0][0]}): "
                          f"is the image folder offline or not mounted? earlier shards were left as they were",
                          file=folder)


def prepare_split(entry: RegistryEntry, split: str, data_root: str, output: str, settings: ConvertSettings,
                  max_samples: int, max_bytes: int, force: bool = False) -> SplitJob | SplitOutcome:
    """Plan a split; return an up-to-date outcome, or the shard tasks still to run."""
    reader = READERS[entry.format](entry, split, data_root, settings)
    if not storage.exists(reader.root):
        raise SourceError("the source folder does not exist (offline, not mounted or a wrong --data-root?); "
                          "earlier shards were left as they were", file=reader.root)
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
    _check_sources(reader, plan)
    fp = _fingerprint(entry, split, reader, plan, settings, max_samples, max_bytes)
    directory = split_dir(output, entry.name, split)
    manifest = read_manifest(manifest_location(output, entry.name, split))
    if not force and manifest is not None and manifest.source_fingerprint == fp and all(
            _intact(storage.join(directory, s.name), s.bytes, s.sha256) for s in manifest.shards):
        return SplitOutcome(entry.name, split, "up-to-date", manifest=manifest)
    specs, kept = [], []
    run = uuid.uuid4().hex[:8]
    for index, items in enumerate(_cut(plan.items, max_samples, max_bytes)):
        name = shard_name(entry.name, split, index)
        location = storage.join(directory, name)
        staged = staging_location(output, entry.name, split, name)
        record = commit_record_location(output, entry.name, split, name)
        shard_fp = hashlib.sha256(f"{fp}/{name}".encode()).hexdigest()
        done = None if force else _committed(record, shard_fp, staged, location)
        if done is not None:
            kept.append(done)
        else:
            specs.append(ShardSpec(reader=reader, items=items, location=location, staging=staged,
                                   record_location=record, fingerprint=shard_fp, run=run))
    return SplitJob(entry, split, directory, output, plan, fp, specs, kept, settings, manifest)


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
    _remove_run_temps(job)
    errors = [r for r in results if r.error]
    if errors:
        return SplitOutcome(job.entry.name, job.split, "failed",
                            error=f"{len(errors)} shard(s) failed; first: {errors[0].name}: {errors[0].error}")
    done = sorted(job.kept + results, key=lambda r: r.name)
    quarantined = sorted(job.plan.quarantined + [q for r in done for q in r.quarantined], key=lambda q: q.key)
    storage.write_bytes_atomic(quarantine_location(job.output, job.entry.name, job.split),
                               "".join(json_line(q.to_dict()) + "\n" for q in quarantined).encode("utf-8"))
    good = sum(r.shard.num_samples for r in done if r.shard is not None)
    spec = job.entry.split_spec(job.split)
    if good == 0 and not (spec.allow_empty and not quarantined):
        return SplitOutcome(job.entry.name, job.split, "failed", error=_no_samples(job, quarantined))
    previous = job.previous.num_samples if job.previous is not None else 0
    if not job.settings.allow_shrink and good < SHRINK_LIMIT * previous:
        return SplitOutcome(job.entry.name, job.split, "failed", error=(
            f"{good} good samples, fewer than {SHRINK_LIMIT:.0%} of the {previous} of the previous conversion "
            f"({len(quarantined)} quarantined: see {quarantine_location(job.output, job.entry.name, job.split)}); "
            f"the earlier shards were left as they were (pass --allow-shrink to accept the smaller split)"))
    storage.delete(manifest_location(job.output, job.entry.name, job.split))  # incomplete until rewritten
    if not storage.is_uri(job.directory):
        storage.makedirs(job.directory)  # a local rename needs the folder; an object store has none
    for r in done:
        staged = staging_location(job.output, job.entry.name, job.split, r.name)
        if r.shard is not None and storage.exists(staged):
            storage.move(staged, storage.join(job.directory, r.name))
    done = [r if r.shard is not None else _commit_empty(job, r) for r in done]
    shards = [r.shard for r in done]
    num_samples = sum(s.num_samples for s in shards)
    num_read = len(job.plan.items) + len(job.plan.quarantined)
    if num_samples + len(quarantined) != num_read:  # a reconciliation failure is a bug, never silent
        raise RuntimeError(f"{job.entry.name}/{job.split}: read {num_read} != written {num_samples} "
                           f"+ quarantined {len(quarantined)}")
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
    meta = meta_dir(job.output, job.entry.name, job.split)
    stale = [storage.join(meta, "parts"), storage.join(meta, "staging")]
    for loc in storage.list_files(job.directory, recursive=True) + [f for d in stale for f in storage.list_files(d)]:
        if loc not in keep:
            storage.delete(loc)
    storage.write_bytes_atomic(manifest_location(job.output, job.entry.name, job.split),
                               manifest.model_dump_json(indent=2).encode())
    return SplitOutcome(job.entry.name, job.split, "converted", manifest=manifest,
                        shards_written=len(results), shards_kept=len(job.kept))


def _remove_run_temps(job: SplitJob) -> None:
    """Delete the temporary files this run's shard tasks of `job` left (a task that died mid-write, once
    per attempt); files of another run are not touched."""
    if not job.specs:
        return
    staging = staging_location(job.output, job.entry.name, job.split, "x").rsplit("/", 1)[0]
    temps = tuple(f"{spec.staging}.tmp-{spec.run}-" for spec in job.specs)
    for loc in storage.list_files(staging):
        if loc.startswith(temps):
            storage.delete(loc)


def _planning_failure(entry: RegistryEntry, split: str, data_root: str, error: Exception) -> str:
    """An unexpected error while planning a split, naming the split's source files."""
    try:
        fields = entry.split_spec(split).model_dump()
        files = ", ".join(f"{k}={v}" for k, v in fields.items() if isinstance(v, str) and k != "role")
    except Exception:
        files = "?"
    root = entry.source_root(data_root)
    return (f"cannot read the source of {entry.name}/{split} ({type(error).__name__}: {error}); "
            f"its files under {root}: {files}")


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
            except Exception as e:
                error = _planning_failure(entry, split, data_root, e)
                _log.debug("planning %s/%s failed", entry.name, split, exc_info=True)
                warn(f"[convert] {entry.name}/{split}: FAILED: {error}")
                outcomes.append(SplitOutcome(entry.name, split, "failed", error=error))
                continue
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
    reported: set[str] = set()
    for result in executor(specs) if specs else []:
        job = job_of[result.name]
        results[(job.entry.name, job.split)].append(result)
        reported.add(result.name)
    for spec in specs:  # a task the executor gave up on (its worker kept dying) fails its split
        if spec.name not in reported:
            job = job_of[spec.name]
            results[(job.entry.name, job.split)].append(ShardResult(
                name=spec.name, fingerprint=spec.fingerprint,
                error=f"the shard task returned no result (its worker died); its {spec.samples()}"))
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
