from functools import partial

import pytest
import torch
from safetensors.torch import save_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn
from transformers import SiglipConfig as HFSiglipConfig
from transformers import SiglipModel

from xsam.model import config
from xsam.model.encoders import SamEncoder, SiglipEncoder, siglip_vision_config
from xsam.model.weights import LoadReport, WeightLoadError, load_checked, load_sam, load_siglip


def randomise(module: nn.Module, seed: int) -> None:
    """Fill every parameter with noise (SAM zero-initialises pos_embed and rel_pos)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def tiny_sam(cfg) -> Sam:
    """A whole segment-anything Sam at tiny sizes, built like build_sam._build_sam."""
    prompt_dim, grid = 16, cfg.image_size // cfg.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=cfg.global_attn_indexes, window_size=cfg.window_size,
            out_chans=prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=32,
                                                               num_heads=2),
                                 transformer_dim=prompt_dim, iou_head_depth=2, iou_head_hidden_dim=16),
    )


# --- load_checked -----------------------------------------------------------------------------------

def test_load_checked_mismatch_missing_unexpected():
    src, dst = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))
    before = dst[1].weight.detach().clone()
    with pytest.raises(WeightLoadError, match=r"1\.weight: \(2, 3\) vs \(5, 3\)") as err:
        load_checked(dst, src.state_dict())
    assert "1.bias" in str(err.value)
    assert not torch.equal(dst[0].weight, src[0].weight)  # nothing copied on error

    report = load_checked(dst, src.state_dict(), allow_mismatch=True)
    assert report.matched == ["0.weight", "0.bias"] and report.missing == [] and not report.ok
    assert report.mismatched == [("1.weight", (2, 3), (5, 3)), ("1.bias", (2,), (5,))]
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].weight, before)
    assert "mismatched 2" in str(report)

    partial_state = {"0.weight": src[0].weight.detach(), "extra.weight": torch.zeros(1)}
    with pytest.raises(WeightLoadError, match="missing keys") as err:
        load_checked(dst, partial_state)
    assert "extra.weight" in str(err.value) and "0.bias" in str(err.value)
    with pytest.raises(WeightLoadError, match="unexpected keys"):
        load_checked(dst, partial_state, strict_missing=False)
    report = load_checked(dst, partial_state, strict_missing=False, ignore_unexpected=("extra",))
    assert report.ignored == ["extra.weight"] and report.unexpected == [] and "1.weight" in report.missing


def test_load_checked_ignore_prefix_is_module_boundary():
    dst = nn.ModuleDict({"head": nn.Linear(2, 2), "heads": nn.Linear(2, 2)})
    state = {k: torch.ones_like(v) for k, v in dst.state_dict().items()}
    report = load_checked(dst, state, ignore_unexpected=("head",))
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    assert sorted(report.matched) == ["heads.bias", "heads.weight"] and report.ok
    assert torch.equal(dst["heads"].weight, torch.ones(2, 2)) and not torch.equal(dst["head"].weight, torch.ones(2, 2))


# --- SigLIP -----------------------------------------------------------------------------------------

def test_load_siglip_vision_folder(tmp_path):
    cfg = config.tiny().siglip
    torch.manual_seed(0)
    src = SiglipEncoder(cfg).eval()
    src.model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    dst = SiglipEncoder(cfg).eval()
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert not torch.allclose(dst(pixels), src(pixels))
        report = load_siglip(dst, tmp_path)
        assert torch.equal(dst(pixels), src(pixels))
    assert report.ok and sorted(report.matched) == sorted(dst.model.state_dict()) and report.ignored == []


def test_load_siglip_full_model_folder(tmp_path):
    cfg = config.tiny().siglip
    vision = siglip_vision_config(cfg).to_dict()
    full = SiglipModel(HFSiglipConfig(vision_config=vision,
                                      text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                                   "max_position_embeddings": 8})).eval()
    full.save_pretrained(tmp_path)
    dst = SiglipEncoder(cfg).eval()
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    report = load_siglip(dst, tmp_path)
    with torch.no_grad():
        ref = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(dst(pixels), ref)
    assert report.ok and sorted(report.matched) == sorted(dst.model.state_dict())
    assert "logit_scale" in report.ignored and any(k.startswith("text_model.") for k in report.ignored)


def test_load_siglip_sharded_folder(tmp_path):
    cfg = config.tiny().siglip
    src = SiglipEncoder(cfg).eval()
    src.model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    dst = SiglipEncoder(cfg).eval()
    report = load_siglip(dst, tmp_path)
    assert report.ok and len(report.matched) == len(dst.model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(src.model.state_dict().values(), dst.model.state_dict().values()))


def test_load_siglip_config_mismatch_names_field(tmp_path):
    cfg = config.tiny().siglip
    SiglipEncoder(cfg).model.save_pretrained(tmp_path)
    other = SiglipEncoder(config.SiglipConfig(**{**cfg.__dict__, "intermediate_size": 48}))
    with pytest.raises(WeightLoadError, match="intermediate_size"):
        load_siglip(other, tmp_path)


def test_load_siglip_legacy_prefixed_keys_and_mismatch(tmp_path):
    cfg = config.tiny().siglip
    src = SiglipEncoder(cfg)
    src.model.config.save_pretrained(tmp_path)
    state = {"vision_model." + k: v.contiguous() for k, v in src.model.state_dict().items()}
    state["vision_model.post_layernorm.weight"] = torch.ones(7)
    save_file(state, str(tmp_path / "model.safetensors"))
    dst = SiglipEncoder(cfg)
    with pytest.raises(WeightLoadError, match=r"post_layernorm\.weight: \(7,\) vs \(32,\)"):
        load_siglip(dst, tmp_path)
    report = load_siglip(dst, tmp_path, allow_mismatch=True)
    assert report.mismatched == [("post_layernorm.weight", (7,), (32,))]
    assert len(report.matched) == len(dst.model.state_dict()) - 1
    assert torch.equal(dst.model.encoder.layers[0].mlp.fc1.weight, src.model.encoder.layers[0].mlp.fc1.weight)


# --- SAM --------------------------------------------------------------------------------------------

def test_load_sam_original_checkpoint(tmp_path):
    cfg = config.tiny().sam
    sam = tiny_sam(cfg)
    randomise(sam, seed=0)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)

    enc = SamEncoder(cfg).eval()
    report = load_sam(enc, path)
    assert report.ok and sorted(report.matched) == sorted(enc.state_dict())
    assert report.ignored and all(k.startswith(("image_encoder.neck.", "prompt_encoder.", "mask_decoder."))
                                  for k in report.ignored)
    assert any(k.startswith("image_encoder.neck.") for k in report.ignored)

    ie = sam.image_encoder.eval()
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        x, expected = ie.patch_embed(pixels) + ie.pos_embed, {}
        for number, blk in enumerate(ie.blocks, start=1):
            x = blk(x)
            expected[number] = x
        outs = enc.features(pixels)
        # the block-by-block reference is what the full encoder computes before its neck
        assert torch.equal(ie.neck(expected[cfg.depth].permute(0, 3, 1, 2)), ie(pixels))
    assert sorted(outs) == [2, 3, 4]
    for number, feat in outs.items():
        # SDPA (fused kernels) vs the naive product: equal to float rounding, not bitwise
        torch.testing.assert_close(feat, expected[number], atol=1e-5, rtol=1e-5, msg=f"block {number}")


def test_load_sam_shape_mismatch(tmp_path):
    cfg = config.tiny().sam
    sam = tiny_sam(cfg)
    state = sam.state_dict()
    state["image_encoder.blocks.1.mlp.lin1.weight"] = torch.zeros(7, cfg.embed_dim)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    enc = SamEncoder(cfg)
    with pytest.raises(WeightLoadError, match=r"blocks\.1\.mlp\.lin1\.weight"):
        load_sam(enc, path)
    report = load_sam(enc, path, allow_mismatch=True)
    assert report.mismatched == [("blocks.1.mlp.lin1.weight", (7, cfg.embed_dim), (4 * cfg.embed_dim, cfg.embed_dim))]
    assert not report.ok and "blocks.1.mlp.lin1.weight" not in report.matched
    assert torch.equal(enc.blocks[0].mlp.lin1.weight, sam.image_encoder.blocks[0].mlp.lin1.weight)


def test_load_sam_rejects_foreign_files(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"model.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightLoadError, match="image_encoder"):
        load_sam(SamEncoder(config.tiny().sam), path)
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "extra": {"nested": torch.zeros(1)}}, path)
    with pytest.raises(WeightLoadError, match="flat state dict"):
        load_sam(SamEncoder(config.tiny().sam), path)


def test_report_str_and_ok():
    r = LoadReport(["a"], [], [], [], ["b"])
    assert r.ok and str(r) == "LoadReport(ok: matched 1, missing 0, unexpected 0, mismatched 0, ignored 1)"
    assert not LoadReport([], ["a"], [], []).ok
