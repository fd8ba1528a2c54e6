"""Grounded conversation generation (GCG) sources: four formats, one unified `Sample.gcg`.

- `gcg_grandf` (GranD-f GranDf_HA, PSG-GCG): a JSON list of
  `{image_id, file_name, caption, groundings: {phrase: {token_positives: [s, e], rle_masks: [RLE]}}}`.
  Every RLE mask becomes a Segment (ids 1..n in caption order), every grounding a Phrase over all
  its masks (GLaMM unions them). As GLaMM (GranDf_gcg_ds.py `_parse_annotations`) does, the caption
  loses its surrounding double quotes and whitespace (`.strip('"').strip()`) BEFORE the token offsets
  apply, and is stored so. The span must hold the phrase (case-insensitive, stripped).
- `gcg_refcocog` (RefCOCOg-GCG): a JSON list of single-key objects
  `{key: {caption, img_file_name, refs: [{sentence, segmentation}]}}`; the caption is stripped as
  for GranD-f; each ref sentence is found in the caption (case-insensitive, after the previous phrase)
  and becomes a Phrase with one Segment. A ref whose sentence is not in the caption is skipped, as
  GLaMM (RefCOCOgGCGDataset: `if phrase.lower() in caption`) and X-SAM do, and counted in the
  manifest's `excluded`; a record left without any ref is quarantined (X-SAM drops it).
- `gcg_flickr` (Flickr30k-GCG): COCO style, `images[{id, file_name, height, width, caption}]`,
  `annotations[{id, image_id, bbox, tokens_positive: [[s, e], ...], sam_mask}]`; one Segment per
  annotation (id = annotation id), one Phrase per distinct span (annotations sharing a span share it).
  Each image entry carries one caption, so an image file with several captions gives several samples.
- `gcg_eval` (GLaMM GCG val / test): `{split}_gcg_coco_mask_gt.json` (COCO instances, RLE) +
  `{split}_gcg_coco_caption_gt.json` (COCO captions). Segments from the masks, the caption from the
  caption file, no phrases: the evaluation pairs predicted and ground-truth masks by IoU.

Captions are otherwise stored as the source gives them (GLaMM / X-SAM lowercase them when
formatting; that is the loader's business). Masks are checked and rasterised in `convert()`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pydantic import BaseModel, Field

from xsam.data.errors import SampleError, SourceError
from xsam.data.readers._gcg_common import (
    GcgEvalSplit,
    GcgReaderBase,
    GcgSplit,
    bare,
    check_span,
    find_span,
    normalise,
    phrase_entry,
    raw_id,
    safe,
    segment_entry,
)
from xsam.data.readers.base import Plan
from xsam.data.readers.coco_common import ImageId
from xsam.data.text import clean_text

__all__ = ["GcgEvalReader", "GcgEvalSplit", "GcgFlickrReader", "GcgGrandfReader", "GcgRefcocogReader", "GcgSplit"]


class _Grounding(BaseModel):
    token_positives: tuple[int, int]
    rle_masks: list[Any] = Field(min_length=1)


class _GrandfRecord(BaseModel):
    image_id: ImageId
    file_name: str
    caption: str
    groundings: dict[str, _Grounding]


class _Ref(BaseModel):
    sentence: str
    segmentation: Any  # polygons or RLE, checked in convert()


class _RefcocogRecord(BaseModel):
    caption: str
    img_file_name: str
    refs: list[_Ref]


class _FlickrImage(BaseModel):
    id: ImageId
    file_name: str
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    caption: str


class _FlickrAnnotation(BaseModel):
    id: int
    image_id: ImageId
    tokens_positive: list[tuple[int, int]] = Field(min_length=1)
    sam_mask: Any  # RLE, checked in convert()
    iscrowd: int = Field(default=0, ge=0, le=1)


class _EvalImage(BaseModel):
    id: ImageId
    file_name: str | None = None  # GLaMM's val / test files name the image "<id>.jpg"
    height: int | None = Field(default=None, gt=0)
    width: int | None = Field(default=None, gt=0)


class _EvalMask(BaseModel):
    id: int
    image_id: ImageId
    segmentation: Any  # RLE or polygons, checked in convert()
    iscrowd: int = Field(default=0, ge=0, le=1)


class _EvalCaption(BaseModel):
    image_id: ImageId
    caption: str


def _list_of(data: Any, key: str | None, file: str) -> list:
    value = data if key is None else (data.get(key) if isinstance(data, dict) else None)
    if not isinstance(value, list):
        raise SourceError(f"expected a JSON list{'' if key is None else f' under {key!r}'}", file=file,
                          field=key)
    return value


class GcgGrandfReader(GcgReaderBase):
    format = "gcg_grandf"
    version = 2
    Split = GcgSplit

    def plan(self) -> Plan:
        file = self.path(self.spec.annotations)
        records = _list_of(self.load_json(self.spec.annotations), None, file)
        plan, seen = Plan(items=[], source_files=[file]), {}
        for i, raw in enumerate(records):
            source_id = raw_id(raw, "image_id", i)
            try:
                self.claim(seen, source_id, f"{i}.image_id", file)
                rec = self.validate(_GrandfRecord, raw, str(i), file)
                clean_text(str(rec.image_id), f"{i}.image_id", file)
                clean_text(rec.file_name, f"{i}.file_name", file)
                caption = self.caption_text(_unquoted(rec.caption), f"{i}.caption", file)
                phrases, segments = self._groundings(caption, rec.groundings, str(i), file)
                image_loc = self.image_file(self.spec.images, rec.file_name, f"{i}.file_name", file)
                self.add(plan, source_id, image_loc, {
                    "image_id": source_id, "file_name": rec.file_name, "width": None, "height": None,
                    "caption": caption, "phrases": phrases, "segments": segments})
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, self.spec.annotations))
        return plan

    @staticmethod
    def _groundings(caption: str, groundings: dict[str, _Grounding], prefix: str, file: str) -> tuple[list, list]:
        """Phrases in caption order; each grounding's masks become segments numbered 1..n in that order."""
        phrases, segments = [], []
        for phrase, g in sorted(groundings.items(), key=lambda kv: tuple(kv[1].token_positives)):
            field = f"{prefix}.groundings.{safe(phrase)}"
            clean_text(phrase, field, file)
            start, end = g.token_positives
            check_span(caption, start, end, f"{field}.token_positives", file)
            if normalise(caption[start:end]) != normalise(phrase):
                raise SampleError(f"caption[{start}:{end}] is {caption[start:end]!r}, not the phrase {phrase!r}",
                                  field=f"{field}.token_positives", file=file)
            ids = []
            for k, rle in enumerate(g.rle_masks):
                ids.append(len(segments) + 1)
                segments.append(segment_entry(ids[-1], rle, f"{field}.rle_masks.{k}"))
            phrases.append(phrase_entry(caption, start, end, ids))
        return phrases, segments


