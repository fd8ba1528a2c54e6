"""LabelMe format: ReasonSeg (LISA). A folder of images, each with a sibling LabelMe JSON::

    {"text": ["query", ...] | "query", "is_sentence": true,
     "shapes": [{"label": "target", "points": [[x, y], ...], "shape_type": "polygon"}, ...],
     "imageHeight": 480, "imageWidth": 640, ...}

plus, optionally, `explanatory/train.json`: a list of `{image: "<file name>", query, outputs}`.

Mapping: one sample per image. Shapes labelled "flag" are dropped (LISA: meaningless deprecated
annotations), shapes whose label contains "ignore" are ignore regions, every other shape is a target.
As LISA and X-SAM do, shapes are painted in decreasing area (ties: the later shape first), so a
smaller shape wins where shapes overlap: a target drawn inside a larger ignore region stays target.
Each target shape is a `Segment` (ids 1..n in shape order, no category) holding its pixels that a
target owns after painting (a target hidden entirely under a smaller ignore shape is dropped);
`ignore_mask` is the pixels an ignore shape owns. One `ReasoningQuery` holds all
queries (they all describe the targets), `is_sentence`, the explanation (`outputs` of the
explanations record of the same image file name, else None) and every target id. Labels compare
case-insensitively, as in LISA. Polygons are rasterised by pycocotools (`masks.rle_from_source`),
so the truth is well defined; LISA itself drew them with OpenCV (fillPoly + a 1 px outline).

Planning lists the folder once and reads only the explanations file; each LabelMe JSON is read
in `convert` on a worker, so a malformed one (bad JSON or field) is quarantined there, naming the
field. A file that is not UTF-8 is read as cp1252, as LISA does (some ReasonSeg files are); only one
that is neither is quarantined.
"""

from __future__ import annotations

import math
import posixpath

import numpy as np

from pydantic import BaseModel, Field

from xsam.data import masks, storage
from xsam.data.errors import SampleError, SourceError
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.registry import SplitSpec
from xsam.data.schema import ReasoningQuery, Sample, Segment
from xsam.data.text import clean_text, loads_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class LabelmeSplit(SplitSpec):
    folder: str  # folder of *.jpg with sibling LabelMe *.json
    explanations: str | None = None  # explanatory/train.json


class _Shape(BaseModel):
    label: str
    points: list[tuple[float, float]]
    shape_type: str | None = None  # LabelMe writes "polygon" or "rectangle" here; None = polygon


class _LabelmeFile(BaseModel):
    text: list[str] | str
    is_sentence: bool
    shapes: list[_Shape]
    imageHeight: int | None = Field(default=None, gt=0)
    imageWidth: int | None = Field(default=None, gt=0)


class _Explanation(BaseModel):
    image: str
    query: str | None = None
    outputs: str


def _flat_polygon(shape: _Shape, field: str, file: str) -> list[float]:
    """A shape as COCO's flat [x0, y0, x1, y1, ...] polygon (a rectangle becomes its 4 corners)."""
    kind, points = shape.shape_type or "polygon", shape.points
    if kind == "rectangle":
        if len(points) != 2:
            raise SampleError("a rectangle needs 2 corner points", field=f"{field}.points", file=file)
        (x1, y1), (x2, y2) = points
        points = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    elif kind != "polygon":
        raise SampleError(f"unsupported shape_type {kind!r} (polygon or rectangle)", field=f"{field}.shape_type",
                          file=file)
    if len(points) < 3:
        raise SampleError("a polygon needs at least 3 points", field=f"{field}.points", file=file)
    for k, point in enumerate(points):
        if not all(math.isfinite(v) for v in point):
            raise SampleError("non-finite coordinate", field=f"{field}.points.{k}", file=file)
    return [float(v) for point in points for v in point]


