"""Shared pieces of the GCG readers (xsam.data.readers.gcg): the common work-item payload, caption
span checks, phrase search and the convert step every GCG format shares.

Every GCG format plans to the same payload, so one `convert()` serves all four::

    {"image_id": str, "file_name": str, "width": int | None, "height": int | None,
     "caption": str,
     "phrases": [{"start", "end", "text", "segment_ids"}],          # caption order
     "segments": [{"id", "iscrowd", "field", "source"}]}             # source = polygons or RLE

`width` / `height` are None where the format does not carry the image size (GranD-f, RefCOCOg-GCG):
masks are then checked and rasterised against the size probed from the image file. `field` is the
dotted path of the source mask, so an invalid mask is quarantined naming it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from xsam.data import masks
from xsam.data.errors import QuarantineRecord, SampleError
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.registry import SplitSpec
from xsam.data.schema import GroundedCaption, Phrase, Sample, Segment
from xsam.data.text import clean_text

_QUOTES = "\"'`"


class GcgSplit(SplitSpec):
    annotations: str  # the GCG annotation JSON
    images: str  # image folder


class GcgEvalSplit(SplitSpec):
    masks: str  # {val,test}_gcg_coco_mask_gt.json
    captions: str  # {val,test}_gcg_coco_caption_gt.json
    images: str  # image folder


def bare(text: str) -> str:
    """Text without surrounding whitespace and quotes."""
    return text.strip().strip(_QUOTES).strip()


def normalise(text: str) -> str:
    """Phrase comparison key: case-folded, surrounding whitespace and quotes removed."""
    return bare(text).casefold()


def safe(text: str) -> str:
    """`text` with invalid UTF-8 (lone surrogates from the JSON decoder) escaped, for ids and messages."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_span(caption: str, start: int, end: int, field: str, file: str) -> None:
    """A phrase span must be a non-empty [start, end) range inside the caption."""
    if not 0 <= start < end <= len(caption):
        raise SampleError(f"phrase span [{start}, {end}] is not inside the caption ({len(caption)} characters)",
                          field=field, file=file)


def find_span(caption: str, sentence: str, start_at: int, taken: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Locate `sentence` in `caption`, case-insensitively, not overlapping a `taken` span.

    The first occurrence at or after `start_at` (the end of the previous phrase) wins; when the
    source lists its phrases out of caption order, an earlier free occurrence is the fallback."""
    pattern = re.compile(re.escape(sentence), re.IGNORECASE)
    for origin in (start_at, 0):
        for m in pattern.finditer(caption, origin):
            if not any(m.start() < e and s < m.end() for s, e in taken):
                return m.span()
    return None


def raw_id(raw: Any, key: str, index: int) -> str:
    """The source id of a record for quarantine lines, even when the record is malformed."""
    if isinstance(raw, dict) and isinstance(raw.get(key), (int, str)) and not isinstance(raw.get(key), bool):
        return safe(str(raw[key]))
    return f"record[{index}]"


def segment_entry(seg_id: int, source: Any, field: str, iscrowd: int = 0) -> dict:
    return {"id": seg_id, "iscrowd": iscrowd, "field": field, "source": source}


def phrase_entry(caption: str, start: int, end: int, segment_ids: list[int]) -> dict:
    return {"start": start, "end": end, "text": caption[start:end], "segment_ids": segment_ids}


def segment_from_source(entry: dict, height: int, width: int) -> Segment:
    """Validate and rasterise one source mask (polygons / RLE) at the image size."""
    rle = masks.rle_from_source(entry["source"], height, width, field=entry["field"])
    area, bbox = masks.area_bbox(rle)
    return Segment(id=entry["id"], category_id=None, iscrowd=entry["iscrowd"], bbox=tuple(bbox), area=area, mask=rle)


class GcgReaderBase(Reader):
    """Plan bookkeeping and the shared convert step of the GCG formats."""

    @staticmethod
    def claim(seen: dict[str, str], source_id: str, id_field: str, file: str) -> None:
        """Reserve a source id; a second record with the same id is quarantined (keys must be unique)."""
        if source_id in seen:
            raise SampleError(f"duplicate source id {source_id!r} (first at {seen[source_id]})", field=id_field,
                              file=file)
        seen[source_id] = id_field

    def add(self, plan: Plan, source_id: str, image_loc: str, payload: dict) -> None:
        plan.items.append(self.item(source_id, [image_loc], payload, self.source_file))

    def quarantine(self, source_id: str, error: SampleError, source_file: str | None = None) -> QuarantineRecord:
        """As the base, with lone surrogates (e.g. a non-UTF-8 phrase key in a field path) escaped:
        the quarantine file is written as UTF-8."""
        record = super().quarantine(source_id, error, source_file)
        return replace(record, reason=safe(record.reason), field=record.field and safe(record.field))

    @property
    def source_file(self) -> str:
        """Registry-relative annotation file named in provenance (the mask file for gcg_eval)."""
        return self.spec.annotations

    def caption_text(self, value: Any, field: str, file: str) -> str:
        caption = clean_text(value, field, file)
        if not caption.strip():
            raise SampleError("empty caption", field=field, file=file)
        return caption

    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        p = item.payload
        expect = (p["width"], p["height"]) if p["width"] is not None and p["height"] is not None else None
        image_bytes, info = self.read_image(item.files[0], expect=expect)
        segments = [segment_from_source(s, info.height, info.width) for s in p["segments"]]
        phrases = [Phrase(**ph) for ph in p["phrases"]]
        gcg = GroundedCaption(caption=p["caption"], phrases=phrases)
        image = self.image_info(p["image_id"], p["file_name"], info)
        return image_bytes, self.sample(item, image, segments=segments, gcg=gcg)
