"""Placeholder: being written."""
from xsam.data.readers.base import Reader


class LabelmeReader(Reader):
    format = "labelme"
