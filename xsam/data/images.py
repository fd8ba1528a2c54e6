"""Image bytes: identify the real encoding, check size and integrity, decode on demand.

The shard stores the source bytes untouched; this module only decides whether they are safe to
store. Checks, cheapest first: the magic bytes (not the file name) give the format; the header
gives the size, refused above `max_pixels` before any pixel is decoded (decompression bombs);
a JPEG must end with its EOI marker and a PNG with its IEND chunk (truncation). With
`full_decode=True` every image is also decoded, which catches corruption inside the entropy
coded data at ~5x the cost.

Decoding for use (`to_rgb`, `decode_rgb`) gives 8-bit RGB. A 16-bit grey PNG (PIL mode I;16, or I)
is scaled to 8 bits (v / 257, rounded: 0 -> 0, 65535 -> 255), where PIL's own convert clips every
value above 255 to white. Bytes that fail to decode raise `UndecodableImage`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from xsam.data.errors import SampleError

DEFAULT_MAX_PIXELS = 80_000_000

_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "webp": "WEBP"}


_WIDE_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # 16-bit grey PNGs open in these modes


class UndecodableImage(ValueError):
    """Stored image bytes that do not decode (e.g. corrupt entropy-coded data behind a valid header)."""


@dataclass(frozen=True)
class ImageProbe:
    format: str  # file extension to store it under: jpg, png, gif, bmp, webp
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def probe(data: bytes, *, file: str, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False) -> ImageProbe:
    """Check encoded image bytes; raise SampleError (naming `file`) for anything unsafe to store."""
    if not data:
        raise SampleError("image file is empty", file=file)
    fmt = sniff_format(data)
    if fmt is None:
        raise SampleError(f"not a recognised image encoding (first bytes {data[:8]!r})", file=file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])
            width, height = img.size
    except Image.DecompressionBombError as e:
        raise SampleError(f"decompression bomb: {e}", file=file) from e
    except Exception as e:  # PIL raises many types for broken headers
        raise SampleError(f"unreadable {fmt} header: {e}", file=file) from e
    if width <= 0 or height <= 0:
        raise SampleError(f"image has no pixels ({width}x{height})", file=file)
    if width * height > max_pixels:
        raise SampleError(f"decompression bomb: {width}x{height} = {width * height} pixels > limit {max_pixels}",
                          file=file)
    if fmt == "jpg" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise SampleError("truncated JPEG: no end-of-image marker", file=file)
    if fmt == "png" and b"IEND" not in data[-32:]:
        raise SampleError("truncated PNG: no IEND chunk", file=file)
    if full_decode or fmt in ("gif", "bmp", "webp"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        except Exception as e:
            raise SampleError(f"corrupt {fmt} data: {e}", file=file) from e
    return ImageProbe(fmt, width, height)


def to_rgb(img: Image.Image) -> np.ndarray:
    """An opened image as a writable (H, W, 3) uint8 RGB array (no EXIF transpose); 16-bit grey is
    scaled to 8 bits, not clipped (see the module docstring)."""
    if img.mode == "RGB":
        return np.array(img)
    if img.mode in _WIDE_GREY:
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        grey = ((wide + 128) // 257).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(img.convert("RGB"))


def decode_to_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes with `to_rgb`; UndecodableImage (with PIL's reason) when they do not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return to_rgb(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for corrupt data
        raise UndecodableImage(f"image data does not decode: {type(e).__name__}: {e}") from e


def decode_rgb(data: bytes, *, file: str) -> np.ndarray:
    """Decode to (H, W, 3) uint8, raising SampleError (naming `file`) for corrupt data."""
    try:
        return decode_to_rgb(data)
    except UndecodableImage as e:
        raise SampleError(f"corrupt image data: {e.__cause__}", file=file) from e


def decode_array(data: bytes, *, file: str) -> np.ndarray:
    """Decode keeping the stored mode (label PNGs: 'L' or 'P' -> (H, W) of raw values)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in ("RGB", "RGBA"):
                return np.asarray(img.convert("RGB"))
            return np.asarray(img)
    except Exception as e:
        raise SampleError(f"corrupt image data: {e}", file=file) from e
