"""Mask2Former's multi-scale deformable-attention pixel decoder, adapted to X-SAM's three connector levels.

Input: the connector's 3 maps at strides 8, 16, 32 (fine -> coarse). Each is projected to the hidden width
(Conv1x1 + GroupNorm), the three are refined together by a Deformable-DETR encoder (sine position
embeddings + learnable level embeddings), and one FPN step at the finest level (a lateral projection of
the raw 1/8 input added to the encoder's 1/8 output, then Conv3x3 + GroupNorm + ReLU) gives the mask
features at stride 8 through a 1x1 conv. Stock Mask2Former has its FPN step at stride 4; X-SAM has no
stride-4 input, so mask features are at stride 8.

GroupNorm: Mask2Former uses 32 groups; here the group count is the largest divisor of the channel count
that is <= 32 (32 for every paper width; it only differs for tiny widths that 32 does not divide).
Dropout: Mask2Former trains this encoder with dropout 0.0, so there is none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xsam.model.config import DecoderConfig
from xsam.model.msdeform_attn import MSDeformAttn
from xsam.model.position_encoding import PositionEmbeddingSine

NUM_LEVELS = 3


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """Detectron2's "c2_xavier_fill": kaiming_uniform with a=1, zero bias (used for the FPN convs)."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class DeformableEncoderLayer(nn.Module):
    """Post-norm Deformable-DETR encoder layer: deformable self-attention, then FFN (ReLU)."""

    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> Tensor:
        """src, pos: [B, S, d]; reference_points: [B, S, L, 2]. Returns [B, S, d]."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    """A stack of DeformableEncoderLayer over the flattened levels, with learnable level embeddings."""

    def __init__(self, d_model: int, d_ffn: int, num_layers: int, n_levels: int, n_heads: int,
                 n_points: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [DeformableEncoderLayer(d_model, d_ffn, n_levels, n_heads, n_points) for _ in range(num_layers)])
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the reference (x_segmentor._init_weights applied children first): each MSDeformAttn's own
        init (offset-bias grid, zero attention-weight bias), then xavier over every matrix of the encoder,
        the offset and attention-weight projections included, and level embeddings zero."""
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.level_embed)

    @staticmethod
    def reference_points(shapes: Sequence[tuple[int, int]], batch: int, device: torch.device,
                         dtype: torch.dtype) -> Tensor:
        """Normalised (x, y) centres of every cell of every level: [B, S, L, 2] (no padding, so the same
        point is used on every level)."""
        points = []
        for h, w in shapes:
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        ref = torch.cat(points, 0)  # [S, 2]
        return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)

    def forward(self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]) -> list[Tensor]:
        """srcs, pos_embeds: L maps [B, d, H_l, W_l]. Returns L refined maps [B, d, H_l, W_l]."""
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        batch = srcs[0].shape[0]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, d]
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        ref = self.reference_points(shapes, batch, src_flat.device, src_flat.dtype)
        out = src_flat
        for layer in self.layers:
            out = layer(out, pos_flat, ref, shapes)
        maps = out.split([h * w for h, w in shapes], dim=1)
        return [m.transpose(1, 2).reshape(batch, -1, h, w) for m, (h, w) in zip(maps, shapes)]


class PixelDecoder(nn.Module):
    """Deformable-attention pixel decoder over the 3 connector levels.

    Args:
        in_channels: channel counts of the 3 connector levels, fine -> coarse (1/8, 1/16, 1/32).
        cfg: DecoderConfig (hidden_dim, enc_layers, enc_dim_feedforward, nheads, enc_n_points).
    """

    def __init__(self, in_channels: Sequence[int], cfg: DecoderConfig) -> None:
        super().__init__()
        if len(in_channels) != NUM_LEVELS:
            raise ValueError(f"expected {NUM_LEVELS} input levels, got {len(in_channels)}")
        self.in_channels = list(in_channels)
        d = cfg.hidden_dim

        # Input projections in the encoder's level order, coarse -> fine (Mask2Former's order).
        self.input_proj = nn.ModuleList()
        for ch in reversed(self.in_channels):
            conv = nn.Conv2d(ch, d, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, group_norm(d)))

        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.encoder = DeformableEncoder(d, cfg.enc_dim_feedforward, cfg.enc_layers, NUM_LEVELS, cfg.nheads,
                                         cfg.enc_n_points)

        # One FPN step at the 1/8 level.
        self.lateral_conv = nn.Sequential(nn.Conv2d(self.in_channels[0], d, 1, bias=False), group_norm(d))
        self.output_conv = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), group_norm(d), nn.ReLU())
        c2_xavier_fill(self.lateral_conv[0])
        c2_xavier_fill(self.output_conv[0])
        self.mask_features = nn.Conv2d(d, d, kernel_size=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """
        Args:
            feats: 3 channels-first maps [B, C_l, H_l, W_l], fine -> coarse (strides 8, 16, 32).

        Returns:
            mask_features: [B, hidden, H_0, W_0] (stride 8).
            multi_scale: the 3 encoder outputs [B, hidden, H_l, W_l] ordered COARSE -> FINE (1/32, 1/16, 1/8).
        """
        if len(feats) != NUM_LEVELS:
            raise ValueError(f"expected {NUM_LEVELS} feature maps, got {len(feats)}")
        for f, ch in zip(feats, self.in_channels):
            if f.dim() != 4 or f.shape[1] != ch:
                raise ValueError(f"expected [B, {ch}, H, W] channels-first, got {tuple(f.shape)}")
        coarse_to_fine = list(reversed(feats))
        srcs = [proj(f) for proj, f in zip(self.input_proj, coarse_to_fine)]
        pos = [self.pe_layer(s) for s in srcs]
        multi_scale = self.encoder(srcs, pos)

        fine = multi_scale[-1]
        lateral = self.lateral_conv(feats[0])
        if lateral.shape[-2:] != fine.shape[-2:]:
            fine = F.interpolate(fine, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        mask_features = self.mask_features(self.output_conv(lateral + fine))
        return mask_features, multi_scale
