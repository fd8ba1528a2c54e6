"""REFER format: RefCOCO / RefCOCO+ / RefCOCOg (`refs(unc).p`, `refs(umd).p`) and gRefCOCO
(`grefs(unc).json`), each beside a COCO-2014 `instances.json`.

Refs are `{ref_id, ann_id, image_id, split, sentences: [{sent, raw, tokens, sent_id}],
category_id, file_name}`; gRefCOCO's `ann_id` is a LIST (zero, one or many targets, `[-1]` or `[]`
with `no_target: true` for an expression that matches nothing). The refs file is a Python 2
pickle or JSON: told apart by its content (a JSON document starts with `[` or `{`, after an optional
UTF-8 byte-order mark; a pickle never does), never by its name; pickles go through `safe_pickle` (no
code runs). An image id held by several entries of instances.json quarantines every entry.

One sample per image: every instance annotation of the image (from instances.json, referred or
not) becomes a segment whose id is the COCO annotation id, and every kept ref of the split becomes
a `ReferringExpression` with all its sentences (`sent`) and its annotation ids. No-target
expressions are dropped and counted; so are images left with no expression.
"""

from __future__ import annotations

import codecs
from typing import Any

from pydantic import BaseModel, Field

from xsam.data import masks, safe_pickle
from xsam.data.errors import SampleError, SourceError
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.readers.coco_common import CocoAnnotation, CocoImage, ImageId, parse_categories, require_lists
from xsam.data.registry import SplitSpec
from xsam.data.schema import ReferringExpression, Sample, Segment
from xsam.data.text import clean_text, loads_json


class ReferSplit(SplitSpec):
    refs: str  # refs(unc).p pickle (or gRefCOCO grefs(unc).json)
    instances: str  # instances.json
    images: str  # image folder (COCO train2014)
    ref_split: str  # keep refs whose `split` equals this


class _Sentence(BaseModel):
    sent: str


class _Ref(BaseModel):
    ref_id: int | str
    ann_id: int | list[int]
    image_id: ImageId
    split: str
    sentences: list[_Sentence] = Field(min_length=1)
    no_target: bool = False


class _Instances:
    """A COCO instances file indexed by image; annotations are validated only for the images the
    refs use (the coco_instances reader validates every image, which this format does not need)."""

    def __init__(self, data: Any, file: str, reader: Reader):
        require_lists(data, ("images", "annotations", "categories"), file)
        self.file = file
        self.categories = parse_categories(reader, data["categories"], file)
        self.category_ids = {c["id"] for c in self.categories}
        self.images: dict[str, Any] = {}
        self.entries: dict[str, list[int]] = {}  # image id -> indices of its image entries (> 1: refused)
        for i, raw in enumerate(data["images"]):
            if isinstance(raw, dict) and "id" in raw:
                self.images[str(raw["id"])] = raw
                self.entries.setdefault(str(raw["id"]), []).append(i)
        self.by_image: dict[str, list[tuple[int, Any]]] = {}
        for i, raw in enumerate(data["annotations"]):
            image_id = raw.get("image_id") if isinstance(raw, dict) else None
            self.by_image.setdefault(str(image_id), []).append((i, raw))


def _is_json(data: bytes) -> bool:
    """A JSON document starts with `[` or `{` after whitespace and an optional UTF-8 byte-order mark
    (which some editors write); a pickle starts with an opcode (protocol 2+: 0x80) and never with these."""
    return data.removeprefix(codecs.BOM_UTF8).lstrip()[:1] in (b"[", b"{")