class LabelmeReader(Reader):
    format = "labelme"
    version = 2
    Split = LabelmeSplit

    def _explanations(self, plan: Plan) -> tuple[dict[str, str], dict[str, SampleError]]:
        """Explanations by image file name (the last record wins, as in LISA), and the first error
        of each image whose record is malformed."""
        if not self.spec.explanations:
            return {}, {}
        file = self.path(self.spec.explanations)
        records = self.load_json(self.spec.explanations)
        if not isinstance(records, list):
            raise SourceError("explanations must be a list of {image, query, outputs}", file=file)
        plan.source_files.append(file)
        found: dict[str, str] = {}
        errors: dict[str, SampleError] = {}
        for i, raw in enumerate(records):
            name = raw.get("image") if isinstance(raw, dict) else None
            if not isinstance(name, str):
                plan.quarantined.append(self.quarantine(
                    f"explanations[{i}]", SampleError("record without an image name", field=f"{i}.image"), file))
                continue
            try:
                record = self.validate(_Explanation, raw, str(i), file)
                found[name] = clean_text(record.outputs, f"{i}.outputs", file)
            except SampleError as e:
                errors.setdefault(name, e)
        return found, errors

    def plan(self) -> Plan:
        folder = self.path(self.spec.folder)
        names = {posixpath.basename(loc.replace("\\", "/")): loc for loc in storage.list_files(folder)}
        if not names:
            raise SourceError("folder is missing or empty", file=folder)
        plan = Plan(items=[], source_files=[folder])
        explanations, bad = self._explanations(plan)
        jsons = {n for n in names if n.lower().endswith(".json")}
        paired = set()
        for name in sorted(names):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            json_name = name.rsplit(".", 1)[0] + ".json"
            try:
                if json_name not in jsons:
                    raise SampleError("no LabelMe JSON beside the image", field=json_name, file=names[name])
                if name in bad:
                    raise bad[name]
            except SampleError as e:
                plan.quarantined.append(self.quarantine(name, e, names[name]))
                continue
            paired.add(json_name)
            payload = {"file_name": name, "explanation": explanations.get(name)}
            plan.items.append(self.item(name, [names[name], names[json_name]], payload,
                                        posixpath.join(self.spec.folder, json_name)))
        image_stems = {n.rsplit(".", 1)[0] for n in names if n.lower().endswith(IMAGE_SUFFIXES)}
        for json_name in sorted(jsons - paired):
            if json_name.rsplit(".", 1)[0] not in image_stems:
                plan.quarantined.append(self.quarantine(
                    json_name, SampleError("LabelMe JSON without an image", file=names[json_name])))
        return plan

    def _load(self, location: str) -> _LabelmeFile:
        data = self.read_file(location, "LabelMe JSON")
        try:
            data.decode("utf-8-sig")
        except UnicodeDecodeError as utf8_error:
            try:  # LISA's fallback (utils/data_processing.py): some ReasonSeg JSON files are cp1252
                data = data.decode("cp1252").encode("utf-8")
            except UnicodeDecodeError as e:
                raise SampleError(f"neither UTF-8 ({utf8_error}) nor cp1252 ({e}) text", file=location) from e
        try:
            doc = loads_json(data, location)
        except SourceError as e:  # here one file is one sample: quarantine it, do not fail the split
            raise SampleError(e.reason, file=location) from e
        return self.validate(_LabelmeFile, doc, "", location)

    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        image_loc, json_loc = item.files
        ann = self._load(json_loc)
        expect = (ann.imageWidth, ann.imageHeight) if ann.imageWidth and ann.imageHeight else None
        image_bytes, info = self.read_image(image_loc, expect=expect)
        texts = [ann.text] if isinstance(ann.text, str) else ann.text
        fields = ["text"] if isinstance(ann.text, str) else [f"text.{k}" for k in range(len(texts))]
        queries = [clean_text(t, f, json_loc) for t, f in zip(texts, fields)]
        if not queries:
            raise SampleError("no query in `text`", field="text", file=json_loc)
        shapes = []  # (is_target, shape index, mask)
        for i, shape in enumerate(ann.shapes):
            label = clean_text(shape.label, f"shapes.{i}.label", json_loc).lower()
            if label == "flag":
                continue
            rle = self._rasterise([_flat_polygon(shape, f"shapes.{i}", json_loc)], info, f"shapes.{i}.points",
                                  json_loc)
            shapes.append(("ignore" not in label, i, masks.decode(rle).astype(bool)))
        owner = np.zeros((info.height, info.width), np.int8)  # 0 none, 1 target, 2 ignore: the last painted wins
        for is_target, _, mask in sorted(shapes, key=lambda s: (int(s[2].sum()), s[1]), reverse=True):
            owner[mask] = 1 if is_target else 2
        segments = []
        for is_target, _, mask in shapes:
            visible = mask & (owner == 1) if is_target else None
            if visible is None or not visible.any():
                continue
            rle, area, bbox = masks.encode_with_stats(visible)
            segments.append(Segment(id=len(segments) + 1, category_id=None, bbox=tuple(bbox), area=area, mask=rle))
        reasoning = ReasoningQuery(queries=queries, is_sentence=ann.is_sentence, explanation=item.payload["explanation"],
                                   segment_ids=[s.id for s in segments])
        image = self.image_info(item.payload["file_name"].rsplit(".", 1)[0], item.payload["file_name"], info)
        return image_bytes, self.sample(item, image, segments=segments, reasoning=[reasoning],
                                        ignore_mask=masks.encode(owner == 2) if (owner == 2).any() else None)

    @staticmethod
    def _rasterise(polys: list[list[float]], info, field: str, file: str) -> dict:
        """Polygons (unioned) -> RLE at the image size, by pycocotools."""
        try:
            return masks.rle_from_source(polys, info.height, info.width, field=field)
        except SampleError as e:
            e.file = e.file or file
            raise

