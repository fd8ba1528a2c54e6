"""Placeholder: being written. The Split fields below are fixed (the registry uses them)."""

from xsam.data.readers.base import Reader
from xsam.data.registry import SplitSpec


class CocoVgdSplit(SplitSpec):
    annotations: str  # COCO instances JSON
    images: str  # image folder


class CocoVgdReader(Reader):
    format = "coco_vgd"
    Split = CocoVgdSplit
