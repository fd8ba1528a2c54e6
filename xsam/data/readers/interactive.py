"""Placeholder: being written. The Split fields below are fixed (the registry uses them)."""

from xsam.data.readers.base import Reader
from xsam.data.registry import SplitSpec


class PsalmInteractiveSplit(SplitSpec):
    annotations: str  # PSALM COCO-Interactive JSON list
    images: str  # image folder


class PsalmInteractiveReader(Reader):
    format = "psalm_interactive"
    Split = PsalmInteractiveSplit
