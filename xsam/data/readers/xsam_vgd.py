"""X-SAM's released VGD annotation files (`xsam_vgd`): COCO instances with FROZEN visual prompts.

The original evaluates visual-grounded segmentation on prompts drawn once and published
(huggingface.co/hao9610/X-SAM, `vgdseg_annotations/`; the val file is `coco_vgdseg_val.json`, the
evaluation config reads it as `coco_vgd/annotations/vgdseg_val.json`). The layout is what
`VGDSegDataset._process_batch_data` writes (xsam/xsam/dataset/vgdseg_dataset.py): a JSON list, one
record per COCO image that has annotations::

    {"image_file": "000000000139.jpg", "image_id": 139, "image_size": [h, w],
     "image_info": {"file_name", "image_id", "height", "width"},
     "annotations": [{"id", "image_id", "category_id" (COCO id), "segmentation" (polygons or RLE with
                      str counts), "area", "bbox", "iscrowd": 0, "bbox_mode": 1,
                      "visual_prompts": {"point_visual_prompt" | "scribble_visual_prompt" |
                                         "box_visual_prompt" | "mask_visual_prompt": RLE}}]}

Crowd annotations were left out when the file was written; the point / scribble prompts are stored
already dilated. The records hold no category list: the split's `categories` file (the COCO
instances JSON the file was made from, the original's `source_data_path`) gives the label space.

Mapping to the unified `Sample`: one sample per record; `segments` = its annotations (id =
annotation id, COCO category id, iscrowd as stored, mask = the segmentation as compressed RLE,
area / bbox = pixel count and box of that mask); `visual_prompts` = one per (annotation, prompt
type present) in the fixed order point, scribble, box, mask, aimed at the annotation by
`segment_id`, as stored (no redrawing). A prompt whose mask is empty is dropped (the original's
evaluation skips the annotation for that type); a crowd annotation gets no prompt.

Planning quarantines a malformed record or annotation (field named), a category id not in the
label space, an annotation id repeated within a record, and every record of an image id listed
twice. Converting quarantines an image whose size differs from `image_size`, an invalid polygon
or RLE, and a prompt of another size (field `<record>.annotations.<k>.visual_prompts.<key>...`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from xsam.data import masks
from xsam.data.errors import SampleError, SourceError
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.readers.coco_common import ImageId, parse_categories, require_lists
from xsam.data.registry import SplitSpec
from xsam.data.schema import PromptType, Sample, Segment, VisualPrompt
from xsam.data.text import clean_text


class XsamVgdSplit(SplitSpec):
    annotations: str  # the released VGD JSON list (coco_vgdseg_{train,val}.json)
    categories: str  # the COCO instances JSON it was made from: its `categories` are the label space
    images: str  # image folder


def prompt_key(kind: PromptType) -> str:
    """The release's key of a prompt type: "point" -> "point_visual_prompt"."""
    return f"{kind.value}_visual_prompt"


_PROMPT_KEYS = {prompt_key(kind): kind for kind in PromptType}


class _Ann(BaseModel):
    model_config = ConfigDict(extra="allow")  # area, bbox, bbox_mode, image_id: recomputed or unused
    id: int
    category_id: int
    segmentation: list[Any] | dict[str, Any]
    iscrowd: int = Field(default=0, ge=0, le=1)
    visual_prompts: dict[str, Any] = {}


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_info (its file name / size repeat the fields below)
    image_file: str
    image_id: ImageId
    image_size: tuple[int, int]  # (height, width)
    annotations: list[_Ann]


def _record_id(raw: Any, index: int) -> str:
    value = raw.get("image_id") if isinstance(raw, dict) else None
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return f"record[{index}]"


class XsamVgdReader(Reader):
    format = "xsam_vgd"
    version = 1
    Split = XsamVgdSplit

    def plan(self) -> Plan:
        file = self.path(self.spec.annotations)
        records = self.load_json(self.spec.annotations)
        if not isinstance(records, list):
            raise SourceError("expected a JSON list of image records", file=file)
        cat_file = self.path(self.spec.categories)
        cat_doc = require_lists(self.load_json(self.spec.categories), ("categories",), cat_file)
        plan = Plan(items=[], categories=parse_categories(self, cat_doc["categories"], cat_file),
                    source_files=[file, cat_file])
        known = {c["id"] for c in plan.categories}
        ids = [_record_id(raw, i) for i, raw in enumerate(records)]
        counts = Counter(ids)
        for i, (raw, source_id) in enumerate(zip(records, ids)):
            try:
                if counts[source_id] > 1:
                    raise SampleError(f"image id {source_id} is listed by {counts[source_id]} records",
                                      field=f"{i}.image_id", file=file)
                payload, image_loc = self._payload(raw, i, known, file)
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, self.spec.annotations))
                continue
            plan.items.append(self.item(source_id, [image_loc], payload, self.spec.annotations))
        return plan

    def _payload(self, raw: Any, i: int, known: set[int], file: str) -> tuple[dict, str]:
        rec = self.validate(_Record, raw, str(i), file)
        clean_text(rec.image_file, f"{i}.image_file", file)
        height, width = rec.image_size
        if height <= 0 or width <= 0:
            raise SampleError(f"invalid image_size {list(rec.image_size)}", field=f"{i}.image_size", file=file)
        anns, seen = [], set()
        for k, ann in enumerate(rec.annotations):
            prefix = f"{i}.annotations.{k}"
            if ann.category_id not in known:
                raise SampleError(f"unknown category_id {ann.category_id}", field=f"{prefix}.category_id", file=file)
            if ann.id in seen:
                raise SampleError(f"annotation id {ann.id} appears twice", field=f"{prefix}.id", file=file)
            seen.add(ann.id)
            unknown = sorted(set(ann.visual_prompts) - set(_PROMPT_KEYS))
            if unknown:
                raise SampleError(f"unknown visual prompt {unknown[0]!r}; known: {', '.join(_PROMPT_KEYS)}",
                                  field=f"{prefix}.visual_prompts.{unknown[0]}", file=file)
            anns.append({"id": ann.id, "category_id": ann.category_id, "iscrowd": ann.iscrowd, "prefix": prefix,
                         "segmentation": ann.segmentation, "prompts": dict(ann.visual_prompts)})
        image_loc = self.image_file(self.spec.images, rec.image_file, f"{i}.image_file", file)
        payload = {"image_id": str(rec.image_id), "file_name": rec.image_file, "width": width, "height": height,
                   "anns": anns}
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
            if ann["iscrowd"]:
                continue
            for kind in PromptType:  # fixed order: point, scribble, box, mask
                key = prompt_key(kind)
                if key not in ann["prompts"]:
                    continue
                field = f"{ann['prefix']}.visual_prompts.{key}"
                prompt = masks.rle_from_source(ann["prompts"][key], h, w, field=field)
                if masks.area_bbox(prompt)[0] > 0:
                    prompts.append(VisualPrompt(type=kind, mask=prompt, segment_id=ann["id"]))
        image = self.image_info(p["image_id"], p["file_name"], info)
        return image_bytes, self.sample(item, image, segments=segments, visual_prompts=prompts)
