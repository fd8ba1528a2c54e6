"""S1 augmentation: large-scale jitter (reference section 2, "large-scale jitter 0.1-2.0 to 1024,
center crop, no flip").

`draw_jitter` draws ONE number from the caller's generator, the scale factor s ~ U(lo, hi), and turns
it into the geometry (`preprocess.ResizeCrop`); the pixels are then resampled by the model's device
transform (`preprocess.crop_view` / `crop_masks`, at the model boundary). `large_scale_jitter` is the
CPU reference of the same augmentation (PIL + numpy), kept for tests and tools:

1. resize: the image is resized so that its longest side is s * size (detectron2 ``ResizeScale``
   with a square target): ratio = s * size / max(H, W), new size = (round(H * ratio), round(W * ratio)),
   at least 1 pixel. The image uses PIL bilinear (antialiased when shrinking); the masks use nearest
   neighbour on the SAME pixel grid (PIL's centre convention: source index =
   floor((dst + 0.5) * H / new_H)), computed as an index gather on the cropped window only, so a
   2x upscale of a 100-mask image costs no more than the crop itself.
2. center crop: where the resized side exceeds `size`, the central `size` pixels are kept
   (offset = (new - size) // 2). No flip.
3. pad: the content sits at the top-left of a size x size frame (bottom / right padding, as SAM's
   own transform pads). The image padding is SAM's pixel mean rounded to uint8 (PAD_COLOR); the device
   transform pads with exactly 0 in normalised space instead. Masks are padded with False.
   `valid_size` is the content's (h, w) inside the frame.

Masks the crop empties are kept (empty targets), as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from xsam.model.preprocess import SAM_MEAN, ResizeCrop

PAD_COLOR = tuple(round(v) for v in SAM_MEAN)  # (124, 116, 104)


@dataclass
class Jittered:
    image: np.ndarray  # [size, size, 3] uint8, content at the top-left, PAD_COLOR elsewhere
    masks: np.ndarray  # [N, size, size] bool, False outside the content
    scale: float  # the drawn jitter factor s
    ratio: tuple[float, float]  # (new_H / H, new_W / W): the actual per-axis resize factors
    offset: tuple[int, int]  # (y, x) of the crop window inside the resized image
    valid_size: tuple[int, int]  # (h, w) of the content inside the frame


def jitter_geometry(height: int, width: int, scale: float, size: int) -> tuple[tuple[int, int], tuple[int, int],
                                                                                 tuple[int, int]]:
    """-> ((new_H, new_W) after the resize, (oy, ox) crop offset, (h, w) content size)."""
    ratio = scale * size / max(height, width)
    nh, nw = max(1, round(height * ratio)), max(1, round(width * ratio))
    ch, cw = min(nh, size), min(nw, size)
    return (nh, nw), ((nh - ch) // 2, (nw - cw) // 2), (ch, cw)


def draw_jitter(height: int, width: int, rng: np.random.Generator, size: int = 1024,
                scale_range: tuple[float, float] = (0.1, 2.0)) -> tuple[float, ResizeCrop]:
    """The one draw of the jitter -> (scale s, the resize / crop geometry for an H x W image)."""
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    resized, offset, valid = jitter_geometry(height, width, scale, size)
    return scale, ResizeCrop(resized=resized, offset=offset, valid=valid)


def _nearest_index(src: int, dst: int, start: int, count: int) -> np.ndarray:
    """Source indices of destination pixels start..start+count-1 for a src -> dst nearest resize."""
    idx = ((np.arange(start, start + count, dtype=np.float64) + 0.5) * (src / dst)).astype(np.int64)
    return np.minimum(idx, src - 1)


def _window_indices(h: int, w: int, crop: ResizeCrop) -> tuple[np.ndarray, np.ndarray]:
    (nh, nw), (oy, ox), (ch, cw) = crop.resized, crop.offset, crop.valid
    return _nearest_index(h, nh, oy, ch), _nearest_index(w, nw, ox, cw)


def large_scale_jitter(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, size: int = 1024,
                       scale_range: tuple[float, float] = (0.1, 2.0)) -> Jittered:
    """image [H, W, 3] uint8, masks [N, H, W] bool -> the jittered, center-cropped, padded pair (CPU reference)."""
    h, w = image.shape[:2]
    if masks.shape[1:] != (h, w):
        raise ValueError(f"masks {masks.shape[1:]} do not match the image {(h, w)}")
    scale, crop = draw_jitter(h, w, rng, size, scale_range)
    (nh, nw), (oy, ox), (ch, cw) = crop.resized, crop.offset, crop.valid

    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.Resampling.BILINEAR))
    out_image = np.empty((size, size, 3), np.uint8)
    out_image[:] = np.array(PAD_COLOR, np.uint8)
    out_image[:ch, :cw] = resized[oy:oy + ch, ox:ox + cw]

    out_masks = np.zeros((masks.shape[0], size, size), bool)
    if masks.shape[0]:
        rows, cols = _window_indices(h, w, crop)
        if ch * w <= h * cw:  # gather the axis that leaves the smaller intermediate first
            out_masks[:, :ch, :cw] = np.take(np.take(masks, rows, axis=1), cols, axis=2)
        else:
            out_masks[:, :ch, :cw] = np.take(np.take(masks, cols, axis=2), rows, axis=1)
    return Jittered(image=out_image, masks=out_masks, scale=scale, ratio=(nh / h, nw / w), offset=(oy, ox),
                    valid_size=(ch, cw))
