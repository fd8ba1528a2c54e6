"""What the per-task formatters share: the `Formatted` record, image decoding, source-text cleaning,
lazy mask decoding and the first-turn image prefix (see `xsam.train.formatting` for the rules)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from xsam.data import masks as mask_codec
from xsam.data.expansion import MARKER_RE, clean
from xsam.data.images import UndecodableImage, decode_to_rgb
from xsam.data.schema import Sample, Segment, Task
from xsam.model import templates as T
from xsam.model.batching import Example
from xsam.model.preprocess import ResizeCrop
from xsam.model.tokenizer import IMAGE_TOKEN, REGION_TOKEN
from xsam.model.xsam import DecodeMode

PLACEHOLDER_RE = re.compile("|".join(re.escape(m) for m in (IMAGE_TOKEN, REGION_TOKEN)))


@dataclass
class Formatted:
    example: Example
    mode: DecodeMode
    dataset: str
    task: Task
    crop: ResizeCrop | None = None  # S1 only: the drawn large-scale jitter of the image


# --------------------------------------------------------------------------- helpers
def decode_image(data: bytes, sample: Sample | None = None) -> np.ndarray:
    """Stored bytes -> [H, W, 3] uint8 RGB, no EXIF transpose (16-bit grey scaled, `xsam.data.images`);
    checks the size against the record. Bytes that do not decode raise UndecodableImage naming the
    sample (the loader replaces such a sample, see `xsam.train.loader`)."""
    try:
        arr = decode_to_rgb(data)  # writable (torch.from_numpy downstream)
    except UndecodableImage as e:
        if sample is None:
            raise
        raise UndecodableImage(f"{sample.dataset}/{sample.provenance.source_id}: {e}") from e.__cause__
    if sample is not None and arr.shape[:2] != (sample.image.height, sample.image.width):
        raise ValueError(f"{sample.dataset}/{sample.provenance.source_id}: image is {arr.shape[1]}x{arr.shape[0]}"
                         f" but the record says {sample.image.width}x{sample.image.height}")
    return arr


clean_text = clean  # source text for a template: markers removed, outer whitespace stripped


def strip_markers_mapped(text: str) -> tuple[str, list[int]]:
    """Remove markers; -> (new text, old offset -> new offset for offsets 0..len(text))."""
    keep = np.ones(len(text), bool)
    for m in MARKER_RE.finditer(text):
        keep[m.start():m.end()] = False
    mapping = np.concatenate([[0], np.cumsum(keep)]).tolist()
    return "".join(c for c, k in zip(text, keep) if k), mapping


def lower_same_length(text: str) -> str:
    """Lowercase (X-SAM lowercases GCG captions) keeping every offset: a character whose lowercase
    form has another length (e.g. "\u0130") is kept as it is."""
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


def pick(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(n))


class Masks:
    """Lazy decode of a sample's segment masks (bool [H, W]) by segment id."""

    def __init__(self, sample: Sample, shape: tuple[int, int]):
        self.sample = sample
        self.shape = shape
        self.segments: dict[int, Segment] = {s.id: s for s in sample.segments}
        self._cache: dict[int, np.ndarray] = {}
        self.ignore = self.decode(sample.ignore_mask) if sample.ignore_mask is not None else None

    def decode(self, rle) -> np.ndarray:
        m = mask_codec.decode(rle).view(bool)  # {0, 1} uint8, column-major: a view, no copy
        if m.shape != self.shape:
            raise ValueError(f"{self.sample.dataset}/{self.sample.provenance.source_id}: mask of size {m.shape} "
                             f"on an image of size {self.shape}")
        return m

    def segment(self, sid: int) -> np.ndarray:
        if sid not in self._cache:
            if sid not in self.segments:
                raise ValueError(f"{self.sample.dataset}/{self.sample.provenance.source_id}: "
                                 f"segment id {sid} is not in the sample")
            self._cache[sid] = self.decode(self.segments[sid].mask)
        return self._cache[sid]

    def target(self, sids) -> np.ndarray:
        """Union of segments, ignore pixels turned to background (column-major, read-only use)."""
        if len(sids) == 1 and self.ignore is None:
            return self.segment(sids[0])
        out = np.zeros(self.shape, bool, order="F")
        for sid in sids:
            out |= self.segment(sid)
        if self.ignore is not None:
            out &= ~self.ignore
        return out

    def stack(self, targets: list[np.ndarray]) -> np.ndarray:
        return np.stack(targets) if targets else np.zeros((0, *self.shape), bool)


def first_turn(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Put the image placeholder in front of the first user turn."""
    if turns:
        turns[0] = (T.with_image(turns[0][0]), turns[0][1])
    return turns


