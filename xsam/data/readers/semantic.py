"""Semantic label maps: an image folder + a folder of single-channel label PNGs with the same stems.

Two formats share the code:

- `semantic_png`: generic layout (COCO-Stuff, Mapillary, ... after the usual conversion):
  `images/<stem>.{jpg,jpeg,png}`, `labels/<stem>.png` whose pixel value is the category id,
  255 = ignore; the label space is a JSON list of {id, name}.
- `ade20k`: ADEChallengeData2016: `images/<split>/*.jpg`, `annotations/<split>/*.png` where 0 =
  "other" (ignored) and k in 1..150 is class k; class names from the release's objectInfo150.txt
  (tab-separated, synonyms after ", ": the first synonym is kept) or objectInfo150.csv (where ";"
  separates synonyms AND the words of a name: resolved against the ADE20K-150 table, see
  `parse_object_info`).

Mapping to the unified `Sample`: one sample per image (source id = file stem); one `Segment` per
category present, with segment id = category id, iscrowd 0, mask = its pixels; the ignore pixels
(255, or ADE's 0) become `ignore_mask` (None when there are none), so mIoU and the loss can leave
them out without re-reading the source; the label space goes to the manifest's categories.

Quarantined: an image without its label PNG (planning), a label PNG that is not single-channel,
whose size differs from the image's, or that holds values outside the label space (converting).
Label PNGs with no image are counted in the manifest's `excluded`. A missing or malformed label
space file (duplicate ids or names included), or a missing image / label folder, fails the dataset.
"""

from __future__ import annotations

import csv
import io
import posixpath
from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from xsam.data import masks, storage
from xsam.data.errors import SampleError, SourceError
from xsam.data.images import decode_array
from xsam.data.readers.ade20k_names import ADE20K_150_NAMES
from xsam.data.readers.base import Plan, Reader, WorkItem
from xsam.data.registry import SplitSpec
from xsam.data.schema import Sample, Segment
from xsam.data.text import loads_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class _Category(BaseModel):
    id: int
    name: str


def _stem(location: str) -> tuple[str, str]:
    """(file name, stem) of a location."""
    name = posixpath.basename(location.replace("\\", "/"))
    return name, name.rsplit(".", 1)[0]


class LabelMapReader(Reader):
    """Images + same-stem label PNGs; subclasses give the folders, the label space and the ignore values."""

    ignore_values: ClassVar[tuple[int, ...]] = (255,)

    @property
    def images_dir(self) -> str:
        raise NotImplementedError

    @property
    def labels_dir(self) -> str:
        raise NotImplementedError

    def label_space(self) -> tuple[list[dict], str]:
        """([{id, name}], location of the file it came from); SourceError if unusable."""
        raise NotImplementedError

    def check_label_space(self, categories: list[dict], file: str) -> None:
        ids = [c["id"] for c in categories]
        if not categories:
            raise SourceError("the label space is empty", file=file)
        if len(set(ids)) != len(ids):
            raise SourceError(f"duplicate category ids {sorted({i for i in ids if ids.count(i) > 1})}", file=file)
        names: dict[str, int] = {}
        for c in categories:
            if c["name"] in names:
                raise SourceError(f"categories {names[c['name']]} and {c['id']} are both named {c['name']!r}; "
                                  "class names must be unique", file=file)
            names[c["name"]] = c["id"]
        clash = sorted(set(ids) & set(self.ignore_values))
        if clash:
            raise SourceError(f"category id(s) {clash} collide with the ignore value(s) {list(self.ignore_values)}",
                              file=file)

    # -- planning --------------------------------------------------------------------------------
    def plan(self) -> Plan:
        categories, cat_file = self.label_space()
        self.check_label_space(categories, cat_file)
        self._categories = categories  # travels with the reader to the workers
        image_root, label_root = self.path(self.images_dir), self.path(self.labels_dir)
        for folder, what in ((image_root, "image"), (label_root, "label")):
            if not storage.exists(folder):
                raise SourceError(f"{what} folder not found", file=folder)
        images = [loc for loc in storage.list_files(image_root) if loc.lower().endswith(IMAGE_SUFFIXES)]
        if not images:
            raise SourceError("no images (.jpg, .jpeg, .png) in the image folder", file=image_root)
        labels = {_stem(loc)[1]: loc for loc in storage.list_files(label_root, ".png")}
        plan = Plan(items=[], categories=categories, source_files=[cat_file])
        seen: dict[str, str] = {}
        for location in images:
            file_name, stem = _stem(location)
            label_file = posixpath.join(self.labels_dir, f"{stem}.png")
            try:
                if stem in seen:
                    raise SampleError(f"images {seen[stem]!r} and {file_name!r} share the stem {stem!r}",
                                      file=location)
                seen[stem] = file_name
                if stem not in labels:
                    raise SampleError("label PNG missing", file=storage.join(label_root, f"{stem}.png"))
            except SampleError as e:
                plan.quarantined.append(self.quarantine(stem, e, label_file))
                continue
            plan.items.append(self.item(stem, [location, labels[stem]], {"file_name": file_name}, label_file))
        orphans = len(set(labels) - set(seen))
        if orphans:
            plan.excluded["label PNG without image"] = orphans
        return plan

    # -- conversion ------------------------------------------------------------------------------
    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        image_bytes, info = self.read_image(item.files[0])
        label_file = item.files[1]
        label = decode_array(self.read_file(label_file, "label PNG"), file=label_file)
        if label.ndim != 2:
            raise SampleError(f"label PNG has {label.shape[-1]} channels; expected one channel of category ids",
                              field="label.mode", file=label_file)
        if label.shape != (info.height, info.width):
            raise SampleError(f"label PNG is {label.shape[1]}x{label.shape[0]}, image is {info.width}x{info.height}",
                              field="label.size", file=label_file)
        known = {c["id"] for c in self.categories}
        values = [int(v) for v in np.unique(label)]
        unknown = [v for v in values if v not in known and v not in self.ignore_values]
        if unknown:
            raise SampleError(f"label value(s) {unknown[:10]} are neither a category of the label space nor ignore "
                              f"{list(self.ignore_values)}", field="label.values", file=label_file)
        segments = []
        for value in values:
            if value not in known:
                continue
            rle = masks.encode(label == value)
            area, bbox = masks.area_bbox(rle)
            segments.append(Segment(id=value, category_id=value, bbox=tuple(bbox), area=area, mask=rle))
        ignore = np.isin(label, self.ignore_values)
        image = self.image_info(item.source_id, item.payload["file_name"], info)
        return image_bytes, self.sample(item, image, segments=segments,
                                        ignore_mask=masks.encode(ignore) if ignore.any() else None)

    @property
    def categories(self) -> list[dict]:
        """The label space, parsed once per reader (workers hold their own copy)."""
        if getattr(self, "_categories", None) is None:
            self._categories = self.label_space()[0]
        return self._categories


