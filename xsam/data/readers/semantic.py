"""Placeholder: being written. The Split fields below are fixed (the registry uses them)."""

from xsam.data.readers.base import Reader
from xsam.data.registry import SplitSpec


class SemanticPngSplit(SplitSpec):
    images: str  # image folder
    labels: str  # folder of single-channel label PNGs, same stem as the image; value = category id, 255 = ignore
    categories: str  # JSON list of {id, name} (the label space)


class SemanticPngReader(Reader):
    format = "semantic_png"
    Split = SemanticPngSplit


class Ade20kSplit(SplitSpec):
    images: str  # ADEChallengeData2016/images/{training,validation}
    annotations: str  # ADEChallengeData2016/annotations/{training,validation}: 0 = other (ignored), k = class k
    object_info: str  # objectInfo150.csv (Idx, Ratio, Train, Val, Name)


class Ade20kReader(Reader):
    format = "ade20k"
    Split = Ade20kSplit
