"""PSALM COCO-Interactive (`psalm_interactive`): COCO instances with rasterised visual prompts.

The source is a JSON list, one entry per image::

    {"image": "000000000139.jpg", "image_info": {"id", "file_name", "height", "width"},
     "anns": [{"id", "category_id", "bbox", "iscrowd", "area", "segmentation",
               "point_visual_prompt_mask" | "scribble_visual_prompt_mask" |
               "box_visual_prompt_mask" | "mask_visual_prompt_mask": polygons or RLE}]}

One sample per image (entries repeating an image id are merged): `segments` from the annotations
(id = annotation id, COCO category ids), `visual_prompts` one per (annotation, prompt type present),
aimed at its annotation by `segment_id`. A prompt whose mask is empty is dropped (the X-SAM
evaluation skips it too). Point and scribble prompts are dilated as X-SAM reads PSALM's file
(intseg_dataset.py `_process_visual_prompts`: `enhance_with_circles`, radius `point_radius` = 10 /
`scribble_radius` = 5 of vgdseg_dataset.py): every prompt pixel becomes a disc of that radius
(pixels at Euclidean distance <= r), options `point_radius` / `scribble_radius` (0: as stored).
Box and mask prompts are stored as the source draws them. The evaluation expands one query per
(annotation, prompt type); that belongs to the loader.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from xsam.data import masks
from xsam.data.errors import SampleError, SourceError
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.readers.coco_common import ImageId
from xsam.data.registry import SplitSpec
from xsam.data.schema import PromptType, Sample, Segment, VisualPrompt
from xsam.data.text import clean_text


class PsalmInteractiveSplit(SplitSpec):
    annotations: str  # PSALM COCO-Interactive JSON list
    images: str  # image folder


class PsalmInteractiveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    point_radius: int = Field(default=10, ge=0)  # disc radius of point prompts (X-SAM's IntSegDataset)
    scribble_radius: int = Field(default=5, ge=0)  # disc radius of scribble prompts


def dilate_discs(mask: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: the union of the discs of `radius` (Euclidean distance <= radius,
    clipped to the image) around every set pixel; X-SAM's `enhance_with_circles`. radius 0 or an
    empty mask: the mask itself."""
    mask = np.asarray(mask, bool)
    if radius <= 0 or not mask.any():
        return mask.copy()
    # exact distances to the nearest set pixel; sqrt(d2) <= r  <=>  d2 <= r^2 for integer d2 and r
    return ndimage.distance_transform_edt(~mask) <= radius


def _prompt_key(kind: PromptType) -> str:
    return f"{kind.value}_visual_prompt_mask"


class _ImageInfo(BaseModel):
    id: ImageId
    file_name: str
    height: int = Field(gt=0)
    width: int = Field(gt=0)


class _Ann(BaseModel):
    id: int
    category_id: int
    iscrowd: int = Field(default=0, ge=0, le=1)
    segmentation: Any  # polygons or RLE, checked in convert()
    point_visual_prompt_mask: Any = None
    scribble_visual_prompt_mask: Any = None
    box_visual_prompt_mask: Any = None
    mask_visual_prompt_mask: Any = None


class _Entry(BaseModel):
    image: str
    image_info: _ImageInfo
    anns: list[_Ann]


def _raw_image_id(raw: Any, index: int) -> str:
    info = raw.get("image_info") if isinstance(raw, dict) else None
    value = info.get("id") if isinstance(info, dict) else None
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return f"record[{index}]"


class PsalmInteractiveReader(Reader):
    format = "psalm_interactive"
    version = 2  # 2: point / scribble prompts dilated as X-SAM reads them
    Split = PsalmInteractiveSplit
    Options = PsalmInteractiveOptions

    def plan(self) -> Plan:
        file = self.path(self.spec.annotations)
        records = self.load_json(self.spec.annotations)
        if not isinstance(records, list):
            raise SourceError("expected a JSON list of image entries", file=file)
        groups: dict[str, list[tuple[int, Any]]] = {}
        for i, raw in enumerate(records):
            groups.setdefault(_raw_image_id(raw, i), []).append((i, raw))
        plan = Plan(items=[], source_files=[file])
        for source_id, entries in groups.items():
            try:
                payload, image_loc = self._merge(source_id, entries, file)
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, self.spec.annotations))
                continue
            plan.items.append(self.item(source_id, [image_loc], payload, self.spec.annotations))
        return plan

    def _merge(self, source_id: str, entries: list[tuple[int, Any]], file: str) -> tuple[dict, str]:
        """Validate the entries of one image and merge their annotations into one payload."""
        first: _Entry | None = None
        anns: list[dict] = []
        seen: set[int] = set()
        for i, raw in entries:
            entry = self.validate(_Entry, raw, str(i), file)
            clean_text(str(entry.image_info.id), f"{i}.image_info.id", file)
            clean_text(entry.image, f"{i}.image", file)
            if first is None:
                first = entry
            elif (entry.image, entry.image_info.width, entry.image_info.height) != (
                    first.image, first.image_info.width, first.image_info.height):
                raise SampleError(f"entries of image {source_id} disagree on its file or size", field=f"{i}.image",
                                  file=file)
            for k, ann in enumerate(entry.anns):
                prefix = f"{i}.anns.{k}"
                if ann.id in seen:
                    raise SampleError(f"duplicate annotation id {ann.id}", field=f"{prefix}.id", file=file)
                seen.add(ann.id)
                prompts = {kind.value: getattr(ann, _prompt_key(kind)) for kind in PromptType
                           if getattr(ann, _prompt_key(kind)) is not None}
                anns.append({"id": ann.id, "category_id": ann.category_id, "iscrowd": ann.iscrowd, "prefix": prefix,
                             "segmentation": ann.segmentation, "prompts": prompts})
        image_loc = self.image_file(self.spec.images, first.image, f"{entries[0][0]}.image", file)
        payload = {"image_id": str(first.image_info.id), "file_name": first.image, "width": first.image_info.width,
                   "height": first.image_info.height, "anns": anns}
        return payload, image_loc

    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        p = item.payload
        image_bytes, info = self.read_image(item.files[0], expect=(p["width"], p["height"]))
        h, w = info.height, info.width
        segments, prompts = [], []
        for ann in p["anns"]:
            rle = masks.rle_from_source(ann["segmentation"], h, w, field=f"{ann['prefix']}.segmentation")
            area, bbox = masks.area_bbox(rle)
            segments.append(Segment(id=ann["id"], category_id=ann["category_id"], iscrowd=ann["iscrowd"],
                                    bbox=tuple(bbox), area=area, mask=rle))
            for kind in PromptType:  # fixed order: point, scribble, box, mask
                if kind.value not in ann["prompts"]:
                    continue
                field = f"{ann['prefix']}.{_prompt_key(kind)}"
                prompt = masks.rle_from_source(ann["prompts"][kind.value], h, w, field=field)
                if masks.area_bbox(prompt)[0] == 0:
                    continue
                radius = {PromptType.point: self.options.point_radius,
                          PromptType.scribble: self.options.scribble_radius}.get(kind, 0)
                if radius:
                    prompt = masks.encode(dilate_discs(masks.decode(prompt), radius))
                prompts.append(VisualPrompt(type=kind, mask=prompt, segment_id=ann["id"]))
        image = self.image_info(p["image_id"], p["file_name"], info)
        return image_bytes, self.sample(item, image, segments=segments, visual_prompts=prompts)