class GcgRefcocogReader(GcgReaderBase):
    format = "gcg_refcocog"
    version = 2
    Split = GcgSplit

    def plan(self) -> Plan:
        file = self.path(self.spec.annotations)
        records = _list_of(self.load_json(self.spec.annotations), None, file)
        plan, seen = Plan(items=[], source_files=[file]), {}
        for i, raw in enumerate(records):
            source_id = f"record[{i}]"
            try:
                if not (isinstance(raw, dict) and len(raw) == 1 and isinstance(next(iter(raw.values())), dict)):
                    raise SampleError("expected an object with exactly one key", field=str(i), file=file)
                key, value = next(iter(raw.items()))
                source_id = safe(key)
                self.claim(seen, source_id, str(i), file)
                clean_text(key, str(i), file)
                prefix = f"{i}.{key}"
                rec = self.validate(_RefcocogRecord, value, prefix, file)
                clean_text(rec.img_file_name, f"{prefix}.img_file_name", file)
                caption = self.caption_text(_unquoted(rec.caption), f"{prefix}.caption", file)
                phrases, segments, skipped = self._locate(caption, rec.refs, prefix, file)
                if skipped:
                    reason = "RefCOCOg-GCG ref whose sentence is not in the caption (skipped, as GLaMM does)"
                    plan.excluded[reason] = plan.excluded.get(reason, 0) + skipped
                image_loc = self.image_file(self.spec.images, rec.img_file_name, f"{prefix}.img_file_name", file)
                self.add(plan, source_id, image_loc, {
                    "image_id": key, "file_name": rec.img_file_name, "width": None, "height": None,
                    "caption": caption, "phrases": phrases, "segments": segments})
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, self.spec.annotations))
        return plan

    @staticmethod
    def _locate(caption: str, refs: list[_Ref], prefix: str, file: str) -> tuple[list, list, int]:
        """Find each ref sentence in the caption -> phrases and segments (1..n) in caption order, and the
        number of refs skipped because their sentence is not in the caption (none found: SampleError)."""
        found: list[tuple[tuple[int, int], int]] = []
        taken: list[tuple[int, int]] = []
        missing: list[tuple[str, str]] = []
        pos = 0
        for j, ref in enumerate(refs):
            field = f"{prefix}.refs.{j}.sentence"
            sentence = bare(clean_text(ref.sentence, field, file))
            if not sentence:
                raise SampleError("empty ref sentence", field=field, file=file)
            span = find_span(caption, sentence, pos, taken)
            if span is None:
                missing.append((field, sentence))
                continue
            taken.append(span)
            pos = span[1]
            found.append((span, j))
        phrases, segments = [], []
        for n, ((start, end), j) in enumerate(sorted(found), 1):
            segments.append(segment_entry(n, refs[j].segmentation, f"{prefix}.refs.{j}.segmentation"))
            phrases.append(phrase_entry(caption, start, end, [n]))
        if missing and not found:
            field, sentence = missing[0]
            raise SampleError(f"no ref sentence is in the caption (the first: {sentence!r})", field=field, file=file)
        return phrases, segments, len(missing)


