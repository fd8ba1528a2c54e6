"""Placeholder: being written."""
from xsam.data.readers.base import Reader


class PsalmInteractiveReader(Reader):
    format = "psalm_interactive"
