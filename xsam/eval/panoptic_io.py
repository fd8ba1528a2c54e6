"""COCO panoptic files: id PNGs (id = R + 256 G + 256^2 B) and the JSON annotation layout.

Everything here raises :class:`PanopticFormatError` (a ``ValueError``) naming the image and the file
when the inputs are inconsistent, so an evaluation never silently scores a broken prediction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class PanopticFormatError(ValueError):
    """Inconsistent panoptic inputs (ids, categories, sizes, missing files or annotations)."""


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3 or 4] uint8 colours -> [H, W] uint32 ids ``R + 256 G + 256^2 B`` (alpha ignored)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3|4] colour array, got shape {rgb.shape}")
    c = rgb.astype(np.uint32, copy=False)
    return c[:, :, 0] + (c[:, :, 1] << 8) + (c[:, :, 2] << 16)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """[H, W] ids in [0, 2^24) -> [H, W, 3] uint8 colours (inverse of :func:`rgb2id`)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError("panoptic ids must lie in [0, 2^24) to be stored as RGB")
    ids = ids.astype(np.uint32, copy=False)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def _arrow_ids(im: Image.Image, out: np.ndarray | None) -> np.ndarray | None:
    """ids straight from PIL's 4-byte-per-pixel buffer, exported zero-copy through Arrow (Pillow >= 11.2);
    None where that export is unavailable (old Pillow, no pyarrow, an image held in several blocks)."""
    w, h = im.size
    try:
        import pyarrow as pa

        values = pa.array(im).values
    except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError):
        return None
    if len(values) != 4 * w * h or values.offset != 0:
        return None
    raw = np.frombuffer(values.buffers()[1], dtype="<u4", count=w * h).reshape(h, w)
    return np.bitwise_and(raw, np.uint32(0xFFFFFF), out=out)


OutFactory = Callable[[tuple[int, int]], np.ndarray]


def read_id_png(path: str | os.PathLike, image_id: Any = None, out: OutFactory | None = None) -> np.ndarray:
    """Decode a panoptic PNG into [H, W] uint32 ids. Palette images are expanded to RGB first.

    out: optional ``shape -> uint32 array`` giving the buffer to write into (the evaluator reuses one)."""
    try:
        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGB")
            if im.mode not in ("RGB", "RGBA"):
                raise PanopticFormatError(
                    f"image {image_id}: {path} has mode {im.mode}; panoptic PNGs must be RGB (id = R + 256G + 256^2B)"
                )
            im.load()
            ids = _arrow_ids(im, None if out is None else out((im.size[1], im.size[0])))
            return rgb2id(np.asarray(im)) if ids is None else ids
    except FileNotFoundError:
        raise PanopticFormatError(f"image {image_id}: PNG {path} does not exist") from None
    except PanopticFormatError:
        raise
    except Exception as e:  # truncated / not a PNG
        raise PanopticFormatError(f"image {image_id}: cannot decode {path}: {e}") from e


def write_id_png(path: str | os.PathLike, ids: np.ndarray) -> None:
    """Write [H, W] ids as a COCO panoptic RGB PNG."""
    Image.fromarray(id2rgb(ids)).save(path)


def load_json(src: str | os.PathLike | Mapping) -> dict:
    """A panoptic JSON given as a path or an already loaded dict."""
    if isinstance(src, Mapping):
        return dict(src)
    with open(src) as f:
        return json.load(f)


def default_folder(json_path: str | os.PathLike | Mapping, folder: str | os.PathLike | None) -> Path:
    """panopticapi's default PNG folder: ``X`` for ``X.json``."""
    if folder is not None:
        return Path(folder)
    if isinstance(json_path, Mapping):
        raise PanopticFormatError("a PNG folder is required when the JSON is passed as a dict")
    return Path(str(json_path).replace(".json", ""))


def match_annotations(gt_json: dict, pred_json: dict) -> list[tuple[dict, dict]]:
    """Pair every GT annotation with the prediction of the same image_id (extra predictions ignored)."""
    for name, js in (("ground truth", gt_json), ("prediction", pred_json)):
        if "annotations" not in js:
            raise PanopticFormatError(f"the {name} JSON has no 'annotations'")
    preds: dict = {}
    for ann in pred_json["annotations"]:
        if ann["image_id"] in preds:
            raise PanopticFormatError(f"image {ann['image_id']}: more than one prediction annotation")
        preds[ann["image_id"]] = ann
    pairs = []
    for gt_ann in gt_json["annotations"]:
        image_id = gt_ann["image_id"]
        if image_id not in preds:
            raise PanopticFormatError(f"no prediction for the image with id: {image_id}")
        pairs.append((gt_ann, preds[image_id]))
    return pairs
