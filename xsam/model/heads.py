"""Class heads for the decoder's normed queries, and the latent background embedding.

- LinearClassifier: the S1 head, Linear(dim -> num_classes + 1), last column = no-object.
- CosineClassifier: the S3 head, scaled cosine similarity between queries and per-sample condition
  embeddings (the averaged <p>...</p> spans) with the learned background embedding appended as the last
  class; padded conditions get a large negative logit.
- LatentBackground: nn.Embedding(1, dim), the background / no-object class vector.

Either head is given to MaskedAttentionDecoder as its `classify` callable, e.g.
`lambda q: cosine(q, cond, cond_mask, background.vector)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PADDED_CLASS_LOGIT = -1e4  # "large negative": finite, representable in fp16 / bf16


class CosineClassifier(nn.Module):
    """logits = min(exp(logit_scale), clamp) * cos(query, class), classes = [cond; background].

    Args:
        dim: embedding width D.
        logit_scale_init: initial value of the learned log-scale (log(1 / 0.07) in X-SAM).
        clamp: upper bound of exp(logit_scale) (500 in the paper, 50 in the later revision).
    """

    def __init__(self, dim: int, logit_scale_init: float, clamp: float) -> None:
        super().__init__()
        self.dim = dim
        self.clamp = float(clamp)
        # shape [1], not a 0-dim scalar: DeepSpeed's CPU broadcast cannot view 0-dim tensors as bytes
        self.logit_scale = nn.Parameter(torch.tensor([float(logit_scale_init)]))

    def scale(self) -> Tensor:
        """The multiplier exp(logit_scale) clamped at `clamp` (a scalar tensor)."""
        return self.logit_scale.exp().clamp(max=self.clamp)[0]

    def forward(self, queries: Tensor, cond: Tensor, cond_mask: Tensor, background: Tensor) -> Tensor:
        """
        Args:
            queries: [B, Q, D] (the decoder's normed queries).
            cond: [B, K, D] condition embeddings, padded per sample to the batch max K.
            cond_mask: [B, K] bool, True = real class, False = padding.
            background: [D] the latent background embedding.

        Returns:
            [B, Q, K+1] logits, background last; padded classes are PADDED_CLASS_LOGIT.
        """
        b, _, d = queries.shape
        if cond.dim() != 3 or cond.shape[0] != b or cond.shape[2] != d or d != self.dim:
            raise ValueError(f"queries {tuple(queries.shape)} and cond {tuple(cond.shape)} do not match dim {self.dim}")
        if cond_mask.shape != cond.shape[:2]:
            raise ValueError(f"cond_mask must be {tuple(cond.shape[:2])}, got {tuple(cond_mask.shape)}")
        classes = torch.cat([cond, background.view(1, 1, d).expand(b, 1, d).to(cond.dtype)], dim=1)
        cos = torch.einsum("bqd,bkd->bqk", F.normalize(queries, dim=-1), F.normalize(classes, dim=-1))
        logits = self.scale().to(cos.dtype) * cos
        keep = torch.cat([cond_mask.bool(), cond_mask.new_ones(b, 1, dtype=torch.bool)], dim=1)
        return logits.masked_fill(~keep[:, None, :], PADDED_CLASS_LOGIT)


class LinearClassifier(nn.Module):
    """The S1 head: Linear(dim -> num_classes + 1); the last logit is the no-object class.

    forward(queries [B, Q, D]) -> [B, Q, num_classes + 1].
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(dim, num_classes + 1)

    def forward(self, queries: Tensor) -> Tensor:
        return self.linear(queries)


class LatentBackground(nn.Module):
    """The learned background embedding, nn.Embedding(1, dim); `.vector` (or forward()) -> [D]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(1, dim)

    @property
    def vector(self) -> Tensor:
        return self.embedding.weight[0]

    def forward(self) -> Tensor:
        return self.vector
