"""Placeholder: being written. The Split fields below are fixed (the registry uses them)."""

from xsam.data.readers.base import Reader
from xsam.data.registry import SplitSpec


class LabelmeSplit(SplitSpec):
    folder: str  # folder of *.jpg with sibling LabelMe *.json
    explanations: str | None = None  # explanatory/train.json


class LabelmeReader(Reader):
    format = "labelme"
    Split = LabelmeSplit
