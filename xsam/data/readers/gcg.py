"""Placeholder: being written. The Split fields below are fixed (the registry uses them)."""

from xsam.data.readers.base import Reader
from xsam.data.registry import SplitSpec


class GcgSplit(SplitSpec):
    annotations: str  # the GCG annotation JSON
    images: str  # image folder


class GcgEvalSplit(SplitSpec):
    masks: str  # {val,test}_gcg_coco_mask_gt.json
    captions: str  # {val,test}_gcg_coco_caption_gt.json
    images: str  # image folder


class GcgGrandfReader(Reader):
    format = "gcg_grandf"
    Split = GcgSplit


class GcgRefcocogReader(Reader):
    format = "gcg_refcocog"
    Split = GcgSplit


class GcgFlickrReader(Reader):
    format = "gcg_flickr"
    Split = GcgSplit


class GcgEvalReader(Reader):
    format = "gcg_eval"
    Split = GcgEvalSplit
