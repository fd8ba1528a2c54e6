"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in pure PyTorch.

Each query attends to a few (n_points) sampled locations per head and per feature level, around a
reference point, with learned offsets and learned (softmax-normalised over levels x points) weights.
Sampling is bilinear with zero padding (F.grid_sample, align_corners=False), so it runs on CPU, on
any accelerator and on the meta device; no custom CUDA kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ShapesLike = Tensor | Sequence[Sequence[int]]


def shapes_list(spatial_shapes: ShapesLike) -> list[tuple[int, int]]:
    """[L, 2] (H, W) per level, given as a long tensor or as Python pairs -> list of int pairs."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(value: Tensor, spatial_shapes: ShapesLike, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """The core sampling-and-weighting step of multi-scale deformable attention.

    Args:
        value: [B, S, nheads, dh] with S = sum(H_l * W_l), the levels flattened row-major and concatenated
            in the order of spatial_shapes.
        spatial_shapes: [L, 2] long tensor (or Python pairs) of (H_l, W_l).
        sampling_locations: [B, Lq, nheads, L, P, 2] normalised (x, y) in [0, 1] (0 = the left / top edge
            of the map, 1 = the right / bottom edge); locations outside read zeros (bilinear, zero padding).
        attention_weights: [B, Lq, nheads, L, P] (usually softmax-normalised over L * P).

    Returns:
        [B, Lq, nheads * dh]: per head, sum over levels and points of weight * bilinear sample.
    """
    shapes = shapes_list(spatial_shapes)
    b, s, nheads, dh = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if len(shapes) != n_levels:
        raise ValueError(f"{len(shapes)} spatial shapes for {n_levels} sampling levels")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"value has {s} positions, spatial shapes sum to {sum(h * w for h, w in shapes)}")

    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # [B, HW, nheads, dh] -> [B * nheads, dh, H, W]
        v = value_levels[lvl].flatten(2).transpose(1, 2).reshape(b * nheads, dh, h, w)
        # [B, Lq, nheads, P, 2] -> [B * nheads, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B * nheads, dh, Lq, L * P]
    sampled = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(b * nheads, 1, lq, n_levels * n_points)
    out = (sampled * weights).sum(-1).view(b, nheads * dh, lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """The Deformable-DETR attention module.

    Args:
        d_model: width of queries and values (divisible by n_heads).
        n_levels: number of feature levels.
        n_heads: attention heads.
        n_points: sampled points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable-DETR init: zero offset / weight projections, the offset bias spreads each head's
        points along its own direction (k-th point at distance k), uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        device = self.sampling_offsets.bias.device
        thetas = torch.arange(self.n_heads, dtype=torch.float32, device=device) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32, device=device)
        grid = grid * scale.view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, spatial_shapes: ShapesLike,
                padding_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: [B, Lq, d_model] (position embedding already added).
            reference_points: [B, Lq, n_levels, 2] normalised (x, y) in [0, 1], or [B, Lq, n_levels, 4]
                boxes (cx, cy, w, h) as in two-stage Deformable DETR.
            input_flatten: [B, S, d_model], the levels flattened and concatenated (S = sum H_l * W_l).
            spatial_shapes: [L, 2] long tensor or Python (H, W) pairs.
            padding_mask: optional [B, S] bool, True = padding (its values are zeroed).

        Returns:
            [B, Lq, d_model].
        """
        shapes = shapes_list(spatial_shapes)
        b, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        if len(shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {len(shapes)}")

        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, s, self.n_heads, self.d_model // self.n_heads)

        offsets = self.sampling_offsets(query).view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W, H)
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")

        out = ms_deform_attn(value, shapes, locations, weights)
        return self.output_proj(out)
