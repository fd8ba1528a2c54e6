"""Decoding stored image bytes for use: 16-bit grey scaled (not clipped), undecodable bytes named."""

import io

import numpy as np
import pytest
from PIL import Image

from xsam.data.errors import SampleError
from xsam.data.images import UndecodableImage, decode_rgb, probe
from xsam.train.format_common import decode_image


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grey_png_is_scaled_to_8_bits_not_saturated():
    """A 16-bit gradient 0..65535 keeps its 256 grey levels (v / 257, rounded); PIL's own convert
    clips everything above 255 to white (5 levels left for this gradient)."""
    gradient = np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))  # exact 8-bit levels, 0 .. 65535
    gradient[1, :255] += 100  # off-level values round to the nearest level
    gradient[1, 255] -= 100
    gradient[2, 0], gradient[2, 1] = 128, 65535 - 128  # rounding at the extremes: 128 -> 0, 65407 -> 255
    data = _png(gradient)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "I;16"
        assert np.unique(np.asarray(img.convert("RGB"))).size < 10  # the saturation this guards against
    probe(data, file="g.png", full_decode=True)  # a 16-bit PNG is fine to store
    rgb = decode_image(data)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 256, 3) and rgb.flags.writeable
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[0, :, 0], np.arange(256))
    np.testing.assert_array_equal(rgb[1, :, 0], np.arange(256))
    assert (rgb[2, 0, 0], rgb[2, 1, 0]) == (0, 255)
    np.testing.assert_array_equal(decode_rgb(data, file="g.png"), rgb)


def test_8_bit_images_decode_as_before():
    rng = np.random.default_rng(0)
    rgb = (rng.random((5, 7, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(_png(rgb)), rgb)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(decode_image(_png(grey)), np.repeat(grey[..., None], 3, axis=2))


def corrupt_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose header and end marker are intact (it passes the quick probe) but whose Huffman
    table is garbage: it does not decode."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    dht = data.index(b"\xff\xc4")
    data[dht + 5:dht + 21] = b"\xff" * 16
    return bytes(data)


def test_undecodable_jpeg_passes_the_quick_probe_and_raises_naming_the_sample():
    data = corrupt_jpeg()
    assert probe(data, file="x.jpg").format == "jpg"  # quick probe: header and EOI only
    with pytest.raises(SampleError, match="corrupt jpg data"):
        probe(data, file="x.jpg", full_decode=True)
    with pytest.raises(UndecodableImage, match="does not decode: OSError"):
        decode_image(data)
    with pytest.raises(SampleError, match="corrupt image data") as e:
        decode_rgb(data, file="x.png")
    assert e.value.file == "x.png"
