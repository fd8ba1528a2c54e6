"""Stage policies against the reference's freeze rules (issue 10, T4): per stage, the trainable
parameter count equals the count of the modules the reference trains in that stage."""

from __future__ import annotations

import pytest
from model_fixtures import tiny_model, tiny_tokenizer

from xsam.model.stages import STAGES, param_groups


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _count(model, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in prefixes)


def _count_under(model, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_s2_trains_exactly_the_two_projectors(tok):
    # reference S2 (xsam_phi3..._align_pretrain.py): freeze_llm, freeze_visual_encoder, freeze_segmentor_encoder
    _, model = tiny_model(tok, "s2")
    projectors = _count(model, ("image_projector", "seg_projector"))
    assert projectors > 0
    assert _trainable(model) == projectors
    frozen = [n for n, p in model.named_parameters() if n.startswith(("llm.", "siglip.", "sam.")) and p.requires_grad]
    assert frozen == []  # embed_tokens and lm_head included


def test_s1_trains_sam_and_segmentor_with_sam_at_a_tenth(tok):
    # reference S1 (xsam_sam_large_m2f_e36_gpu16_seg_finetune.py): freeze_segmentor_encoder=False,
    # paramwise custom_keys segmentor.encoder lr_mult 0.1; the rest of the segmentor at the base lr
    _, model = tiny_model(None, "s1")
    unused_heads = _count_under(model, ("segmentor.cosine_head", "segmentor.background"))
    assert _trainable(model) == _count(model, ("sam", "segmentor")) - unused_heads
    groups = {g["lr_mult"]: sum(p.numel() for p in g["params"]) for g in param_groups(model, STAGES["s1"], 1e-4, 0.05)}
    assert groups == {0.1: _count(model, ("sam",)), 1.0: _count(model, ("segmentor",)) - unused_heads}


def test_s3_trains_everything_on_the_forward_path(tok):
    # reference S3 (xsam_phi3..._mixed_finetune.py): no part frozen; the S1 linear head is not used
    _, model = tiny_model(tok, "s3")
    unused = _count_under(model, model.unused_prefixes()) + _count_under(model, ("segmentor.s1_head",))
    assert _trainable(model) == sum(p.numel() for p in model.parameters()) - unused