def _unquoted(caption: Any) -> Any:
    """GLaMM's caption clean-up, `caption.strip('"').strip()` (non-text is left to the checks)."""
    return caption.strip('"').strip() if isinstance(caption, str) else caption


class GcgFlickrReader(GcgReaderBase):
    format = "gcg_flickr"
    version = 1
    Split = GcgSplit

    def plan(self) -> Plan:
        file = self.path(self.spec.annotations)
        data = self.load_json(self.spec.annotations)
        images, annotations = _list_of(data, "images", file), _list_of(data, "annotations", file)
        by_image: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        for j, ann in enumerate(annotations):
            by_image[raw_id(ann, "image_id", j)].append((j, ann))
        plan, seen = Plan(items=[], source_files=[file]), {}
        for i, raw in enumerate(images):
            source_id = raw_id(raw, "id", i)
            try:
                self.claim(seen, source_id, f"images.{i}.id", file)
                img = self.validate(_FlickrImage, raw, f"images.{i}", file)
                clean_text(str(img.id), f"images.{i}.id", file)
                clean_text(img.file_name, f"images.{i}.file_name", file)
                caption = self.caption_text(img.caption, f"images.{i}.caption", file)
                phrases, segments = self._groundings(caption, by_image.pop(source_id, []), file)
                image_loc = self.image_file(self.spec.images, img.file_name, f"images.{i}.file_name", file)
                self.add(plan, source_id, image_loc, {
                    "image_id": source_id, "file_name": img.file_name, "width": img.width, "height": img.height,
                    "caption": caption, "phrases": phrases, "segments": segments})
            except SampleError as e:
                plan.quarantined.append(self.quarantine(source_id, e, self.spec.annotations))
        for image_id, anns in by_image.items():  # annotations of no listed image
            if image_id in seen:  # their image was quarantined before it took them
                continue
            err = SampleError(f"annotations refer to image_id {image_id} which is not in images",
                              field=f"annotations.{anns[0][0]}.image_id", file=file)
            plan.quarantined.append(self.quarantine(image_id, err, self.spec.annotations))
        return plan

    def _groundings(self, caption: str, anns: list[tuple[int, Any]], file: str) -> tuple[list, list]:
        """One segment per annotation, one phrase per distinct span (in caption order)."""
        spans: dict[tuple[int, int], list[int]] = {}
        segments, seg_ids = [], set()
        parsed = [(j, self.validate(_FlickrAnnotation, raw, f"annotations.{j}", file)) for j, raw in anns]
        for j, ann in sorted(parsed, key=lambda p: (min(p[1].tokens_positive), p[1].id)):
            if ann.id in seg_ids:
                raise SampleError(f"duplicate annotation id {ann.id}", field=f"annotations.{j}.id", file=file)
            seg_ids.add(ann.id)
            for k, (start, end) in enumerate(ann.tokens_positive):
                check_span(caption, start, end, f"annotations.{j}.tokens_positive.{k}", file)
                members = spans.setdefault((start, end), [])
                if ann.id not in members:
                    members.append(ann.id)
            segments.append(segment_entry(ann.id, ann.sam_mask, f"annotations.{j}.sam_mask", ann.iscrowd))
        phrases = [phrase_entry(caption, s, e, ids) for (s, e), ids in sorted(spans.items())]
        return phrases, segments


