"""COCO panoptic format: `panoptic_{split}.json` + one RGB PNG per image, id = R + 256 G + 256^2 B.

Also reads ADE20K-150 panoptic (same format) and, with `merge_by_category`, gives the semantic
view of a panoptic source (one segment per category present, crowd included).

An image listed by two image entries, or by two annotation records, is quarantined on every one of
them (which image goes with which mask is unknown): never a mask stored against the wrong image.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from xsam.data import masks
from xsam.data.errors import SampleError, SourceError
from xsam.data.images import decode_rgb
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.readers.coco_common import CocoImage, ImageId, parse_categories, require_lists
from xsam.data.registry import SplitSpec
from xsam.data.schema import Sample, Segment
from xsam.data.text import clean_text


class PanopticSplit(SplitSpec):
    annotations: str  # panoptic JSON
    images: str  # folder of the RGB images
    masks: str  # folder of the panoptic PNGs


class PanopticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_by_category: bool = False  # semantic view: one segment per category


class _SegmentInfo(BaseModel):
    id: int = Field(gt=0)
    category_id: int
    iscrowd: int = Field(default=0, ge=0, le=1)
    bbox: tuple[float, float, float, float] | None = None
    area: int | None = None


class _Annotation(BaseModel):
    image_id: ImageId
    file_name: str
    segments_info: list[_SegmentInfo]


class CocoPanopticReader(Reader):
    format = "coco_panoptic"
    version = 1
    Split = PanopticSplit
    Options = PanopticOptions

    def plan(self) -> Plan:
        file = self.path(self.spec.annotations)
        data = self.load_json(self.spec.annotations)
        require_lists(data, ("images", "annotations", "categories"), file)
        categories = parse_categories(self, data["categories"], file)
        if any("isthing" not in c for c in categories):
            raise SourceError("every panoptic category needs isthing", file=file, field="categories")
        known = {c["id"] for c in categories}
        images: dict[str, dict] = {}
        entries: dict[str, list[int]] = {}  # image id -> indices of its image entries
        for i, raw in enumerate(data["images"]):
            if isinstance(raw, dict) and "id" in raw:
                images[str(raw["id"])] = raw
                entries.setdefault(str(raw["id"]), []).append(i)
        plan = Plan(items=[], categories=categories, source_files=[file])
        records: dict[str, list[int]] = {}  # image id -> indices of its annotation records
        for i, raw in enumerate(data["annotations"]):
            if isinstance(raw, dict) and raw.get("image_id") is not None:  # no id: refused by validation below
                records.setdefault(str(raw["image_id"]), []).append(i)
        twice = self._quarantine_duplicates(plan, entries, records, file)
        for i, raw in enumerate(data["annotations"]):
            source_id = str(raw.get("image_id")) if isinstance(raw, dict) else f"annotations[{i}]"
            if source_id in twice:
                continue
            try:
                ann = self.validate(_Annotation, raw, f"annotations.{i}", file)
                if source_id not in images:
                    raise SampleError(f"image_id {source_id} has no entry in images", field=f"annotations.{i}.image_id",
                                      file=file)
                img = self.validate(CocoImage, images[source_id], f"images[id={source_id}]", file)
                clean_text(img.file_name, f"images[id={source_id}].file_name", file)
                clean_text(ann.file_name, f"annotations.{i}.file_name", file)
                for j, s in enumerate(ann.segments_info):
                    if s.category_id not in known:
                        raise SampleError(f"unknown category_id {s.category_id}",
                                          field=f"annotations.{i}.segments_info.{j}.category_id", file=file)
                ids = [s.id for s in ann.segments_info]
                if len(set(ids)) != len(ids):
                    raise SampleError("duplicate segment ids", field=f"annotations.{i}.segments_info", file=file)
                image_loc = self.image_file(self.spec.images, img.file_name, f"images[id={source_id}].file_name", file)
                png_loc = self.image_file(self.spec.masks, ann.file_name, f"annotations.{i}.file_name", file)
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, file))
                continue
            payload = {"image_id": source_id, "file_name": img.file_name, "width": img.width, "height": img.height,
                       "segments": [s.model_dump() for s in ann.segments_info]}
            plan.items.append(self.item(source_id, [image_loc, png_loc], payload, self.spec.annotations))
        return plan

    def _quarantine_duplicates(self, plan: Plan, entries: dict[str, list[int]], records: dict[str, list[int]],
                               file: str) -> set[str]:
        """Quarantine every image listed by several image entries, or by several annotation records:
        which entry goes with which mask is unknown, so each of them is refused (one record per entry,
        naming its field). -> the refused image ids."""
        twice = set()
        for source_id, where in entries.items():
            if len(where) > 1:
                twice.add(source_id)
                for i in where:
                    err = SampleError(f"image id {source_id} is used by {len(where)} image entries",
                                      field=f"images.{i}.id", file=file)
                    plan.quarantined.append(self.quarantine(source_id, err, file))
        for source_id, where in records.items():
            if len(where) > 1 and source_id not in twice:
                twice.add(source_id)
                for i in where:
                    err = SampleError(f"image {source_id} has {len(where)} annotation records",
                                      field=f"annotations.{i}.image_id", file=file)
                    plan.quarantined.append(self.quarantine(source_id, err, file))
        return twice

    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        p = item.payload
        image_bytes, info = self.read_image(item.files[0], expect=(p["width"], p["height"]))
        png_bytes = self.read_file(item.files[1], "panoptic PNG")
        rgb = decode_rgb(png_bytes, file=item.files[1])
        if rgb.shape[:2] != (p["height"], p["width"]):
            raise SampleError(f"panoptic PNG is {rgb.shape[1]}x{rgb.shape[0]}, image is {p['width']}x{p['height']}",
                              file=item.files[1])
        ids = masks.panoptic_ids(rgb)
        # every pixel must be VOID (0) or belong to a declared segment, and every segment must
        # have pixels: checked by counting, which is ~10x cheaper than np.unique on the id map
        binaries, covered = {}, int(np.count_nonzero(ids == 0))
        for s in p["segments"]:
            binary = ids == s["id"]
            n = int(np.count_nonzero(binary))
            if n == 0:
                raise SampleError(f"segment id {s['id']} has no pixels in the panoptic PNG", field="segments_info",
                                  file=item.files[1])
            binaries[s["id"]] = binary
            covered += n
        if covered != ids.size:
            declared = set(binaries) | {0}
            orphans = [int(v) for v in np.unique(ids) if int(v) not in declared]
            raise SampleError(f"panoptic PNG holds segment id(s) {orphans[:5]} with no segments_info entry",
                              field="segments_info", file=item.files[1])
        if self.options.merge_by_category:
            by_cat: dict[int, list[int]] = {}
            for s in p["segments"]:
                by_cat.setdefault(s["category_id"], []).append(s["id"])
            groups = [(cat, cat, 0, seg_ids) for cat, seg_ids in sorted(by_cat.items())]
        else:
            groups = [(s["id"], s["category_id"], s["iscrowd"], [s["id"]]) for s in p["segments"]]
        segments = []
        for seg_id, cat, crowd, members in groups:
            binary = binaries[members[0]]
            for m in members[1:]:
                binary = binary | binaries[m]
            rle, area, bbox = masks.encode_with_stats(binary)
            segments.append(Segment(id=seg_id, category_id=cat, iscrowd=crowd, bbox=tuple(bbox), area=area, mask=rle))
        image = self.image_info(p["image_id"], p["file_name"], info)
        return image_bytes, self.sample(item, image, segments=segments)
