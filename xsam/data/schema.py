"""The unified sample schema: what every shard holds, whatever the source format was.

One sample = one image of one dataset split with ALL of its annotations. In a WebDataset shard a
sample is two adjacent tar members sharing one key:

    <key>.image             the original encoded image bytes (never re-encoded; `image.format` says which)
    <key>.json              a `Sample` record (below), UTF-8 JSON

Masks are COCO RLE with compressed string counts, at the original image size. Text is stored as
the source gives it. Everything the reference draws at random per read (category negatives,
prompt templates, the referring sentence, the VGD prompt type, the explanation branch) is NOT
decided here: the shard keeps every candidate and the training loader draws.

Example record (a COCO panoptic image, shortened)::

    {"schema_version": "1.0", "dataset": "coco_panoptic", "split": "val2017",
     "task": "generic_seg", "label_space": "coco_panoptic_133",
     "image": {"id": "139", "file_name": "000000000139.jpg", "width": 640, "height": 426,
               "format": "jpg"},
     "segments": [{"id": 3226956, "category_id": 1, "iscrowd": 0,
                   "bbox": [413.0, 158.0, 53.0, 138.0], "area": 2840,
                   "mask": {"size": [426, 640], "counts": "TcP5..."}}],
     "conversations": [], "referring": [], "reasoning": [], "gcg": null,
     "visual_prompts": [], "ignore_mask": null,
     "provenance": {"source_file": "annotations/panoptic_val2017.json", "source_id": "139",
                    "reader": "coco_panoptic", "reader_version": 1}}

Versioning: SCHEMA_VERSION changes its major number when a field changes meaning or goes away
(readers of the old major must refuse), its minor number when a field is added.
"""

from __future__ import annotations

import hashlib
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.1"  # 1.1: Segment.source_area


class Task(str, Enum):
    """What a dataset trains or evaluates; the training loader formats a sample by its task."""

    chat = "chat"
    generic_seg = "generic_seg"  # panoptic (and its semantic / instance views)
    semantic_seg = "semantic_seg"
    instance_seg = "instance_seg"
    referring_seg = "referring_seg"
    gres = "gres"  # generalised referring: zero or many targets per expression
    reasoning_seg = "reasoning_seg"
    gcg = "gcg"  # grounded conversation generation
    vgd = "vgd"  # visual-grounded segmentation
    interactive = "interactive"


class PromptType(str, Enum):
    point = "point"
    scribble = "scribble"
    box = "box"
    mask = "mask"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class RLE(_Model):
    """COCO run-length encoding, column-major, compressed string counts. size = [height, width]."""

    size: tuple[int, int]
    counts: str


class ImageInfo(_Model):
    id: str
    file_name: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    format: Literal["jpg", "png", "gif", "bmp", "webp"]  # tar member extension of the image bytes


class Segment(_Model):
    """One region of the image. `category_id` is None where the source has no label space (GCG)."""

    id: int
    category_id: int | None = None
    iscrowd: int = 0
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels (COCO convention)
    area: int = Field(ge=0)  # pixel count of `mask`
    mask: RLE
    # the source's own `area` where it gives one (COCO: the polygon's area, or the RLE's pixel count);
    # COCO instance AP's small / medium / large split uses it, as pycocotools reads it from the GT file
    source_area: float | None = Field(default=None, ge=0)


class Turn(_Model):
    role: Literal["human", "gpt"]
    value: str


class Conversation(_Model):
    """One chat of a LLaVA-style source; an image may have several (grouped by image)."""

    id: str
    turns: list[Turn]


class ReferringExpression(_Model):
    """A referred object (or, for gRefCOCO, a group of zero or more) and all its sentences.

    The training loader picks the sentence(s) per read; `segment_ids` index `Sample.segments`.
    """

    ref_id: str
    sentences: list[str]
    segment_ids: list[int]


class ReasoningQuery(_Model):
    """ReasonSeg: the queries of one image (all target the same region) and optional explanation."""

    queries: list[str]
    is_sentence: bool
    explanation: str | None = None
    segment_ids: list[int]


class Phrase(_Model):
    """A grounded phrase: caption[start:end] (character offsets) <-> segments."""

    start: int = Field(ge=0)
    end: int = Field(ge=0)
    text: str
    segment_ids: list[int]


class GroundedCaption(_Model):
    caption: str
    phrases: list[Phrase]


class VisualPrompt(_Model):
    """A rasterised visual prompt (point disc, scribble, box, mask) aimed at one segment."""

    type: PromptType
    mask: RLE
    segment_id: int


class Provenance(_Model):
    source_file: str
    source_id: str
    reader: str
    reader_version: int


class Sample(_Model):
    schema_version: str = SCHEMA_VERSION
    dataset: str
    split: str
    task: Task
    label_space: str | None = None
    image: ImageInfo
    segments: list[Segment] = []
    conversations: list[Conversation] = []
    referring: list[ReferringExpression] = []
    reasoning: list[ReasoningQuery] = []
    gcg: GroundedCaption | None = None
    visual_prompts: list[VisualPrompt] = []
    ignore_mask: RLE | None = None  # pixels excluded from loss and metrics (ReasonSeg "ignore")
    provenance: Provenance

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_json_bytes(cls, data: bytes | str) -> "Sample":
        sample = cls.model_validate_json(data)
        if sample.schema_version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ValueError(
                f"sample schema {sample.schema_version} is not readable by schema {SCHEMA_VERSION}"
            )
        return sample


def sample_key(dataset: str, split: str, source_id: str) -> str:
    """Deterministic WebDataset key of a sample: 24 hex chars of a hash of (dataset, split, id).

    Hex keys carry no '.' (WebDataset splits member names at the first dot) and sort in an
    order unrelated to the source order, which spreads each source evenly over the shards.
    """
    h = hashlib.blake2b(digest_size=12)
    for part in (dataset, split, source_id):
        h.update(part.encode("utf-8", errors="surrogatepass"))  # ids with broken bytes still get a key
        h.update(b"\x1f")
    return h.hexdigest()
