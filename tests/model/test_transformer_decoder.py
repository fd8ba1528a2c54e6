"""MaskedAttentionDecoder: shapes, paper width on meta, query bias, masked attention, gradients."""

from dataclasses import replace

import pytest
import torch

from xsam.model.config import paper, tiny
from xsam.model.heads import LinearClassifier
from xsam.model.transformer_decoder import MaskedAttentionDecoder

SIZES = [(4, 4), (8, 8), (16, 16)]  # coarse -> fine; mask features at the finest size


def inputs(d, b=2, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    multi_scale = [torch.randn(b, d, h, w, generator=g).requires_grad_(requires_grad) for h, w in SIZES]
    mask_features = torch.randn(b, d, *SIZES[-1], generator=g).requires_grad_(requires_grad)
    return multi_scale, mask_features


def identity(q):
    return q  # "logits" = the normed queries themselves: the most sensitive probe of the decoder state


def test_tiny_shapes_and_aux_outputs():
    cfg = tiny().decoder
    torch.manual_seed(0)
    dec = MaskedAttentionDecoder(cfg)
    head = LinearClassifier(cfg.hidden_dim, cfg.num_s1_classes)
    multi_scale, mask_features = inputs(cfg.hidden_dim)
    out = dec(multi_scale, mask_features, head, None)
    q, k1 = cfg.num_queries, cfg.num_s1_classes + 1
    assert out["pred_logits"].shape == (2, q, k1)
    assert out["pred_masks"].shape == (2, q, *SIZES[-1])
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q, k1)
        assert aux["pred_masks"].shape == (2, q, *SIZES[-1])
    # the predictions differ from layer to layer (the aux list is not the final prediction repeated)
    assert not torch.allclose(out["aux_outputs"][-1]["pred_logits"], out["pred_logits"])


def test_classify_gets_normed_queries_once_per_prediction():
    cfg = tiny().decoder
    dec = MaskedAttentionDecoder(cfg)
    seen = []

    def probe(q):
        seen.append(q.detach())
        return q[..., :3]

    dec(*inputs(cfg.hidden_dim), probe)
    assert len(seen) == cfg.dec_layers
    for q in seen:  # decoder_norm (LayerNorm at its init) -> zero mean, variance v / (v + eps) per query
        assert q.shape == (2, cfg.num_queries, cfg.hidden_dim)
        torch.testing.assert_close(q.mean(-1), torch.zeros(2, cfg.num_queries), atol=1e-5, rtol=0)
        # queries start N(0, 0.02) (the original's init), so LayerNorm's eps = 1e-5 is not negligible
        torch.testing.assert_close(q.var(-1, unbiased=False), torch.ones(2, cfg.num_queries), atol=0.05, rtol=0)


def expected_param_count(d, q, layers, ffn):
    mha = 4 * d * d + 4 * d  # in_proj (q, k, v) + out_proj, with biases
    norm = 2 * d
    per_layer = 2 * (mha + norm) + (d * ffn + ffn + ffn * d + d + norm)
    return layers * per_layer + 2 * q * d + 3 * d + norm + 3 * (d * d + d)  # + queries, levels, norm, mask MLP


def test_paper_width_on_meta_device():
    cfg = paper().decoder
    with torch.device("meta"):
        dec = MaskedAttentionDecoder(cfg)
        head = LinearClassifier(cfg.hidden_dim, cfg.num_s1_classes)
        multi_scale = [torch.empty(1, 256, s, s) for s in (32, 64, 128)]
        out = dec(multi_scale, torch.empty(1, 256, 128, 128), head, torch.empty(1, 256))
    assert out["pred_logits"].shape == (1, 200, 134)
    assert out["pred_masks"].shape == (1, 200, 128, 128)
    assert len(out["aux_outputs"]) == 9
    assert len(dec.cross_attention_layers) == 9
    n = sum(p.numel() for p in dec.parameters())
    assert n == expected_param_count(256, 200, 9, 2048) == 14_509_824


def test_query_bias_changes_outputs_and_zero_bias_is_none():
    cfg = tiny().decoder
    torch.manual_seed(0)
    dec = MaskedAttentionDecoder(cfg)
    multi_scale, mask_features = inputs(cfg.hidden_dim)
    none = dec(multi_scale, mask_features, identity, None)
    zero = dec(multi_scale, mask_features, identity, torch.zeros(2, cfg.hidden_dim))
    bias = torch.zeros(2, cfg.hidden_dim)
    bias[1] = torch.randn(cfg.hidden_dim)  # only the second sample is biased
    biased = dec(multi_scale, mask_features, identity, bias)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(zero[key], none[key], atol=0, rtol=0)
        torch.testing.assert_close(biased[key][0], none[key][0])  # per-sample bias
        assert not torch.allclose(biased[key][1], none[key][1])
    # the bias already shapes the initial prediction (it is added to the query features, not the positions)
    assert not torch.allclose(biased["aux_outputs"][0]["pred_masks"][1], none["aux_outputs"][0]["pred_masks"][1])
    with pytest.raises(ValueError):
        dec(multi_scale, mask_features, identity, torch.zeros(cfg.hidden_dim))


