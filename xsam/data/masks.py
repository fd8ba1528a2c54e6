"""Masks: COCO RLE encode / decode / validation, polygons, panoptic id PNGs.

All RLE here is pycocotools' format: column-major runs starting with background, `size` =
[height, width], counts as the compressed string. Source RLE is validated BEFORE pycocotools
sees it: its C decoder trusts the counts and writes past the mask when they do not sum to h*w.
Polygons are bounded BEFORE pycocotools rasterises them: its rasteriser walks every edge at 5x
resolution into arrays sized by the edge lengths, so one vertex at 1e300 crashes the process and
one at 1e7-1e8 costs gigabytes. A vertex must lie within `POLYGON_MARGIN` image sizes of the image
(x in [-m*W, (1+m)*W], y likewise) and a segmentation's edges may total at most
`MAX_POLYGON_EDGE_PX` pixels (Chebyshev length); anything else is a SampleError naming the field.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from xsam.data.errors import SampleError
from xsam.data.schema import RLE

POLYGON_MARGIN = 1.0  # a vertex may lie up to one image width / height outside the image
MAX_POLYGON_EDGE_PX = 2_000_000  # total edge length of one segmentation's polygons (~160 MB to rasterise)


def _as_fortran_u8(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == bool:
        mask = mask.view(np.uint8)  # no copy; keeps the memory order
    elif mask.dtype != np.uint8:
        mask = mask.astype(np.uint8)
    return np.asfortranarray(mask)  # no copy when already column-major


def encode(mask: np.ndarray) -> dict:
    """(H, W) bool/uint8 -> {"size": [H, W], "counts": str}. Fastest with a column-major input."""
    rle = mask_utils.encode(_as_fortran_u8(mask))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_with_stats(mask: np.ndarray) -> tuple[dict, int, list[float]]:
    """encode() plus the pixel area and the [x, y, w, h] box, computed on the runs."""
    rle = mask_utils.encode(_as_fortran_u8(mask))
    area, bbox = int(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}, area, bbox


def decode(rle: RLE | dict) -> np.ndarray:
    """RLE -> (H, W) uint8 {0, 1}."""
    if isinstance(rle, RLE):
        rle = {"size": list(rle.size), "counts": rle.counts}
    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts})


def area_bbox(rle: dict) -> tuple[int, list[float]]:
    coco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return int(mask_utils.area(coco)), [float(v) for v in mask_utils.toBbox(coco)]


def _counts_from_string(s: str, field: str) -> list[int]:
    """Parse pycocotools' compressed counts string (LEB128-like, 5 bits per char, offset 48,
    counts after the third delta-coded against the one two places back)."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise SampleError("invalid RLE: truncated counts string", field=field)
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                raise SampleError(f"invalid RLE: character {s[p]!r} outside the counts alphabet", field=field)
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _check_polygon_bounds(polys: list[list[float]], height: int, width: int, field: str) -> None:
    """Refuse polygons pycocotools cannot rasterise safely (see the module docstring)."""
    total = 0.0
    for i, poly in enumerate(polys):
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        lo = np.array([-POLYGON_MARGIN * width, -POLYGON_MARGIN * height])
        hi = np.array([(1 + POLYGON_MARGIN) * width, (1 + POLYGON_MARGIN) * height])
        bad = np.nonzero(((xy < lo) | (xy > hi)).any(axis=1))[0]
        if bad.size:
            x, y = xy[bad[0]]
            raise SampleError(f"polygon vertex ({x:g}, {y:g}) lies more than {POLYGON_MARGIN:g} image size(s) "
                              f"outside the {width}x{height} image", field=f"{field}.{i}")
        total += float(np.abs(np.diff(np.vstack([xy, xy[:1]]), axis=0)).max(axis=1).sum())
    if total > MAX_POLYGON_EDGE_PX:
        raise SampleError(f"polygons too long to rasterise: edges total {total:.0f} px > {MAX_POLYGON_EDGE_PX}",
                          field=field)


def rle_from_source(seg: Any, height: int, width: int, field: str) -> dict:
    """Normalise a source segmentation (polygons, uncompressed RLE, compressed RLE) to compressed
    RLE at (height, width), raising SampleError on anything malformed."""
    if isinstance(seg, list):
        polys = []
        for i, poly in enumerate(seg):
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in poly)):
                raise SampleError("invalid polygon: need >= 3 finite (x, y) pairs", field=f"{field}.{i}")
            polys.append([float(v) for v in poly])
        if not polys:
            raise SampleError("empty polygon list", field=field)
        _check_polygon_bounds(polys, height, width, field)
        rles = mask_utils.frPyObjects(polys, height, width)
        merged = mask_utils.merge(rles)
        return {"size": [height, width], "counts": merged["counts"].decode("ascii")}
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise SampleError("segmentation is neither polygons nor RLE {size, counts}", field=field)
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise SampleError(f"invalid RLE size {size!r}", field=f"{field}.size")
    if list(size) != [height, width]:
        raise SampleError(f"RLE size {list(size)} != image size [{height}, {width}]", field=f"{field}.size")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(v, int) and v >= 0 for v in counts):
            raise SampleError("invalid RLE: counts must be non-negative integers", field=f"{field}.counts")
        if sum(counts) != height * width:
            raise SampleError(f"invalid RLE: counts sum to {sum(counts)}, not {height}*{width}",
                              field=f"{field}.counts")
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as e:
            raise SampleError("invalid RLE: counts are not ASCII", field=f"{field}.counts") from e
    if not isinstance(counts, str):
        raise SampleError(f"invalid RLE counts of type {type(counts).__name__}", field=f"{field}.counts")
    runs = _counts_from_string(counts, f"{field}.counts")
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise SampleError(f"invalid RLE: runs sum to {sum(runs)}, not {height}*{width} (or a run is negative)",
                          field=f"{field}.counts")
    return {"size": [height, width], "counts": counts}


def panoptic_ids(png_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic PNG -> (H, W) uint32 segment ids (id = R + 256 G + 256^2 B),
    column-major so that per-segment masks encode to RLE without a copy."""
    h, w, _ = png_rgb.shape
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = png_rgb
    return np.asfortranarray(rgba.view("<u4")[..., 0])  # little-endian bytes R, G, B, 0
