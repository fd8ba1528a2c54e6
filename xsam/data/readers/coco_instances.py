"""Placeholder: being written."""
from xsam.data.readers.base import Reader


class CocoInstancesReader(Reader):
    format = "coco_instances"
