"""Placeholder: being written."""
from xsam.data.readers.base import Reader


class SemanticPngReader(Reader):
    format = "semantic_png"


class Ade20kReader(Reader):
    format = "ade20k"
