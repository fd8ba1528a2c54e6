"""Image views and mask targets for the model (reference section 2, "Image views per sample").

- SigLIP view: the image resized to S x S (S = 384 paper), normalised with mean = std = 0.5.
- SAM view: longest side resized to I (I = 1024 paper), zero-padded bottom / right to I x I, after
  normalising with SAM's pixel mean / std (so the padding is zero in normalised space, as in SAM).
- masks get the SAM transform (resize with nearest, pad with 0) so targets live in the padded frame;
  `scaled_size` = the image's size inside that frame, kept for un-padding predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


@dataclass
class ImageViews:
    siglip: torch.Tensor  # [3, S, S]
    sam: torch.Tensor  # [3, I, I]
    orig_size: tuple[int, int]  # (H, W)
    scaled_size: tuple[int, int]  # (h, w) inside the padded SAM frame


def scaled_size(orig: tuple[int, int], target: int) -> tuple[int, int]:
    h, w = orig
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def image_views(image: np.ndarray, siglip_size: int, sam_size: int) -> ImageViews:
    """image: [H, W, 3] uint8 RGB -> the two normalised views."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]  # [1, 3, H, W]
    h, w = image.shape[:2]
    sig = F.interpolate(x, size=(siglip_size, siglip_size), mode="bicubic", align_corners=False).clamp(0, 255)
    sig = (sig / 255.0 - torch.tensor(SIGLIP_MEAN)[:, None, None]) / torch.tensor(SIGLIP_STD)[:, None, None]
    sh, sw = scaled_size((h, w), sam_size)
    sam = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    sam = (sam - torch.tensor(SAM_MEAN)[:, None, None]) / torch.tensor(SAM_STD)[:, None, None]
    sam = F.pad(sam, (0, sam_size - sw, 0, sam_size - sh))
    return ImageViews(siglip=sig[0], sam=sam[0], orig_size=(h, w), scaled_size=(sh, sw))


def mask_targets(masks: np.ndarray, sam_size: int) -> torch.Tensor:
    """[N, H, W] bool -> [N, I, I] float in the padded SAM frame (nearest resize, zero pad)."""
    n, h, w = masks.shape
    sh, sw = scaled_size((h, w), sam_size)
    if n == 0:
        return torch.zeros(0, sam_size, sam_size)
    m = torch.from_numpy(np.ascontiguousarray(masks).astype(np.uint8))[:, None]  # uint8: ~5x faster than float
    m = F.interpolate(m, size=(sh, sw), mode="nearest")[:, 0]
    return F.pad(m, (0, sam_size - sw, 0, sam_size - sh)).float()
