"""CosineClassifier (known cosines x scale, clamp, padding, background last), LinearClassifier, LatentBackground."""

import math

import torch

from xsam.model.config import paper, tiny
from xsam.model.heads import PADDED_CLASS_LOGIT, CosineClassifier, LatentBackground, LinearClassifier


def hand_made():
    """2 queries, 2 condition classes (+1 padded in sample 0), a background, in 2-D; known cosines."""
    queries = torch.tensor([[[3.0, 0.0], [1.0, 1.0]],
                            [[0.0, 2.0], [-1.0, 0.0]]])  # [B=2, Q=2, D=2]
    cond = torch.tensor([[[1.0, 0.0], [0.0, 5.0], [7.0, 7.0]],
                         [[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]]])  # [B=2, K=3, D=2]
    cond_mask = torch.tensor([[True, True, False], [True, True, True]])
    background = torch.tensor([-1.0, 0.0])
    s = 1 / math.sqrt(2)
    cos = torch.tensor([
        [[1.0, 0.0, s, -1.0], [s, s, 1.0, -s]],
        [[0.0, s, -1.0, 0.0], [-1.0, -s, 0.0, 1.0]],
    ])  # [B, Q, K+1], background last
    return queries, cond, cond_mask, background, cos


def test_cosine_logits_are_scaled_cosines():
    queries, cond, cond_mask, background, cos = hand_made()
    head = CosineClassifier(2, logit_scale_init=math.log(10.0), clamp=500.0)
    logits = head(queries, cond, cond_mask, background)
    assert logits.shape == (2, 2, 4)
    expected = 10.0 * cos
    expected[0, :, 2] = PADDED_CLASS_LOGIT  # padded class of sample 0
    torch.testing.assert_close(logits, expected)
    # the background column is last and real
    torch.testing.assert_close(logits[..., -1], 10.0 * cos[..., -1])


def test_scale_is_clamped_and_learned():
    queries, cond, cond_mask, background, cos = hand_made()
    head = CosineClassifier(2, logit_scale_init=math.log(1000.0), clamp=50.0)
    logits = head(queries, cond, cond_mask.clone().fill_(True), background)
    torch.testing.assert_close(logits, 50.0 * cos)
    paper_cfg = paper().decoder
    head = CosineClassifier(paper_cfg.hidden_dim, paper_cfg.logit_scale_init, paper_cfg.logit_scale_clamp)
    assert isinstance(head.logit_scale, torch.nn.Parameter) and head.logit_scale.shape == (1,)
    torch.testing.assert_close(head.scale(), torch.tensor(1 / 0.07))
    # below the clamp the scale gets a gradient; above it, none
    q, c, m, bg, _ = hand_made()
    head = CosineClassifier(2, math.log(10.0), 500.0)
    head(q, c, m, bg)[..., :2].sum().backward()
    assert head.logit_scale.grad.abs() > 0
    head = CosineClassifier(2, math.log(1000.0), 50.0)
    head(q, c, m, bg)[..., :2].sum().backward()
    assert head.logit_scale.grad is None or head.logit_scale.grad.abs() == 0


def test_padded_classes_lose_softmax_and_gradients_flow():
    queries, cond, cond_mask, background, _ = hand_made()
    queries.requires_grad_(True)
    cond.requires_grad_(True)
    background = background.clone().requires_grad_(True)
    logits = CosineClassifier(2, math.log(1 / 0.07), 500.0)(queries, cond, cond_mask, background)
    probs = logits.softmax(-1)
    assert probs[0, :, 2].max() < 1e-30
    assert torch.isfinite(logits).all() and torch.isfinite(logits.half()).all()  # fits fp16
    logits[..., [0, 1, 3]].sum().backward()
    assert queries.grad.abs().sum() > 0 and cond.grad.abs().sum() > 0 and background.grad.abs().sum() > 0


def test_latent_background_with_cosine_head():
    cfg = tiny().decoder
    bg = LatentBackground(cfg.hidden_dim)
    assert bg.vector.shape == (cfg.hidden_dim,)
    assert torch.equal(bg(), bg.embedding.weight[0])
    head = CosineClassifier(cfg.hidden_dim, cfg.logit_scale_init, cfg.logit_scale_clamp)
    q = torch.randn(2, cfg.num_queries, cfg.hidden_dim)
    cond = torch.randn(2, 3, cfg.hidden_dim)
    logits = head(q, cond, torch.ones(2, 3, dtype=torch.bool), bg.vector)
    cos_bg = torch.nn.functional.cosine_similarity(q, bg.vector.expand_as(q), dim=-1)
    torch.testing.assert_close(logits[..., -1], head.scale() * cos_bg)
    logits.sum().backward()
    assert bg.embedding.weight.grad.abs().sum() > 0


def test_linear_classifier_shape():
    cfg = tiny().decoder
    head = LinearClassifier(cfg.hidden_dim, cfg.num_s1_classes)
    out = head(torch.randn(2, cfg.num_queries, cfg.hidden_dim))
    assert out.shape == (2, cfg.num_queries, cfg.num_s1_classes + 1)
    assert LinearClassifier(256, paper().decoder.num_s1_classes).linear.out_features == 134
