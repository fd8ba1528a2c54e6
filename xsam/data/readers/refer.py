"""Placeholder: being written. The Split fields below are fixed (the registry uses them)."""

from xsam.data.readers.base import Reader
from xsam.data.registry import SplitSpec


class ReferSplit(SplitSpec):
    refs: str  # refs(unc).p pickle (or gRefCOCO grefs(unc).json)
    instances: str  # instances.json
    images: str  # image folder (COCO train2014)
    ref_split: str  # keep refs whose `split` equals this


class ReferReader(Reader):
    format = "refer"
    Split = ReferSplit
