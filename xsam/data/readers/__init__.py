"""One reader per SOURCE FORMAT; the registry's `format` field picks the class from READERS."""

from __future__ import annotations

from xsam.data.readers.base import Reader
from xsam.data.readers.coco_instances import CocoInstancesReader
from xsam.data.readers.coco_panoptic import CocoPanopticReader
from xsam.data.readers.coco_vgd import CocoVgdReader
from xsam.data.readers.gcg import GcgEvalReader, GcgFlickrReader, GcgGrandfReader, GcgRefcocogReader
from xsam.data.readers.interactive import PsalmInteractiveReader
from xsam.data.readers.labelme import LabelmeReader
from xsam.data.readers.llava import LlavaReader
from xsam.data.readers.refer import ReferReader
from xsam.data.readers.semantic import Ade20kReader, SemanticPngReader
from xsam.data.readers.xsam_vgd import XsamVgdReader

READERS: dict[str, type[Reader]] = {
    cls.format: cls
    for cls in (
        CocoPanopticReader,
        CocoInstancesReader,
        CocoVgdReader,
        SemanticPngReader,
        Ade20kReader,
        ReferReader,
        LabelmeReader,
        LlavaReader,
        GcgGrandfReader,
        GcgRefcocogReader,
        GcgFlickrReader,
        GcgEvalReader,
        PsalmInteractiveReader,
        XsamVgdReader,
    )
}

__all__ = ["READERS", "Reader"]
