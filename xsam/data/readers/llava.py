"""Placeholder: being written."""
from xsam.data.readers.base import Reader


class LlavaReader(Reader):
    format = "llava"