class SemanticPngSplit(SplitSpec):
    images: str  # image folder
    labels: str  # folder of single-channel label PNGs, same stem as the image; value = category id, 255 = ignore
    categories: str  # JSON list of {id, name} (the label space)


class SemanticPngReader(LabelMapReader):
    format = "semantic_png"
    version = 1
    Split = SemanticPngSplit
    ignore_values = (255,)

    @property
    def images_dir(self) -> str:
        return self.spec.images

    @property
    def labels_dir(self) -> str:
        return self.spec.labels

    def label_space(self) -> tuple[list[dict], str]:
        file = self.path(self.spec.categories)
        data = loads_json(self.read_source(self.spec.categories), file)
        if not isinstance(data, list):
            raise SourceError("expected a JSON list of {id, name}", file=file)
        categories = []
        for i, raw in enumerate(data):
            try:
                cat = self.validate(_Category, raw, str(i), file)
            except SampleError as e:
                raise SourceError(e.reason, file=file, field=e.field) from e
            categories.append({"id": cat.id, "name": cat.name})
        return categories, file


class Ade20kSplit(SplitSpec):
    images: str  # ADEChallengeData2016/images/{training,validation}
    annotations: str  # ADEChallengeData2016/annotations/{training,validation}: 0 = other (ignored), k = class k
    object_info: str  # objectInfo150.txt or .csv (columns Idx, Ratio, Train, Val, [Stuff,] Name)


class Ade20kReader(LabelMapReader):
    format = "ade20k"
    version = 2
    Split = Ade20kSplit
    ignore_values = (0,)

    @property
    def images_dir(self) -> str:
        return self.spec.images

    @property
    def labels_dir(self) -> str:
        return self.spec.annotations

    def label_space(self) -> tuple[list[dict], str]:
        file = self.path(self.spec.object_info)
        try:
            text = self.read_source(self.spec.object_info).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SourceError(f"not UTF-8 text: {e}", file=file) from e
        return parse_object_info(text, file), file


def parse_object_info(text: str, file: str) -> list[dict]:
    """objectInfo150.txt / .csv -> [{id: Idx, name: the first synonym of Name}].

    The file is tab- or comma-separated with a header naming the columns Idx and Name (other columns,
    such as the csv's Stuff, are ignored; cells are stripped: the .txt has stray spaces). A Name with
    ", " lists synonyms (the .txt): the first is kept. A Name with ";" (the .csv) joins synonyms and the
    words of a name alike, so it is resolved against the ADE20K-150 table (`ADE20K_150_NAMES`): the cell
    must start with the words of the Idx's name; any other ";" cell fails the file, naming the line.
    """
    lines = text.splitlines()
    if not lines:
        raise SourceError("empty file", file=file)
    delimiter = "\t" if "\t" in lines[0] and "," not in lines[0] else ","
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    header = [h.strip() for h in rows[0]]
    if "Idx" not in header or "Name" not in header:
        raise SourceError(f"header {header} lacks the columns Idx and Name", file=file, field="line 1")
    idx_col, name_col = header.index("Idx"), header.index("Name")
    categories = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            idx = int(row[idx_col])
            cell = row[name_col].strip()
        except (ValueError, IndexError) as e:
            raise SourceError(f"malformed row {row!r}: {e}", file=file, field=f"line {n}") from e
        if not cell or not 1 <= idx <= 254:
            raise SourceError(f"row {row!r} needs an Idx in 1..254 and a Name", file=file, field=f"line {n}")
        name = _csv_name(idx, cell, file, n) if ";" in cell else cell.split(",")[0].strip()
        categories.append({"id": idx, "name": name})
    return categories


def _csv_name(idx: int, cell: str, file: str, line: int) -> str:
    """The first synonym of a ";"-joined Name cell of ADE20K-150 class `idx`."""
    known = ADE20K_150_NAMES[idx - 1] if idx <= len(ADE20K_150_NAMES) else None
    words = [w.strip() for w in cell.split(";")]
    if known is None or words[:len(known.split())] != known.split():
        expected = f"the ADE20K-150 name of Idx {idx} is {known!r}" if known else f"Idx {idx} is not an ADE20K-150 class"
        raise SourceError(f"Name {cell!r} joins synonyms and words alike with ';', so its first synonym cannot be "
                          f"read back, and it does not start with a known name ({expected}); give objectInfo150.txt "
                          f"(synonyms separated by ', ') instead", file=file, field=f"line {line}")
    return known
