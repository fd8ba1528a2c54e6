import dataclasses

import pytest
import torch
from segment_anything import sam_model_registry

from xsam.model import config
from xsam.model.encoders import SamEncoder, SiglipEncoder


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_siglip_tiny_shape_and_layer():
    cfg = config.tiny().siglip
    torch.manual_seed(0)
    enc = SiglipEncoder(cfg).eval()
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = enc(pixels)
        hf = enc.model(pixel_values=pixels, output_hidden_states=True)
    assert out.shape == (2, cfg.num_tokens, cfg.hidden_size) == (2, 16, 32)
    assert len(hf.hidden_states) == cfg.num_hidden_layers + 1
    assert torch.equal(out, hf.hidden_states[-2])
    assert not torch.allclose(out, hf.last_hidden_state)
    with pytest.raises(ValueError):
        enc(torch.randn(1, 3, cfg.image_size + 14, cfg.image_size + 14))


def test_siglip_gradient_checkpointing_same_result():
    cfg = config.tiny().siglip
    enc = SiglipEncoder(cfg).train()
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    ref = enc(pixels)
    enc.gradient_checkpointing = True
    assert enc.gradient_checkpointing
    out = enc(pixels)
    out.sum().backward()
    assert torch.allclose(out, ref)
    assert enc.model.embeddings.patch_embedding.weight.grad is not None


def test_sam_tiny_shapes_and_names():
    cfg = config.tiny().sam
    enc = SamEncoder(cfg)
    outs = enc.features(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert sorted(outs) == sorted(set(cfg.connector_blocks + (cfg.projector_block,))) == [2, 3, 4]
    for v in outs.values():
        assert v.shape == (2, cfg.grid, cfg.grid, cfg.embed_dim) == (2, 8, 8, 32)
    names = set(enc.state_dict())
    assert {"pos_embed", "patch_embed.proj.weight", "blocks.0.attn.rel_pos_h"} <= names
    assert not any(k.startswith("neck") for k in names)


def test_sam_runs_only_needed_blocks():
    cfg = dataclasses.replace(config.tiny().sam, connector_blocks=(1, 2, 2), projector_block=2)
    enc = SamEncoder(cfg)
    ran = []
    for i, blk in enumerate(enc.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: ran.append(i + 1))
    outs = enc.features(torch.randn(1, 3, cfg.image_size, cfg.image_size))
    assert ran == [1, 2] and sorted(outs) == [1, 2]


def test_sam_gradient_checkpointing_same_result():
    cfg = config.tiny().sam
    torch.manual_seed(0)
    enc = SamEncoder(cfg).train()
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    ref = enc.features(pixels)[4]
    enc.gradient_checkpointing = True
    out = enc.features(pixels)[4]
    out.square().sum().backward()
    assert torch.allclose(out, ref)
    assert enc.blocks[0].attn.qkv.weight.grad is not None


def test_paper_sizes_on_meta():
    cfg = config.paper()
    with torch.device("meta"):
        sam = SamEncoder(cfg.sam)
        siglip = SiglipEncoder(cfg.siglip)
        vit_l = sam_model_registry["vit_l"]().image_encoder
        sam_out = sam.features(torch.empty(1, 3, 1024, 1024))
        siglip_out = siglip(torch.empty(1, 3, 384, 384))
    neck = n_params(vit_l.neck)
    assert n_params(vit_l) == 308_278_272  # segment-anything ViT-L image encoder, 308.3M
    assert n_params(sam) == n_params(vit_l) - neck == 307_425_280
    assert len(sam.blocks) == 24 and sam.pos_embed.shape == (1, 64, 64, 1024)
    assert {k: tuple(v.shape) for k, v in sam_out.items()} == {b: (1, 64, 64, 1024) for b in (12, 18, 23, 24)}
    count = n_params(siglip)
    print(f"SigLIP so400m vision tower: {count:,} parameters")
    assert 400e6 < count < 430e6
    assert siglip_out.shape == (1, 729, 1152)
