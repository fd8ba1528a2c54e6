"""Errors of the data plane: a bad sample (quarantined, the job goes on) vs a bad source (the dataset fails)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


class SampleError(Exception):
    """One sample cannot be converted. It is quarantined with this reason; the job goes on.

    `field` names the offending annotation field (dotted path, e.g. "segments_info.3.bbox"),
    `file` the source file the bad value came from.
    """

    def __init__(self, reason: str, *, field: str | None = None, file: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.file = file

    def __str__(self) -> str:
        where = ", ".join(p for p in (self.file and f"file {self.file}", self.field and f"field {self.field}") if p)
        return f"{self.reason} ({where})" if where else self.reason


class SourceError(Exception):
    """A whole source is unreadable (missing or malformed annotation file): its dataset fails."""

    def __init__(self, reason: str, *, file: str, field: str | None = None):
        super().__init__(f"{file}: {reason}" + (f" (field {field})" if field else ""))
        self.reason = reason
        self.file = file
        self.field = field


@dataclass(frozen=True)
class QuarantineRecord:
    """One line of <out>/<dataset>/<split>/quarantine.jsonl."""

    dataset: str
    split: str
    source_id: str
    key: str
    reason: str
    field: str | None
    file: str | None

    def to_dict(self) -> dict:
        return asdict(self)
