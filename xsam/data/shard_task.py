"""One shard task of the conversion (xsam/data/convert.py): what a worker gets (`ShardSpec`), what it
does (`write_shard`: convert the shard's samples, quarantine the bad ones, commit the tar to the split's
staging folder, then its commit record) and what it reports (`ShardResult`). Nothing here touches a
split's manifest or its published shards: the driver does, once the split passes its checks.

Per-sample guards: a SampleError / SourceError is quarantined with its field; any other error a sample
can raise on its own (a malformed value's ValueError / TypeError / KeyError / IndexError, an overflow,
a recursion or memory error) is quarantined as a malformed sample too; only errors of the shard as a
whole (storage, a bug outside the sample loop) fail the shard, and with it its split.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field

from xsam.data import expansion, storage
from xsam.data.errors import QuarantineRecord, SampleError, SourceError
from xsam.data.readers.base import Reader, WorkItem
from xsam.data.shards import ShardInfo, ShardWriter


@dataclass
class ShardSpec:
    """One shard task: everything a worker needs, picklable."""

    reader: Reader
    items: list[WorkItem]
    location: str  # the tar's final place (the driver moves it there from `staging`)
    staging: str  # where the worker commits the tar
    record_location: str
    fingerprint: str
    run: str  # this conversion run's tag, part of the worker's temporary file names

    @property
    def name(self) -> str:
        return self.location.rsplit("/", 1)[-1]

    def samples(self, limit: int = 5) -> str:
        """The shard's samples, for an error message: count and the first `limit` (key, source id, file)."""
        shown = ", ".join(f"{it.key} (source id {it.source_id!r} in {it.source_file})" for it in self.items[:limit])
        more = f" and {len(self.items) - limit} more" if len(self.items) > limit else ""
        return f"{len(self.items)} sample(s): {shown}{more}"


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
    def from_json(cls, text: str | bytes) -> ShardResult:
        d = json.loads(text)
        return cls(name=d["name"], fingerprint=d["fingerprint"],
                   shard=ShardInfo.model_validate(d["shard"]) if d["shard"] else None,
                   quarantined=[QuarantineRecord(**q) for q in d["quarantined"]], error=d["error"])



def write_shard(spec: ShardSpec) -> ShardResult:
    """Convert the items of one shard and commit the tar, then its commit record.

    A bad sample is quarantined; any other failure (storage down, a bug) fails the shard, which
    fails its split but not the job. A shard with no good sample commits nothing. The tar is committed
    to `spec.staging`; the driver moves it into place once its split passes its checks."""
    try:
        reader = spec.reader
        quarantined: list[QuarantineRecord] = []
        writer = ShardWriter(spec.staging, tag=spec.run)
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
                except (ValueError, TypeError, KeyError, IndexError, ArithmeticError, RecursionError,
                        MemoryError) as e:  # per-sample guard: one odd record never stops its shard
                    err = SampleError(f"malformed sample ({type(e).__name__}: {e})", file=item.files[0] if item.files else None)
                    quarantined.append(reader.quarantine(item.source_id, err, item.source_file))
                    continue
                writer.add(item.key, image, record)
                records += expansion.num_records(sample)
            if writer.num_samples == 0:
                writer.abort()
                return ShardResult(name=spec.name, fingerprint=spec.fingerprint, quarantined=quarantined)
            info = writer.commit()
            info.num_records = records
        except BaseException:
            writer.abort()
            raise
        result = ShardResult(name=spec.name, fingerprint=spec.fingerprint, shard=info, quarantined=quarantined)
        storage.write_bytes_atomic(spec.record_location, result.to_json().encode())
        return result
    except Exception as e:
        return ShardResult(name=spec.name, fingerprint=spec.fingerprint,
                           error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")


def serial_executor(specs: list[ShardSpec]) -> Iterable[ShardResult]:
    return [write_shard(s) for s in specs]