class GcgEvalReader(GcgReaderBase):
    format = "gcg_eval"
    version = 1
    Split = GcgEvalSplit

    @property
    def source_file(self) -> str:
        return self.spec.masks

    def plan(self) -> Plan:
        mask_file, cap_file = self.path(self.spec.masks), self.path(self.spec.captions)
        mask_data, cap_data = self.load_json(self.spec.masks), self.load_json(self.spec.captions)
        images, mask_anns = _list_of(mask_data, "images", mask_file), _list_of(mask_data, "annotations", mask_file)
        cap_images, cap_anns = _list_of(cap_data, "images", cap_file), _list_of(cap_data, "annotations", cap_file)
        masks_of: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        for j, ann in enumerate(mask_anns):
            masks_of[raw_id(ann, "image_id", j)].append((j, ann))
        captions_of: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        for j, ann in enumerate(cap_anns):
            captions_of[raw_id(ann, "image_id", j)].append((j, ann))
        for j, img in enumerate(cap_images):
            captions_of.setdefault(raw_id(img, "id", j), [])
        plan, seen = Plan(items=[], source_files=[mask_file, cap_file]), {}
        for i, raw in enumerate(images):
            source_id = raw_id(raw, "id", i)
            try:
                self.claim(seen, source_id, f"images.{i}.id", mask_file)
                img = self.validate(_EvalImage, raw, f"images.{i}", mask_file)
                clean_text(str(img.id), f"images.{i}.id", mask_file)
                if source_id not in captions_of:
                    raise SampleError(f"image {source_id} is in the mask file but not in the caption file",
                                      field=f"images.{i}.id", file=cap_file)
                caption = self._caption(source_id, captions_of.pop(source_id), cap_file)
                file_name = img.file_name if img.file_name is not None else f"{source_id}.jpg"
                clean_text(file_name, f"images.{i}.file_name", mask_file)
                segments = []
                for j, raw_ann in masks_of.pop(source_id, []):
                    ann = self.validate(_EvalMask, raw_ann, f"annotations.{j}", mask_file)
                    if any(s["id"] == ann.id for s in segments):
                        raise SampleError(f"duplicate annotation id {ann.id}", field=f"annotations.{j}.id",
                                          file=mask_file)
                    segments.append(segment_entry(ann.id, ann.segmentation, f"annotations.{j}.segmentation",
                                                  ann.iscrowd))
                image_loc = self.image_file(self.spec.images, file_name, f"images.{i}.file_name", mask_file)
                self.add(plan, source_id, image_loc, {
                    "image_id": source_id, "file_name": file_name, "width": img.width, "height": img.height,
                    "caption": caption, "phrases": [], "segments": segments})
            except SampleError as e:
                captions_of.pop(source_id, None)
                masks_of.pop(source_id, None)
                plan.quarantined.append(self.quarantine(source_id, e, self.spec.masks))
        for image_id in list(captions_of):  # captioned, but no image entry in the mask file
            masks_of.pop(image_id, None)
            err = SampleError(f"image {image_id} is in the caption file but not in the mask file's images",
                              field="images", file=mask_file)
            plan.quarantined.append(self.quarantine(image_id, err, self.spec.masks))
        for image_id, anns in masks_of.items():  # masks of an image listed nowhere
            err = SampleError(f"mask annotations refer to image_id {image_id} which is in neither file",
                              field=f"annotations.{anns[0][0]}.image_id", file=mask_file)
            plan.quarantined.append(self.quarantine(image_id, err, self.spec.masks))
        return plan

    def _caption(self, image_id: str, entries: list[tuple[int, Any]], file: str) -> str:
        if not entries:
            raise SampleError(f"image {image_id} has no caption annotation", field="annotations", file=file)
        if len(entries) > 1:
            raise SampleError(f"image {image_id} has {len(entries)} captions; GCG expects one",
                              field=f"annotations.{entries[1][0]}", file=file)
        j, raw = entries[0]
        cap = self.validate(_EvalCaption, raw, f"annotations.{j}", file)
        return self.caption_text(cap.caption, f"annotations.{j}.caption", file)
