"""COCO instances format: one JSON of `images`, `annotations` and `categories` + an image folder.

    {"images": [{"id", "file_name", "width", "height", ...}],
     "annotations": [{"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}],
     "categories": [{"id", "name", ...}]}

`segmentation` is a list of polygons (flat [x0, y0, x1, y1, ...] lists), an uncompressed RLE
({"size": [h, w], "counts": [int, ...]}, COCO's crowd regions) or a compressed RLE (counts as a
string). Used for COCO instances (instance AP), ADE20K-150 instance and LVIS-like sources (LVIS
image records carry only `coco_url`: the file name is then `<folder>/<name>` taken from it).

Mapping to the unified `Sample`: one sample per image, with every annotation of the image as a
`Segment` (id = annotation id, category_id, iscrowd, mask = the segmentation as compressed RLE at
the image size, area / bbox = pixel count and box of that mask, source_area = the annotation's own
`area` when it has one, for COCO AP's small / medium / large split); images with no annotation are
samples with no segments; `categories` [{id, name}] is the split's label space.

Planning quarantines, per image: a malformed image entry, a malformed annotation (field named),
an unknown category_id, duplicate annotation ids, and (as one record per missing image id)
annotations whose image_id has no image entry. Converting quarantines an image whose size differs
from its entry and any invalid polygon or RLE (field `annotations.<index>.segmentation...`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any


from xsam.data import masks
from xsam.data.errors import SampleError
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.readers.coco_common import CocoAnnotation, CocoImage, parse_categories, require_lists
from xsam.data.registry import SplitSpec
from xsam.data.schema import Sample, Segment


class CocoInstancesSplit(SplitSpec):
    annotations: str  # COCO instances JSON (polygons, RLE, crowd)
    images: str  # image folder


def _id_of(record: Any, key: str) -> str | None:
    """str(record[key]) when record is a dict holding an int or str id there, else None."""
    if not isinstance(record, dict):
        return None
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return str(value)


class CocoInstancesReader(Reader):
    format = "coco_instances"
    version = 2
    Split = CocoInstancesSplit

    # -- planning --------------------------------------------------------------------------------
    def plan(self) -> Plan:
        file = self.path(self.spec.annotations)
        data = self.load_json(self.spec.annotations)
        require_lists(data, ("images", "annotations", "categories"), file)
        plan = Plan(items=[], categories=parse_categories(self, data["categories"], file), source_files=[file])
        known = {c["id"] for c in plan.categories}
        images, refused = self._parse_images(data["images"], file, plan)
        groups, errors, orphans = self._group_annotations(data["annotations"], images, refused, known, file)
        for image_id, (first, count) in orphans.items():
            reason = (f"{count} annotation(s) refer to image_id {image_id}, which has no entry in images"
                      if not image_id.startswith("annotations[") else "annotation without a valid image_id")
            err = SampleError(reason, field=f"annotations.{first}.image_id", file=file)
            plan.quarantined.append(self.quarantine(image_id, err, file))
        for source_id, (i, img) in images.items():
            try:
                if source_id in errors:
                    raise errors[source_id]
                location = self.image_file(self.spec.images, img.file_name, f"images.{i}.file_name", file)
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, file))
                continue
            payload = {"image_id": source_id, "file_name": img.file_name, "width": img.width, "height": img.height,
                       "annotations": groups.get(source_id, [])}
            plan.items.append(self.item(source_id, [location], payload, self.spec.annotations))
        return plan

    def _parse_images(self, records: list, file: str, plan: Plan) -> tuple[dict[str, tuple[int, CocoImage]], set[str]]:
        """Valid image entries by id (in source order), and the ids of the refused ones.

        A malformed entry is quarantined; ids held by several entries are refused on every one."""
        counts = Counter(_id_of(raw, "id") for raw in records)
        images: dict[str, tuple[int, CocoImage]] = {}
        refused: set[str] = set()
        for i, raw in enumerate(records):
            source_id = _id_of(raw, "id")
            try:
                if source_id is not None and counts[source_id] > 1:
                    raise SampleError(f"image id {source_id} is used by {counts[source_id]} image entries",
                                      field=f"images.{i}.id", file=file)
                img = self.validate(CocoImage, raw, f"images.{i}", file)
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id or f"images[{i}]", e, file))
                if source_id is not None:
                    refused.add(source_id)
                continue
            images[source_id] = (i, img)
        return images, refused

    def _group_annotations(self, records: list, images: dict, refused: set[str], known: set[int], file: str
                           ) -> tuple[dict[str, list[dict]], dict[str, SampleError], dict[str, tuple[int, int]]]:
        """Annotations grouped by image id as plain payload dicts, the first error of each image,
        and the ids of missing images that annotations point at: id -> (first index, count)."""
        groups: dict[str, list[dict]] = {}
        errors: dict[str, SampleError] = {}
        orphans: dict[str, tuple[int, int]] = {}
        for i, raw in enumerate(records):
            image_id = _id_of(raw, "image_id")
            if image_id in refused:
                continue  # its image is quarantined already
            if image_id is None or image_id not in images:
                key = image_id if image_id is not None else f"annotations[{i}]"
                first, count = orphans.get(key, (i, 0))
                orphans[key] = (first, count + 1)
                continue
            if image_id in errors:
                continue
            try:
                ann = self.validate(CocoAnnotation, raw, f"annotations.{i}", file)
                if ann.category_id not in known:
                    raise SampleError(f"unknown category_id {ann.category_id}", field=f"annotations.{i}.category_id",
                                      file=file)
                group = groups.setdefault(image_id, [])
                if any(a["id"] == ann.id for a in group):
                    raise SampleError(f"annotation id {ann.id} appears twice in image {image_id}",
                                      field=f"annotations.{i}.id", file=file)
            except SampleError as e:
                errors[image_id] = e
                continue
            group.append({"index": i, "id": ann.id, "category_id": ann.category_id, "iscrowd": ann.iscrowd,
                          "segmentation": ann.segmentation, "area": ann.area})
        return groups, errors, orphans

    # -- conversion ------------------------------------------------------------------------------
    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        p = item.payload
        image_bytes, info = self.read_image(item.files[0], expect=(p["width"], p["height"]))
        image = self.image_info(p["image_id"], p["file_name"], info)
        return image_bytes, self.sample(item, image, segments=self.segments(p))

    def segments(self, payload: dict) -> list[Segment]:
        """The payload's annotations as Segments; an invalid polygon / RLE raises SampleError."""
        out = []
        for a in payload["annotations"]:
            rle = masks.rle_from_source(a["segmentation"], payload["height"], payload["width"],
                                        field=f"annotations.{a['index']}.segmentation")
            area, bbox = masks.area_bbox(rle)
            out.append(Segment(id=a["id"], category_id=a["category_id"], iscrowd=a["iscrowd"], bbox=tuple(bbox),
                               area=area, mask=rle, source_area=a.get("area")))
        return out
