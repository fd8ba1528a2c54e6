"""Placeholder: being written."""
from xsam.data.readers.base import Reader


class ReferReader(Reader):
    format = "refer"
