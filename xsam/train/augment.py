"""S1 augmentation: large-scale jitter (reference section 2, "large-scale jitter 0.1-2.0 to 1024,
center crop, no flip").

One call draws ONE number from the caller's generator, the scale factor s ~ U(lo, hi), then:

1. resize: the image is resized so that its longest side is s * size (detectron2 ``ResizeScale``
   with a square target): ratio = s * size / max(H, W), new size = (round(H * ratio), round(W * ratio)),
   at least 1 pixel. The image uses PIL bilinear (antialiased when shrinking); the masks use nearest
   neighbour on the SAME pixel grid (PIL's centre convention: source index =
   floor((dst + 0.5) * H / new_H)), computed as an index gather on the cropped window only, so a
   2x upscale of a 100-mask image costs no more than the crop itself.
2. center crop: where the resized side exceeds `size`, the central `size` pixels are kept
   (offset = (new - size) // 2). No flip.
3. pad: the content sits at the top-left of a size x size frame (bottom / right padding, as SAM's
   own transform pads). The image padding is SAM's pixel mean rounded to uint8 (PAD_COLOR), so that a
   generic ``image_views`` on the result sees almost exactly zero in normalised space; masks are padded
   with False. `valid_size` is the content's (h, w) inside the frame.

The result is already in the padded SAM frame: its longest side equals `size`, so ``preprocess.
image_views`` / ``mask_targets`` resize it by a factor of exactly 1 (a no-op), and `collate_s1` in
`xsam.train.formatting` skips them entirely (and zeroes the padding exactly in normalised space).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from xsam.model.preprocess import SAM_MEAN

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


def _nearest_index(src: int, dst: int, start: int, count: int) -> np.ndarray:
    """Source indices of destination pixels start..start+count-1 for a src -> dst nearest resize."""
    idx = ((np.arange(start, start + count, dtype=np.float64) + 0.5) * (src / dst)).astype(np.int64)
    return np.minimum(idx, src - 1)


def large_scale_jitter(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, size: int = 1024,
                       scale_range: tuple[float, float] = (0.1, 2.0)) -> Jittered:
    """image [H, W, 3] uint8, masks [N, H, W] bool -> the jittered, center-cropped, padded pair."""
    h, w = image.shape[:2]
    if masks.shape[1:] != (h, w):
        raise ValueError(f"masks {masks.shape[1:]} do not match the image {(h, w)}")
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    (nh, nw), (oy, ox), (ch, cw) = jitter_geometry(h, w, scale, size)

    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.Resampling.BILINEAR))
    out_image = np.empty((size, size, 3), np.uint8)
    out_image[:] = np.array(PAD_COLOR, np.uint8)
    out_image[:ch, :cw] = resized[oy:oy + ch, ox:ox + cw]

    out_masks = np.zeros((masks.shape[0], size, size), bool)
    if masks.shape[0]:
        rows = _nearest_index(h, nh, oy, ch)
        cols = _nearest_index(w, nw, ox, cw)
        if ch * w <= h * cw:  # gather the axis that leaves the smaller intermediate first
            out_masks[:, :ch, :cw] = np.take(np.take(masks, rows, axis=1), cols, axis=2)
        else:
            out_masks[:, :ch, :cw] = np.take(np.take(masks, cols, axis=2), rows, axis=1)
    return Jittered(image=out_image, masks=out_masks, scale=scale, ratio=(nh / h, nw / w), offset=(oy, ox),
                    valid_size=(ch, cw))
