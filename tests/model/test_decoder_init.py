"""Segmentor decoder initialisation as the reference (issue 10, T9): x_segmentor._init_weights applied
children first to a fresh Mask2Former pixel decoder and transformer decoder (reinit_decoder=True)."""

from __future__ import annotations

import math

import torch

from xsam.model.config import DecoderConfig
from xsam.model.pixel_decoder import PixelDecoder
from xsam.model.transformer_decoder import MaskedAttentionDecoder


def _xavier_bound(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape[0], w.shape[1]
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_pixel_decoder_init_level_embed_zero_offsets_xavier_bias_grid():
    torch.manual_seed(0)
    cfg = DecoderConfig(hidden_dim=64, nheads=4, enc_layers=2, enc_dim_feedforward=128, enc_n_points=3)
    enc = PixelDecoder([32, 32, 32], cfg).encoder
    assert torch.count_nonzero(enc.level_embed) == 0
    attn = enc.layers[0].self_attn
    for w in (attn.sampling_offsets.weight, attn.attention_weights.weight):
        # xavier-uniform (the pixel decoder's pass over every matrix comes after the attention's own init)
        bound = _xavier_bound(w)
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    # offset bias: head h points along (cos, sin)(2 pi h / H) scaled to max-norm 1, point k at distance k+1
    bias = attn.sampling_offsets.bias.view(4, 3, 3, 2)  # heads, levels, points, xy
    expect_dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for k in range(3):
        for lvl in range(3):
            assert torch.allclose(bias[:, lvl, k], expect_dirs * (k + 1), atol=1e-6)


def test_decoder_queries_and_level_embed_normal_002():
    torch.manual_seed(0)
    dec = MaskedAttentionDecoder(DecoderConfig(hidden_dim=256, num_queries=200, dec_layers=2))
    for emb in (dec.query_feat, dec.query_embed):
        w = emb.weight  # [200, 256]: 51,200 draws
        assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 0.0005
    assert abs(dec.level_embed.weight.std().item() - 0.02) < 0.003
