"""COCO-style records shared by the readers of COCO-derived formats (panoptic, instances, REFER,
PSALM): pydantic models of the source records and the label-space parsing."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, StrictInt, StrictStr, model_validator

from xsam.data.errors import SampleError, SourceError
from xsam.data.text import clean_text

# An image id is a JSON integer or string, never a float (2000.0) or a boolean (true), which lax
# validation would turn into another image's id.
ImageId = StrictInt | StrictStr


class CocoCategory(BaseModel):
    id: int
    name: str
    isthing: int | None = Field(default=None, ge=0, le=1)  # panoptic only


class CocoImage(BaseModel):
    id: ImageId
    file_name: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _file_name_from_coco_url(cls, data: Any) -> Any:
        """LVIS image records have no file_name: use the last two parts of coco_url
        (http://images.cocodataset.org/val2017/000000000139.jpg -> val2017/000000000139.jpg),
        relative to the split's `images` folder (the COCO root), as detectron2's LVIS loader does."""
        if isinstance(data, dict) and "file_name" not in data and isinstance(data.get("coco_url"), str):
            parts = [p for p in data["coco_url"].split("/") if p]
            if len(parts) >= 2:
                data = {**data, "file_name": "/".join(parts[-2:])}
        return data


class CocoAnnotation(BaseModel):
    id: int
    image_id: ImageId
    category_id: int
    segmentation: list[Any] | dict[str, Any]
    iscrowd: int = Field(default=0, ge=0, le=1)
    area: float | None = Field(default=None, ge=0)  # the source's area (COCO AP's size ranges use it)


def require_lists(data: Any, keys: tuple[str, ...], file: str) -> dict:
    """The top-level lists a COCO-style file must have, else the whole source is unreadable."""
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise SourceError(f"missing list {key!r}", file=file, field=key)
    return data


def parse_categories(reader, records: list, file: str) -> list[dict]:
    """The label space [{id, name[, isthing]}]. Every sample shares it, so a malformed, repeated or
    non-UTF-8 category fails the source (SourceError naming the field)."""
    categories, seen = [], set()
    for i, raw in enumerate(records):
        try:
            cat = reader.validate(CocoCategory, raw, f"categories.{i}", file)
            clean_text(cat.name, f"categories.{i}.name", file)
        except SampleError as e:
            raise SourceError(e.reason, file=file, field=e.field) from e
        if cat.id in seen:
            raise SourceError(f"duplicate category id {cat.id}", file=file, field=f"categories.{i}.id")
        seen.add(cat.id)
        categories.append(cat.model_dump(exclude_none=True))
    return categories
