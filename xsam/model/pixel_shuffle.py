"""Pixel shuffle on channels-last maps (space-to-depth and back, InternVL style).

scale 0.5 merges every 2x2 neighbourhood into the channels:

    out[b, i, j, (dy * 2 + dx) * C + c] = x[b, 2i + dy, 2j + dx, c]        dy, dx in {0, 1}

i.e. the four C-channel groups are, in order, top-left, top-right, bottom-left, bottom-right.
This is the channel order InternVL's `pixel_shuffle(x, 0.5)` produces. An odd H or W is first
zero-padded at the bottom / right. scale 2 is the exact inverse of scale 0.5 (so
`pixel_shuffle(pixel_shuffle(x, 0.5), 2) == x` for even H, W). Note that InternVL's own code
with scale 2 reads the channel groups in a transposed order, so it is not this inverse; where
scale 2 follows a learned layer (the connector's 1/8 level) the order has no effect on the model.
scale 1 returns the input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pixel_shuffle(x: Tensor, scale: float) -> Tensor:
    """x [B, H, W, C] channels-last ->
    scale 0.5: [B, ceil(H/2), ceil(W/2), 4C];  scale 2: [B, 2H, 2W, C/4] (C % 4 == 0);  scale 1: x."""
    if x.dim() != 4:
        raise ValueError(f"pixel_shuffle expects [B, H, W, C], got shape {tuple(x.shape)}")
    b, h, w, c = x.shape
    if scale == 1:
        return x
    if scale == 0.5:
        pad_h, pad_w = h % 2, w % 2
        if pad_h or pad_w:
            # F.pad pads the last dims first: (C: 0, 0), (W: 0, pad_w), (H: 0, pad_h).
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            h, w = h + pad_h, w + pad_w
        x = x.reshape(b, h // 2, 2, w // 2, 2, c)  # [B, i, dy, j, dx, C]
        x = x.permute(0, 1, 3, 2, 4, 5)  # [B, i, j, dy, dx, C]
        return x.reshape(b, h // 2, w // 2, 4 * c)
    if scale == 2:
        if c % 4:
            raise ValueError(f"pixel_shuffle(scale=2) needs channels divisible by 4, got {c}")
        x = x.reshape(b, h, w, 2, 2, c // 4)  # [B, i, j, dy, dx, C/4]
        x = x.permute(0, 1, 3, 2, 4, 5)  # [B, i, dy, j, dx, C/4]
        return x.reshape(b, 2 * h, 2 * w, c // 4)
    raise ValueError(f"pixel_shuffle supports scale 0.5, 1 or 2, got {scale}")
