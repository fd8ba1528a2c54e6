"""Placeholder: being written."""
from xsam.data.readers.base import Reader


class GcgGrandfReader(Reader):
    format = "gcg_grandf"


class GcgRefcocogReader(Reader):
    format = "gcg_refcocog"


class GcgFlickrReader(Reader):
    format = "gcg_flickr"


class GcgEvalReader(Reader):
    format = "gcg_eval"
