"""Placeholder: being written. The Split fields below are fixed (the registry uses them)."""

from xsam.data.readers.base import Reader
from xsam.data.registry import SplitSpec


class CocoInstancesSplit(SplitSpec):
    annotations: str  # COCO instances JSON (polygons, RLE, crowd)
    images: str  # image folder


class CocoInstancesReader(Reader):
    format = "coco_instances"
    Split = CocoInstancesSplit
