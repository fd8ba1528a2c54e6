"""MLP projectors between the encoders, the LLM and the mask decoder.

MLPProjector(in, out, hidden=out, depth=2)   [..., in] -> [..., out]: Linear, GELU, Linear
    image projector      : SigLIP 1152 -> LLM 3072
    LLM->decoder         : LLM 3072 -> 256 (hidden 256)
SegProjector(embed, llm)   SAM block output [B, g, g, embed] -> pixel shuffle 0.5 -> [B, g/2, g/2, 4 embed]
                           -> MLPProjector(4 embed -> llm) -> [B, (g/2)^2, llm] tokens
"""

from __future__ import annotations

from torch import Tensor, nn

from xsam.model.pixel_shuffle import pixel_shuffle


class MLPProjector(nn.Module):
    """depth Linear layers with GELU between them: in -> hidden -> ... -> hidden -> out
    (depth 1: a single Linear in -> out). Works on any leading shape: [..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLPProjector depth must be >= 1, got {depth}")
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SegProjector(nn.Module):
    """The segmentation projector: pixel shuffle 0.5 then MLPProjector(4 * embed_dim -> llm_dim)."""

    def __init__(self, embed_dim: int, llm_dim: int):
        super().__init__()
        self.mlp = MLPProjector(4 * embed_dim, llm_dim)

    def forward_map(self, feat: Tensor) -> Tensor:
        """feat [B, g, g, C] channels-last -> the 2-D token map [B, g/2, g/2, llm_dim]."""
        return self.mlp(pixel_shuffle(feat, 0.5))

    def forward(self, feat: Tensor) -> Tensor:
        """feat [B, g, g, C] -> tokens [B, (g/2)^2, llm_dim] (row-major over the token map)."""
        return self.forward_map(feat).flatten(1, 2)
