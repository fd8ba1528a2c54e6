"""Sine positional embedding for 2-D feature maps (DETR / Mask2Former style).

Shared by the pixel decoder (keys and queries of the deformable encoder) and the masked-attention
transformer decoder (keys of the cross-attention). It has no parameters and depends only on the map's
height and width, so it also runs on the meta device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine / cosine embedding of the (y, x) position of every cell of a feature map.

    The first `num_pos_feats` output channels encode y, the next `num_pos_feats` encode x; inside each
    half, even channels are sines and odd channels cosines of the (normalised) coordinate divided by
    `temperature ** (2 * (i // 2) / num_pos_feats)`. With `normalize=True` (Mask2Former's setting) the
    coordinate of row i (0-based) of an H-row map is (i + 1) / (H + 1e-6) * scale, columns likewise: the
    cumulative count of valid cells, as DETR / Mask2Former (transformers' Mask2FormerSinePositionEmbedding,
    which the published X-SAM weights were trained with), not Deformable-DETR's cell centres (i + 0.5).

    Args:
        num_pos_feats: channels per axis; the output has 2 * num_pos_feats channels (use hidden_dim // 2).
            Must be even.
        temperature: frequency base.
        normalize: scale the coordinates to (0, scale].
        scale: the normalisation range (2 pi by default).

    Computed in float32 whatever x's dtype, then cast to x's dtype (transformers computes in x's dtype:
    under bf16 it rounds the arguments before sin / cos, here only the result is rounded).
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B, C, H, W] (only its shape, device and dtype are used); mask: optional [B, H, W] bool,
        True = padding. Returns [B, 2 * num_pos_feats, H, W] in x's dtype."""
        b, _, h, w = x.shape
        if mask is None:
            not_mask = torch.ones(b, h, w, device=x.device, dtype=torch.float32)
        else:
            not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t  # [B, H, W, F]
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)
