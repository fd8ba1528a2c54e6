"""COCO-VGD format: COCO instances + the four visual prompts of every instance.

The source is an ordinary COCO instances JSON and image folder (parsed by the coco_instances
reader, which this reader extends); the prompts are derived here with the rules of
`xsam.data.visual_prompts`. Mapping to the unified `Sample`: everything coco_instances gives,
plus, for every non-crowd segment with pixels, four `VisualPrompt`s (point, scribble, box, mask;
in that order) whose `segment_id` is the annotation id. Crowd segments (and empty masks) get none.

The prompts are a pure function of (options.seed, dataset, split, image id, annotation id): each
segment draws from its own generator seeded by a hash of those, so the shards do not depend on
worker, shard or item order. Which prompt type a training read uses is NOT decided here (the
loader draws it per read); evaluation uses one type per run, so every type is stored.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import BaseModel, ConfigDict

from xsam.data import masks
from xsam.data.readers.base import WorkItem
from xsam.data.readers.coco_instances import CocoInstancesReader
from xsam.data.registry import SplitSpec
from xsam.data.schema import PromptType, Sample, Segment, VisualPrompt
from xsam.data.visual_prompts import all_prompts


class CocoVgdSplit(SplitSpec):
    annotations: str  # COCO instances JSON
    images: str  # image folder


class CocoVgdOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 1024  # base seed of the prompt generators (the reference's global seed)


def prompt_rng(seed: int, dataset: str, split: str, image_id: str, segment_id: int) -> np.random.Generator:
    """The generator of one segment's prompts, from a hash of everything that identifies it."""
    h = hashlib.blake2b(digest_size=16)
    for part in (str(seed), dataset, split, str(image_id), str(segment_id)):
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    return np.random.default_rng(int.from_bytes(h.digest(), "little"))


def segment_prompts(segment: Segment, rng: np.random.Generator) -> list[VisualPrompt]:
    """The four prompts of one segment (none for a crowd region or an empty mask)."""
    if segment.iscrowd or segment.area == 0:
        return []
    binary = masks.decode(segment.mask).astype(bool)
    return [VisualPrompt(type=PromptType(name), mask=masks.encode(prompt), segment_id=segment.id)
            for name, prompt in all_prompts(binary, rng).items()]


class CocoVgdReader(CocoInstancesReader):
    format = "coco_vgd"
    version = 1
    Split = CocoVgdSplit
    Options = CocoVgdOptions

    def convert(self, item: WorkItem) -> tuple[bytes, Sample]:
        image_bytes, sample = super().convert(item)
        prompts = []
        for segment in sample.segments:
            rng = prompt_rng(self.options.seed, self.dataset, self.split, sample.image.id, segment.id)
            prompts += segment_prompts(segment, rng)
        return image_bytes, sample.model_copy(update={"visual_prompts": prompts})
