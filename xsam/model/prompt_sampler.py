"""Visual-prompt sampler (paper version): one LLM-space token per prompted region. No parameters.

For each prompt mask with n foreground pixels, `num_points` (P) pixels are drawn as X-SAM's
`rand_sample_repeat` does: n >= P -> P distinct pixels (without replacement); n < P -> every pixel
once plus P - n drawn with replacement. The segmentation-projector token map is sampled bilinearly
at those pixels with X-SAM's convention: pixel (row, col) of an [Hm, Wm] mask -> (col / Wm, row / Hm)
mapped to [-1, 1], grid_sample with align_corners=True (so the mask may have any resolution as long
as it covers the same frame as the token map: the padded SAM frame), and an adaptive max pool over
the points gives the region token.

Edge cases (documented choices):
  * an empty mask samples every point at the centre of the frame (normalised (0, 0));
  * out-of-range interpolation near the frame border uses the border token (padding_mode="border"),
    so a region touching the border is not dimmed by zero padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VisualPromptSampler(nn.Module):
    def __init__(self, num_points: int):
        super().__init__()
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.num_points = num_points

    def sample_points(self, prompt_masks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """prompt_masks [R, Hm, Wm] (bool or 0/1) -> normalised (x, y) in [-1, 1], [R, num_points, 2]
        (x = col / Wm * 2 - 1, for align_corners=True, as X-SAM). Empty masks -> all points (0, 0)."""
        if prompt_masks.dim() != 3:
            raise ValueError(f"prompt_masks must be [R, Hm, Wm], got {tuple(prompt_masks.shape)}")
        r, h, w = prompt_masks.shape
        fg = (prompt_masks != 0).reshape(r, h * w)
        empty = ~fg.any(dim=1)
        weights = fg.float()
        weights[empty] = 1.0  # any valid distribution; these rows are overwritten below
        p = self.num_points
        # without replacement: the P foreground pixels with the smallest random keys (background keys = 2)
        keys = torch.rand(r, h * w, generator=generator, device=fg.device).masked_fill(~fg, 2.0)
        distinct = torch.topk(keys, min(p, h * w), dim=1, largest=False).indices  # [R, min(P, HW)]
        if distinct.shape[1] < p:
            distinct = torch.cat([distinct, distinct[:, :1].expand(r, p - distinct.shape[1])], dim=1)
        extra = torch.multinomial(weights, p, replacement=True, generator=generator)  # [R, P]
        n = fg.sum(dim=1, keepdim=True)  # [R, 1]
        idx = torch.where(torch.arange(p, device=fg.device) < n, distinct, extra)  # [R, P]
        rows = torch.div(idx, w, rounding_mode="floor")
        cols = idx - rows * w
        x = cols.to(torch.float32) / w * 2 - 1
        y = rows.to(torch.float32) / h * 2 - 1
        grid = torch.stack([x, y], dim=-1)
        grid[empty] = 0.0
        return grid

    def forward(self, token_map: Tensor, prompt_masks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """token_map [g, g, D] (one image, channels-last), prompt_masks [R, Hm, Wm] -> region tokens [R, D].

        `generator` (on the masks' device) makes the point draw reproducible (fix it for evaluation)."""
        if token_map.dim() != 3:
            raise ValueError(f"token_map must be [g, g, D], got {tuple(token_map.shape)}")
        r = prompt_masks.shape[0]
        if r == 0:
            return token_map.new_zeros(0, token_map.shape[-1])
        grid = self.sample_points(prompt_masks, generator).to(device=token_map.device, dtype=token_map.dtype)
        fmap = token_map.permute(2, 0, 1).unsqueeze(0)  # [1, D, g, g]
        sampled = F.grid_sample(fmap, grid.unsqueeze(0), mode="bilinear", padding_mode="border",
                                align_corners=True)  # [1, D, R, P]
        pooled = F.adaptive_max_pool1d(sampled[0].permute(1, 0, 2), 1)  # [R, D, 1]
        return pooled.squeeze(-1)
