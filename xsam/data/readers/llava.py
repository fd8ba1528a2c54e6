"""Placeholder: being written. The Split fields below are fixed (the registry uses them)."""

from xsam.data.readers.base import Reader
from xsam.data.registry import SplitSpec


class LlavaSplit(SplitSpec):
    annotations: str  # LLaVA chat JSON list
    images: str  # image folder


class LlavaReader(Reader):
    format = "llava"
    Split = LlavaSplit
