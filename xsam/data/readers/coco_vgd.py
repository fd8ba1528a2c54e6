"""Placeholder: being written."""
from xsam.data.readers.base import Reader


class CocoVgdReader(Reader):
    format = "coco_vgd"
