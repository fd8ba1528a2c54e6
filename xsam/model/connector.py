"""The segmentation connector: three SAM block outputs (one stride-16 grid) -> a 3-level pyramid.

Per level with scale s (default 2, 1, 0.5):
    Conv1x1 embed->inner, LN2d, Conv3x3 inner->inner, LN2d, Conv1x1 inner->embed*s, LN2d, pixel_shuffle(s)
so a [B, g, g, embed] input becomes [B, embed/s, g*s, g*s]. For the paper (embed 1024, 64x64 grid of a
1024 input): 512ch @ 128x128 (1/8), 1024ch @ 64x64 (1/16), 2048ch @ 32x32 (1/32).
The convolutions have no bias (each is followed by a LayerNorm, as in SAM's neck).
"""

from __future__ import annotations

from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

from xsam.model.pixel_shuffle import pixel_shuffle


class SegConnector(nn.Module):
    def __init__(self, embed_dim: int, inner_dim: int, scales: tuple[float, ...] = (2.0, 1.0, 0.5)):
        super().__init__()
        self.embed_dim = embed_dim
        self.scales = tuple(float(s) for s in scales)
        self.levels = nn.ModuleList()
        for s in self.scales:
            if s not in (0.5, 1.0, 2.0):
                raise ValueError(f"SegConnector scales must be 0.5, 1 or 2, got {s}")
            mid = embed_dim * s
            if mid != int(mid) or (s == 2.0 and int(mid) % 4):
                raise ValueError(f"embed_dim {embed_dim} does not fit scale {s}")
            self.levels.append(nn.Sequential(
                nn.Conv2d(embed_dim, inner_dim, kernel_size=1, bias=False),
                LayerNorm2d(inner_dim),
                nn.Conv2d(inner_dim, inner_dim, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(inner_dim),
                nn.Conv2d(inner_dim, int(mid), kernel_size=1, bias=False),
                LayerNorm2d(int(mid)),
            ))

    @property
    def out_channels(self) -> list[int]:
        """Channels of each output level: embed_dim / s (fine -> coarse for the default scales)."""
        return [round(self.embed_dim * s / (s * s)) for s in self.scales]  # conv out embed*s, shuffle /s^2

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """feats: one [B, g, g, embed_dim] channels-last map per level ->
        list of channels-first [B, embed_dim / s, g*s, g*s] (ceil for odd g at s = 0.5)."""
        if len(feats) != len(self.levels):
            raise ValueError(f"SegConnector expects {len(self.levels)} feature maps, got {len(feats)}")
        outs = []
        for feat, level, s in zip(feats, self.levels, self.scales):
            y = level(feat.permute(0, 3, 1, 2))  # [B, embed*s, g, g]
            y = pixel_shuffle(y.permute(0, 2, 3, 1), s)  # [B, g*s, g*s, embed/s]
            outs.append(y.permute(0, 3, 1, 2).contiguous())
        return outs