class ReferReader(Reader):
    format = "refer"
    version = 1
    Split = ReferSplit

    def _load_refs(self) -> list:
        data = self.read_source(self.spec.refs)
        file = self.path(self.spec.refs)
        refs = loads_json(data, file) if _is_json(data) else safe_pickle.loads(data, file)
        if not isinstance(refs, list):
            raise SourceError(f"refs must be a list, got {type(refs).__name__}", file=file)
        return refs

    def _parse_ref(self, i: int, raw: Any, file: str) -> tuple[str, list[str], list[int]]:
        """-> (ref_id, sentences, target annotation ids); [] ids = no-target expression."""
        ref = self.validate(_Ref, raw, f"refs.{i}", file)
        sentences = [clean_text(s.sent, f"refs.{i}.sentences.{j}.sent", file) for j, s in enumerate(ref.sentences)]
        ids = ref.ann_id if isinstance(ref.ann_id, list) else [ref.ann_id]
        targets = list(dict.fromkeys(a for a in ids if a != -1))
        if targets and len(targets) != len(set(ids)):
            raise SampleError("ann_id mixes -1 (no target) with annotation ids", field=f"refs.{i}.ann_id", file=file)
        if ref.no_target and targets:
            raise SampleError("no_target is true but ann_id lists annotations", field=f"refs.{i}.no_target",
                              file=file)
        return str(ref.ref_id), sentences, targets

    def plan(self) -> Plan:
        refs_file, inst_file = self.path(self.spec.refs), self.path(self.spec.instances)
        refs = self._load_refs()
        inst = _Instances(self.load_json(self.spec.instances), inst_file, self)
        plan = Plan(items=[], categories=inst.categories, source_files=[refs_file, inst_file])
        no_target = 0
        exprs: dict[str, list[tuple[int, str, list[str], list[int]]]] = {}  # image -> refs, in file order
        bad: dict[str, SampleError] = {}
        for i, raw in enumerate(refs):
            image_id = raw.get("image_id") if isinstance(raw, dict) else None
            if not isinstance(raw, dict) or not isinstance(raw.get("split"), str):
                plan.quarantined.append(self.quarantine(  # split unknown: reported by every split
                    f"refs[{i}]", SampleError("ref is not a record with a `split`", field=f"refs.{i}.split"),
                    refs_file))
                continue
            if raw["split"] != self.spec.ref_split:
                continue
            source_id = str(image_id) if isinstance(image_id, (int, str)) else f"refs[{i}]"
            exprs.setdefault(source_id, [])
            try:
                ref_id, sentences, targets = self._parse_ref(i, raw, refs_file)
                if source_id not in inst.images:
                    raise SampleError(f"image_id {source_id} has no entry in instances images",
                                      field=f"refs.{i}.image_id", file=refs_file)
            except SampleError as e:
                bad.setdefault(source_id, e)
                continue
            if not targets:
                no_target += 1
                continue
            exprs[source_id].append((i, ref_id, sentences, targets))
        plan.excluded["no_target_expression"] = no_target
        for source_id, refs_of_image in exprs.items():
            if len(inst.entries.get(source_id, [])) > 1:
                self._quarantine_duplicate(plan, source_id, inst)
                continue
            try:
                if source_id in bad:
                    raise bad[source_id]
                if not refs_of_image:
                    plan.excluded["image_without_target_expression"] = (
                        plan.excluded.get("image_without_target_expression", 0) + 1)
                    continue
                plan.items.append(self._item(source_id, refs_of_image, inst))
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, refs_file))
        return plan

    def _quarantine_duplicate(self, plan: Plan, source_id: str, inst: _Instances) -> None:
        """An image id held by several entries of instances.json: which entry (file, size) the masks
        belong to is unknown, so every entry is refused, one record each naming its field."""
        where = inst.entries[source_id]
        for i in where:
            err = SampleError(f"image id {source_id} is used by {len(where)} image entries", field=f"images.{i}.id",
                              file=inst.file)
            plan.quarantined.append(self.quarantine(source_id, err, inst.file))

    def _item(self, source_id: str, refs_of_image: list, inst: _Instances) -> WorkItem:
        img = self.validate(CocoImage, inst.images[source_id], f"images[id={source_id}]", inst.file)
        clean_text(img.file_name, f"images[id={source_id}].file_name", inst.file)
        anns = []
        for index, raw in inst.by_image.get(source_id, []):
            ann = self.validate(CocoAnnotation, raw, f"annotations.{index}", inst.file)
            if ann.category_id not in inst.category_ids:
                raise SampleError(f"unknown category_id {ann.category_id}", field=f"annotations.{index}.category_id",
                                  file=inst.file)
            anns.append({"index": index, "id": ann.id, "category_id": ann.category_id, "iscrowd": ann.iscrowd,
                         "segmentation": ann.segmentation})
        ann_ids = [a["id"] for a in anns]
        if len(set(ann_ids)) != len(ann_ids):
            raise SampleError("duplicate annotation ids in one image", field=f"annotations[image_id={source_id}].id",
                              file=inst.file)
        known, referring = set(ann_ids), []
        for i, ref_id, sentences, targets in refs_of_image:
            missing = [a for a in targets if a not in known]
            if missing:
                raise SampleError(f"ann_id {missing} is not an annotation of image {source_id}",
                                  field=f"refs.{i}.ann_id", file=self.path(self.spec.refs))
            referring.append({"ref_id": ref_id, "sentences": sentences, "segment_ids": targets})
        image_loc = self.image_file(self.spec.images, img.file_name, f"images[id={source_id}].file_name", inst.file)
        payload = {"image_id": source_id, "file_name": img.file_name, "width": img.width, "height": img.height,
                   "annotations": anns, "referring": referring}
        return self.item(source_id, [image_loc], payload, self.spec.refs)

    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        p = item.payload
        image_bytes, info = self.read_image(item.files[0], expect=(p["width"], p["height"]))
        segments = []
        for a in p["annotations"]:
            try:
                rle = masks.rle_from_source(a["segmentation"], p["height"], p["width"],
                                            field=f"annotations.{a['index']}.segmentation")
            except SampleError as e:
                e.file = e.file or self.path(self.spec.instances)
                raise
            area, bbox = masks.area_bbox(rle)
            segments.append(Segment(id=a["id"], category_id=a["category_id"], iscrowd=a["iscrowd"],
                                    bbox=tuple(bbox), area=area, mask=rle))
        referring = [ReferringExpression(**r) for r in p["referring"]]
        image = self.image_info(p["image_id"], p["file_name"], info)
        return image_bytes, self.sample(item, image, segments=segments, referring=referring)
