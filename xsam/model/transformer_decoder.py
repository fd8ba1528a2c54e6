"""Mask2Former's masked-attention transformer decoder, with the classifier injected.

Learnable query features and query positional embeddings; (dec_layers - 1) layers of
[masked cross-attention -> self-attention -> FFN], round-robin over the 3 pixel-decoder levels
coarse -> fine. Before the first layer and after every layer, predictions are made from
decoder_norm(queries): class logits by the injected `classify` callable (the S1 linear head or the S3
cosine head) and mask logits as the dot product of mask_embed(queries) with the stride-8 mask features.
Each prediction's mask, resized to the next layer's level, is the attention mask of that layer's
cross-attention (sigmoid < 0.5 -> masked; a query whose mask is all masked attends everywhere).

Differences from stock Mask2Former: no per-level input projection (the pixel decoder already outputs the
hidden width), no class head inside, an optional `query_bias` (X-SAM's projected <SEG> state) added to
the query features, and no dropout (Mask2Former trains with dropout 0.0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xsam.model.config import DecoderConfig
from xsam.model.position_encoding import PositionEmbeddingSine

NUM_LEVELS = 3


class CrossAttentionLayer(nn.Module):
    """Queries attend to one level's features; post-norm unless pre_norm."""

    def __init__(self, d_model: int, nheads: int, pre_norm: bool) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nheads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor,
                query_pos: Tensor) -> Tensor:
        """tgt, query_pos: [B, Q, D]; memory, pos: [B, HW, D]; attn_mask: [B * nheads, Q, HW] bool
        (True = cannot attend) or None. Returns [B, Q, D]."""
        q = self.norm(tgt) if self.pre_norm else tgt
        out = self.multihead_attn(q + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        tgt = tgt + out
        return tgt if self.pre_norm else self.norm(tgt)


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other; post-norm unless pre_norm."""

    def __init__(self, d_model: int, nheads: int, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """tgt, query_pos: [B, Q, D]. Returns [B, Q, D]."""
        x = self.norm(tgt) if self.pre_norm else tgt
        qk = x + query_pos
        tgt = tgt + self.self_attn(qk, qk, x, need_weights=False)[0]
        return tgt if self.pre_norm else self.norm(tgt)


class FFNLayer(nn.Module):
    """Linear -> ReLU -> Linear with a residual; post-norm unless pre_norm."""

    def __init__(self, d_model: int, dim_feedforward: int, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor) -> Tensor:
        """tgt: [B, Q, D]. Returns [B, Q, D]."""
        x = self.norm(tgt) if self.pre_norm else tgt
        tgt = tgt + self.linear2(F.relu(self.linear1(x)))
        return tgt if self.pre_norm else self.norm(tgt)


class MLP(nn.Module):
    """num_layers Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


Classifier = Callable[[Tensor], Tensor]


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention decoder.

    Args:
        cfg: DecoderConfig (hidden_dim, num_queries, dec_layers (counting the initial prediction),
            nheads, dim_feedforward, pre_norm).
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.dec_layers < 1:
            raise ValueError(f"dec_layers must be >= 1, got {cfg.dec_layers}")
        d = cfg.hidden_dim
        self.hidden_dim = d
        self.num_heads = cfg.nheads
        self.num_queries = cfg.num_queries
        self.num_layers = cfg.dec_layers - 1  # attention layers; the initial prediction is the extra one

        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.level_embed = nn.Embedding(NUM_LEVELS, d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)

        self.cross_attention_layers = nn.ModuleList()
        self.self_attention_layers = nn.ModuleList()
        self.ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.cross_attention_layers.append(CrossAttentionLayer(d, cfg.nheads, cfg.pre_norm))
            self.self_attention_layers.append(SelfAttentionLayer(d, cfg.nheads, cfg.pre_norm))
            self.ffn_layers.append(FFNLayer(d, cfg.dim_feedforward, cfg.pre_norm))
        for layers in (self.cross_attention_layers, self.self_attention_layers, self.ffn_layers):
            _xavier_init(layers)
        for emb in (self.level_embed, self.query_feat, self.query_embed):  # reference: nn.Embedding N(0, 0.02)
            nn.init.normal_(emb.weight, std=0.02)

        self.decoder_norm = nn.LayerNorm(d)
        self.mask_embed = MLP(d, d, d, 3)

    def forward(self, multi_scale: Sequence[Tensor], mask_features: Tensor, classify: Classifier,
                query_bias: Tensor | None = None) -> dict:
        """
        Args:
            multi_scale: 3 maps [B, D, h_l, w_l], coarse -> fine.
            mask_features: [B, D, H, W] (stride 8).
            classify: normed queries [B, Q, D] -> class logits [B, Q, K+1] (background last).
            query_bias: optional [B, D], added to every query feature before the first prediction.

        Returns:
            dict(pred_logits [B, Q, K+1], pred_masks [B, Q, H, W] (logits),
                 aux_outputs: dec_layers - 1 dicts {pred_logits, pred_masks}, the initial prediction first,
                 the final prediction excluded).
        """
        if len(multi_scale) != NUM_LEVELS:
            raise ValueError(f"expected {NUM_LEVELS} levels, got {len(multi_scale)}")
        b = mask_features.shape[0]
        srcs, pos, sizes = [], [], []
        for lvl, x in enumerate(multi_scale):
            sizes.append(tuple(x.shape[-2:]))
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # [B, HW, D]
            srcs.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl].view(1, 1, -1))

        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        if query_bias is not None:
            if query_bias.shape != (b, self.hidden_dim):
                raise ValueError(f"query_bias must be [{b}, {self.hidden_dim}], got {tuple(query_bias.shape)}")
            output = output + query_bias[:, None, :]

        predictions = []
        logits, masks, attn_mask = self._predict(output, mask_features, sizes[0], classify)
        predictions.append((logits, masks))
        for i in range(self.num_layers):
            lvl = i % NUM_LEVELS
            # A query whose mask is empty at this level attends everywhere.
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.cross_attention_layers[i](output, srcs[lvl], attn_mask, pos[lvl], query_pos)
            output = self.self_attention_layers[i](output, query_pos)
            output = self.ffn_layers[i](output)
            logits, masks, attn_mask = self._predict(output, mask_features, sizes[(i + 1) % NUM_LEVELS], classify)
            predictions.append((logits, masks))

        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]],
        }

    def _predict(self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int],
                 classify: Classifier) -> tuple[Tensor, Tensor, Tensor]:
        """output: [B, Q, D] -> (logits [B, Q, K+1], masks [B, Q, H, W], attn_mask [B * nheads, Q, h*w] bool,
        True = masked, detached)."""
        normed = self.decoder_norm(output)
        logits = classify(normed)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(normed), mask_features)
        resized = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        attn_mask = resized.sigmoid().flatten(2) < 0.5  # [B, Q, hw]
        attn_mask = attn_mask.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1).detach()
        return logits, masks, attn_mask
