"""PixelDecoder shapes (tiny and paper widths), structure, gradients; the sine position embedding."""

import math

import pytest
import torch

from xsam.model.config import paper, tiny
from xsam.model.msdeform_attn import MSDeformAttn
from xsam.model.pixel_decoder import PixelDecoder, group_norm
from xsam.model.position_encoding import PositionEmbeddingSine


def tiny_inputs(b=2, channels=(16, 32, 64), size=16, requires_grad=False):
    torch.manual_seed(0)
    return [torch.randn(b, ch, size >> i, size >> i, requires_grad=requires_grad) for i, ch in enumerate(channels)]


def test_tiny_shapes_and_order():
    cfg = tiny().decoder
    torch.manual_seed(0)
    dec = PixelDecoder([16, 32, 64], cfg)
    mask_features, multi_scale = dec(tiny_inputs())
    d = cfg.hidden_dim
    assert mask_features.shape == (2, d, 16, 16)  # stride 8 = the finest input
    assert [tuple(m.shape) for m in multi_scale] == [(2, d, 4, 4), (2, d, 8, 8), (2, d, 16, 16)]  # coarse -> fine
    assert torch.isfinite(mask_features).all()
    assert len(dec.encoder.layers) == cfg.enc_layers


def test_structure_follows_config():
    cfg = paper().decoder
    with torch.device("meta"):
        dec = PixelDecoder([512, 1024, 2048], cfg)
    attn = dec.encoder.layers[0].self_attn
    assert (attn.d_model, attn.n_levels, attn.n_heads, attn.n_points) == (256, 3, 8, 4)
    assert len(dec.encoder.layers) == 6
    assert dec.encoder.layers[0].linear1.out_features == 1024
    assert dec.encoder.level_embed.shape == (3, 256)
    # input projections in coarse -> fine order, GroupNorm(32) at width 256
    assert [p[0].in_channels for p in dec.input_proj] == [2048, 1024, 512]
    assert all(p[1].num_groups == 32 for p in dec.input_proj)
    assert dec.lateral_conv[0].in_channels == 512


def test_paper_width_on_meta_device():
    cfg = paper().decoder
    with torch.device("meta"):
        dec = PixelDecoder([512, 1024, 2048], cfg)
        feats = [torch.empty(1, 512, 128, 128), torch.empty(1, 1024, 64, 64), torch.empty(1, 2048, 32, 32)]
        mask_features, multi_scale = dec(feats)
    assert mask_features.shape == (1, 256, 128, 128)
    assert [tuple(m.shape) for m in multi_scale] == [(1, 256, 32, 32), (1, 256, 64, 64), (1, 256, 128, 128)]


def test_group_norm_divides_small_widths():
    assert group_norm(256).num_groups == 32
    assert group_norm(32).num_groups == 32
    assert group_norm(24).num_groups == 24
    assert group_norm(48).num_groups == 24
    assert group_norm(40).num_groups == 20


def test_every_level_matters_and_gradients_flow():
    cfg = tiny().decoder
    torch.manual_seed(0)
    dec = PixelDecoder([16, 32, 64], cfg)
    # Give the offset / weight projections small weights, as after a few training steps, so every level's
    # queries (and with them the position and level embeddings) clearly shape the output.
    with torch.no_grad():
        for layer in dec.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.1)
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    feats = tiny_inputs(requires_grad=True)
    mask_features, multi_scale = dec(feats)
    (mask_features.square().mean() + sum(m.square().mean() for m in multi_scale)).backward()
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0
    attn = dec.encoder.layers[0].self_attn
    assert attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert dec.encoder.level_embed.grad.abs().sum() > 0

    # the coarsest input reaches the stride-8 mask features through the encoder
    with torch.no_grad():
        base, _ = dec(feats)
        changed = [f.detach().clone() for f in feats]
        changed[2] += 1.0
        other, _ = dec(changed)
    assert not torch.allclose(base, other)


def test_rejects_wrong_inputs():
    dec = PixelDecoder([16, 32, 64], tiny().decoder)
    feats = tiny_inputs()
    with pytest.raises(ValueError):
        dec(feats[:2])
    with pytest.raises(ValueError):
        dec([f.permute(0, 2, 3, 1) for f in feats])  # channels-last is a mistake here


def test_deformable_init():
    dec = PixelDecoder([16, 32, 64], tiny().decoder)
    for layer in dec.encoder.layers:
        m: MSDeformAttn = layer.self_attn
        bias = m.sampling_offsets.bias.view(m.n_heads, m.n_levels, m.n_points, 2)
        # head 0 points along +x; the k-th point at distance k
        assert torch.allclose(bias[0, 0, :, 0], torch.arange(1, m.n_points + 1, dtype=torch.float32))


def test_sine_position_embedding_values():
    pe = PositionEmbeddingSine(4, normalize=True)
    x = torch.zeros(1, 8, 2, 3)
    out = pe(x)
    assert out.shape == (1, 8, 2, 3)
    # y half: channel 0 = sin(y_norm), channel 1 = cos(y_norm) with y_norm = (row + 1) / (H + eps) * 2pi
    eps = 1e-6
    y = torch.tensor([1 / (2 + eps), 2 / (2 + eps)]) * 2 * math.pi
    torch.testing.assert_close(out[0, 0, :, 0], y.sin())
    torch.testing.assert_close(out[0, 1, :, 0], y.cos())
    # x half, channel 4 + 2 = the second frequency: sin(x_norm / 10000^(2/4))
    xs = torch.tensor([(c + 1) / (3 + eps) for c in range(3)]) * 2 * math.pi
    torch.testing.assert_close(out[0, 6, 0, :], (xs / 100.0).sin())
    with pytest.raises(ValueError):
        PositionEmbeddingSine(3)


@pytest.mark.parametrize("shape", [(1, 256, 8, 8), (2, 256, 5, 11), (1, 64, 13, 7), (1, 32, 1, 4)])
def test_sine_position_embedding_equals_transformers_mask2former(shape):
    """The published X-SAM weights were trained with transformers' Mask2FormerSinePositionEmbedding
    (pixel decoder and transformer decoder): the same values, with and without a padding mask."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding

    b, c, h, w = shape
    ours = PositionEmbeddingSine(c // 2, normalize=True)
    theirs = Mask2FormerSinePositionEmbedding(num_position_features=c // 2, normalize=True)
    x = torch.zeros(shape)
    ref = theirs(x.shape, x.device, x.dtype)
    assert (ours(x) - ref).abs().max().item() <= 1e-6
    pad = torch.zeros(b, h, w, dtype=torch.bool)  # True = padding here; transformers' mask marks valid cells
    pad[:, h - h // 3:, :] = True
    pad[:, :, w - w // 4:] = True
    ref = theirs(x.shape, x.device, x.dtype, mask=~pad)
    assert (ours(x, pad) - ref).abs().max().item() <= 1e-6
