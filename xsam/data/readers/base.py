"""The reader contract: one class per SOURCE FORMAT.

A reader works in two phases so the conversion job can spread the heavy part over a cluster:

- `plan()` (driver, once per dataset split): parse the annotation files into one `WorkItem` per
  output sample (an image with all its annotations, as plain picklable data), plus the label space.
  A malformed record is quarantined here with its field; an unreadable annotation file raises
  `SourceError` and fails only its dataset.
- `convert(item)` (Ray workers, per sample): read the image (and mask PNGs), check them, build the
  unified `Sample`. A bad sample raises `SampleError` and is quarantined.

A reader declares `Split`, the pydantic model of a registry split's fields, and may declare
`Options`; the registry validates entries against them.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from xsam.data import storage
from xsam.data.errors import QuarantineRecord, SampleError, SourceError
from xsam.data.images import DEFAULT_MAX_PIXELS, ImageProbe, probe
from xsam.data.registry import NoOptions, RegistryEntry, SplitSpec
from xsam.data.schema import ImageInfo, Provenance, Sample, sample_key
from xsam.data.text import loads_json


@dataclass
class WorkItem:
    """One sample to build. `files` are the data files it reads besides the annotations
    (image first); `stats` their (size, mtime ns) at planning time ((-1, -1): missing), part of
    the fingerprint, so an edited image or mask file rebuilds its split."""

    source_id: str
    key: str
    files: list[str]
    payload: dict[str, Any]
    source_file: str
    stats: list[tuple[int, int]] = field(default_factory=list)

    @property
    def est_bytes(self) -> int:
        return sum(max(size, 0) for size, _ in self.stats) + 1024


@dataclass
class Plan:
    items: list[WorkItem]
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    categories: list[dict] | None = None  # the label space: [{id, name, isthing?, ...}]
    excluded: dict[str, int] = field(default_factory=dict)  # records filtered by rule, by reason
    source_files: list[str] = field(default_factory=list)  # annotation files read, for the fingerprint


@dataclass(frozen=True)
class ConvertSettings:
    """How a conversion runs. `full_decode`: decode every image (catches corruption a header probe
    misses; `--quick-decode` turns it off). `allow_shrink`: accept a split whose good samples fall below
    half of its previous conversion's (`--allow-shrink`; not part of the fingerprint)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    full_decode: bool = True
    allow_shrink: bool = False

    def fingerprint_fields(self) -> dict:
        """The settings that change what the shards hold."""
        return {"max_pixels": self.max_pixels, "full_decode": self.full_decode}


class Reader:
    format: ClassVar[str]
    version: ClassVar[int] = 1
    Split: ClassVar[type[SplitSpec]] = SplitSpec
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, entry: RegistryEntry, split: str, data_root: str, settings: ConvertSettings | None = None):
        self.entry = entry
        self.dataset = entry.name
        self.split = split
        self.spec = entry.split_spec(split)
        self.options = entry.option_values()
        self.root = entry.source_root(data_root)
        self.settings = settings or ConvertSettings()

    # -- to implement -------------------------------------------------------------------------
    def plan(self) -> Plan:
        raise NotImplementedError

    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        """Return (original image bytes, sample). The extension is `sample.image.format`."""
        raise NotImplementedError

    # -- helpers for readers --------------------------------------------------------------------
    def path(self, relative: str) -> str:
        """A registry-given path (trusted: may go up from the root, e.g. ../coco/train2014)."""
        if storage.is_uri(relative):
            return relative
        return storage.join(self.root, posixpath.normpath(relative))

    def read_source(self, relative: str) -> bytes:
        """Read an annotation file; a missing one fails the dataset with its name."""
        location = self.path(relative)
        try:
            return storage.read_bytes(location)
        except (FileNotFoundError, OSError) as e:
            raise SourceError(f"cannot read annotation file: {e}", file=location) from e

    def load_json(self, relative: str) -> Any:
        return loads_json(self.read_source(relative), self.path(relative))

    def item(self, source_id: str, files: list[str], payload: dict, source_file: str) -> WorkItem:
        return WorkItem(source_id=source_id, key=sample_key(self.dataset, self.split, source_id),
                        files=files, payload=payload, source_file=source_file)

    def quarantine(self, source_id: str, error: SampleError, source_file: str | None = None) -> QuarantineRecord:
        return QuarantineRecord(dataset=self.dataset, split=self.split, source_id=source_id,
                                key=sample_key(self.dataset, self.split, source_id), reason=error.reason,
                                field=error.field, file=error.file or source_file)

    def validate(self, model: type[BaseModel], record: Any, prefix: str, file: str) -> BaseModel:
        """Validate one source record against a pydantic model; SampleError names the first bad field."""
        try:
            return model.model_validate(record)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
            raise SampleError(f"malformed annotation: {err['msg']}", field=loc, file=file) from e

    def image_file(self, images_dir: str, file_name: str, field: str, file: str) -> str:
        return storage.safe_join(self.path(images_dir), file_name, field=field, file=file)

    def read_image(self, location: str, expect: tuple[int, int] | None = None) -> tuple[bytes, ImageProbe]:
        """Read and check an image; `expect` = (width, height) the annotations were made for."""
        try:
            data = storage.read_bytes(location)
        except (FileNotFoundError, OSError) as e:
            raise SampleError("image file not found or unreadable", file=location) from e
        info = probe(data, file=location, max_pixels=self.settings.max_pixels, full_decode=self.settings.full_decode)
        if expect is not None and (info.width, info.height) != tuple(expect):
            raise SampleError(f"image is {info.width}x{info.height} but annotations say {expect[0]}x{expect[1]}",
                              field="image.size", file=location)
        return data, info

    def read_file(self, location: str, what: str) -> bytes:
        try:
            return storage.read_bytes(location)
        except (FileNotFoundError, OSError) as e:
            raise SampleError(f"{what} not found or unreadable", file=location) from e

    def image_info(self, image_id: Any, file_name: str, info: ImageProbe) -> ImageInfo:
        return ImageInfo(id=str(image_id), file_name=file_name, width=info.width, height=info.height,
                         format=info.format)

    def provenance(self, item: WorkItem) -> Provenance:
        return Provenance(source_file=item.source_file, source_id=item.source_id, reader=self.format,
                          reader_version=self.version)

    def sample(self, item: WorkItem, image: ImageInfo, **fields: Any) -> Sample:
        return Sample(dataset=self.dataset, split=self.split, task=self.entry.task, label_space=self.entry.label_space,
                      image=image, provenance=self.provenance(item), **fields)