def one_layer_decoder_with_fixed_masks():
    """One attention layer (dec_layers 2, so only the coarsest level is read); every query's mask logits are
    channel 0 of the mask features (mask_embed's last layer outputs the unit vector e_0)."""
    cfg = replace(tiny().decoder, dec_layers=2)
    torch.manual_seed(0)
    dec = MaskedAttentionDecoder(cfg)
    with torch.no_grad():
        last = dec.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = 1.0
    return dec, cfg.hidden_dim


def run(dec, multi_scale, mask_features):
    with torch.no_grad():
        return dec(multi_scale, mask_features, identity)["pred_logits"]


@pytest.mark.parametrize("mask_kind", ["left_half", "everywhere", "nowhere"])
def test_masked_attention_hides_features_outside_the_mask(mask_kind):
    dec, d = one_layer_decoder_with_fixed_masks()
    multi_scale, mask_features = inputs(d, b=1)
    # channel 0 (the mask logits): +10 inside the region, -10 outside
    logit = {"left_half": torch.where(torch.arange(16) < 8, 10.0, -10.0),
             "everywhere": torch.full((16,), 10.0), "nowhere": torch.full((16,), -10.0)}[mask_kind]
    mask_features[0, 0] = logit.expand(16, 16)
    base = run(dec, multi_scale, mask_features)

    # 4x4 coarse level: the left-half mask resizes to columns 0-1; change the features of columns 2-3 only
    right = [m.clone() for m in multi_scale]
    right[0][..., 2:] = torch.randn(1, d, 4, 2, generator=torch.Generator().manual_seed(5)) * 3
    left = [m.clone() for m in multi_scale]
    left[0][..., :2] = torch.randn(1, d, 4, 2, generator=torch.Generator().manual_seed(6)) * 3
    out_right = run(dec, right, mask_features)
    out_left = run(dec, left, mask_features)

    assert torch.isfinite(out_right).all() and torch.isfinite(out_left).all()
    assert not torch.allclose(out_left, base, atol=1e-4)  # features inside the region are seen
    if mask_kind == "left_half":
        torch.testing.assert_close(out_right, base, atol=1e-6, rtol=0)  # ... those outside are not
    else:
        # no mask, or a fully masked query (which then attends everywhere): the right half is seen
        assert not torch.allclose(out_right, base, atol=1e-4)


def test_gradients_reach_inputs_mask_features_and_bias():
    cfg = replace(tiny().decoder, dec_layers=4)  # 3 attention layers: one per level
    torch.manual_seed(0)
    dec = MaskedAttentionDecoder(cfg)
    head = LinearClassifier(cfg.hidden_dim, 5)
    multi_scale, mask_features = inputs(cfg.hidden_dim, requires_grad=True)
    bias = torch.randn(2, cfg.hidden_dim, requires_grad=True)
    out = dec(multi_scale, mask_features, head, bias)
    loss = out["pred_logits"].square().mean() + out["pred_masks"].sigmoid().mean()
    loss.backward()
    for i, m in enumerate(multi_scale):
        assert m.grad is not None and m.grad.abs().sum() > 0, f"level {i}"
    assert mask_features.grad.abs().sum() > 0
    assert bias.grad.abs().sum() > 0
    assert dec.query_feat.weight.grad.abs().sum() > 0
    assert dec.query_embed.weight.grad.abs().sum() > 0
    assert head.linear.weight.grad.abs().sum() > 0


def test_pre_norm_variant_runs():
    cfg = replace(tiny().decoder, pre_norm=True)
    dec = MaskedAttentionDecoder(cfg)
    out = dec(*inputs(cfg.hidden_dim), identity)
    assert torch.isfinite(out["pred_logits"]).all()
    assert dec.cross_attention_layers[0].pre_norm


def test_rejects_wrong_level_count():
    cfg = tiny().decoder
    dec = MaskedAttentionDecoder(cfg)
    multi_scale, mask_features = inputs(cfg.hidden_dim)
    with pytest.raises(ValueError):
        dec(multi_scale[:2], mask_features, identity)
