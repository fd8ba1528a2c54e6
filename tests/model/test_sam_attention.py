"""SdpaAttention (SDPA with the relative positions as an additive bias) against segment-anything's own
Attention / Block / ImageEncoderViT, with the same random weights (non-zero relative positions)."""

import copy
import dataclasses
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, Block, add_decomposed_rel_pos
from torch import nn

from xsam.model import config
from xsam.model.encoders import SamEncoder
from xsam.model.sam_attention import SdpaAttention, rel_pos_bias

DIM, HEADS, GRID = 64, 4, 8  # img 128, patch 16 -> 8 x 8 tokens


def randomise(module: nn.Module, seed: int) -> None:
    """Noise in every parameter (SAM zero-initialises rel_pos, which would hide the bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def block_pair(window: int, dtype=torch.float32) -> tuple[Block, Block]:
    """(segment-anything Block, the same Block with its attn swapped for SdpaAttention), same weights."""
    ref = Block(DIM, HEADS, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=window,
                input_size=(GRID, GRID))
    randomise(ref, seed=window)
    ref = ref.to(dtype)
    ours = copy.deepcopy(ref)
    ours.attn = SdpaAttention.from_attention(ours.attn)
    return ref, ours


def test_rel_pos_bias_is_segment_anything_term():
    """bias == add_decomposed_rel_pos added to zero scores (the term alone, unscaled q)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, HEADS, 6 * 5, 16, generator=gen)
    rel_h, rel_w = torch.randn(11, 16, generator=gen), torch.randn(9, 16, generator=gen)
    bias = rel_pos_bias(q, rel_h, rel_w, (6, 5), (6, 5))
    assert bias.shape == (2, HEADS, 30, 30)
    flat_q = q.reshape(2 * HEADS, 30, 16)
    ref = add_decomposed_rel_pos(torch.zeros(2 * HEADS, 30, 30), flat_q, rel_h, rel_w, (6, 5), (6, 5))
    torch.testing.assert_close(bias.reshape(2 * HEADS, 30, 30), ref, atol=1e-6, rtol=1e-6)


def test_from_attention_keeps_parameters_and_names():
    ref = Attention(DIM, HEADS, use_rel_pos=True, input_size=(GRID, GRID))
    ref.rel_pos_w.requires_grad_(False)
    ours = SdpaAttention.from_attention(ref)
    assert list(ours.state_dict()) == list(ref.state_dict()) == [
        "rel_pos_h", "rel_pos_w", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    assert all(a is b for a, b in zip(ours.parameters(), ref.parameters(), strict=True))
    assert not ours.rel_pos_w.requires_grad and ours.rel_pos_h.requires_grad
    assert ours.scale == ref.scale == (DIM // HEADS) ** -0.5


@pytest.mark.parametrize("window", [4, 3, 0], ids=["window", "window-padded", "global"])
def test_block_matches_segment_anything_fp32(window):
    ref, ours = block_pair(window)
    x = torch.randn(2, GRID, GRID, DIM, generator=torch.Generator().manual_seed(1))
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref(x_ref), ours(x_ours)
    assert out.shape == (2, GRID, GRID, DIM)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    # gradients flow to the relative positions and match segment-anything's
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    out_ref.backward(grad_out)
    assert ours.attn.rel_pos_h.grad.abs().sum() > 0 and ours.attn.rel_pos_w.grad.abs().sum() > 0
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [4, 0], ids=["window", "global"])
def test_block_bf16_close(window):
    """bf16 in, bf16 bias, bf16 out; as close to the fp32 result as segment-anything's own bf16 block."""
    ref32, _ = block_pair(window)
    ref16, ours16 = block_pair(window, torch.bfloat16)
    x = torch.randn(2, GRID, GRID, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = ref32(x)
        out, out_ref = ours16(x.bfloat16()), ref16(x.bfloat16())
        q = ours16.attn.qkv(x.bfloat16()).reshape(2, GRID * GRID, 3, HEADS, -1)[:, :, 0].transpose(1, 2)
        assert rel_pos_bias(q, ours16.attn.rel_pos_h, ours16.attn.rel_pos_w, (GRID,) * 2, (GRID,) * 2).dtype \
            == torch.bfloat16
    assert out.dtype == torch.bfloat16
    err, err_ref = (out.float() - exact).abs().max(), (out_ref.float() - exact).abs().max()
    scale = exact.abs().max()
    assert err <= max(2 * err_ref, 1e-2 * scale), (err, err_ref, scale)
    torch.testing.assert_close(out.float(), exact, atol=2e-2 * scale, rtol=2e-2)


def test_sam_encoder_matches_image_encoder_vit():
    cfg = dataclasses.replace(config.tiny().sam, embed_dim=DIM, num_heads=HEADS)
    enc = SamEncoder(cfg)
    assert all(isinstance(blk.attn, SdpaAttention) for blk in enc.blocks)
    randomise(enc, seed=3)
    vit = ImageEncoderViT(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=cfg.window_size, global_attn_indexes=tuple(cfg.global_attn_indexes))
    missing, unexpected = vit.load_state_dict(enc.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("neck.") for k in missing)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outs = enc.features(pixels)
        x, ref = vit.patch_embed(pixels) + vit.pos_embed, {}
        for number, blk in enumerate(vit.blocks, start=1):
            x = ref[number] = blk(x)
    assert sorted(outs) == [2, 3, 4]
    for number, out in outs.items():
        torch.testing.assert_close(out, ref[number], atol=1e-5, rtol=1e-5, msg=f"block {number}")
