"""The composed model: shapes per task, the stage policies' gradients, checkpoint chaining."""

import pytest
import torch

from model_fixtures import (chat_example, gcg_example, generic_example, referring_example, tiny_model,
                            tiny_tokenizer, vgd_example)
from xsam.model.batching import collate
from xsam.model.checkpoint import load_stage_checkpoint, read_manifest, save_stage_checkpoint
from xsam.model.stages import S1, S2, S3, param_groups
from xsam.model.xsam import DecodeMode


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


CASES = {
    "generic": (generic_example, DecodeMode.per_sample, 2, 3),  # (maker, mode, items for 2 images, K + 1)
    "referring": (referring_example, DecodeMode.per_phrase, 2, 3),
    "gcg": (gcg_example, DecodeMode.per_sample, 2, 3),
    "vgd": (vgd_example, DecodeMode.per_sample, 2, 3),
}


@pytest.mark.parametrize("task", sorted(CASES))
def test_forward_shapes_per_task(tok, task):
    maker, mode, items, classes = CASES[task]
    cfg, model = tiny_model(tok)
    batch = collate([maker(1), maker(2)], mode, tok, cfg)
    losses, out = model(batch)
    q, grid = cfg.decoder.num_queries, cfg.sam.image_size // 8
    assert out["pred_logits"].shape == (items, q, classes)
    assert out["pred_masks"].shape == (items, q, grid, grid)
    assert len(out["aux_outputs"]) == cfg.decoder.dec_layers - 1
    assert {"lm", "loss_ce", "loss_mask", "loss_dice", "total"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["total"], sum(v for k, v in losses.items() if k != "total"))


def test_chat_batch_has_lm_loss_only(tok):
    cfg, model = tiny_model(tok)
    losses, out = model(collate([chat_example(1)], DecodeMode.none, tok, cfg))
    assert out is None and set(losses) == {"lm", "total"} and losses["lm"] > 0


def test_referring_conditions_are_shared_across_the_batch(tok):
    cfg, model = tiny_model(tok)
    batch = collate([referring_example(1), referring_example(2)], DecodeMode.per_phrase, tok, cfg)
    _, out = model(batch)
    # each item: its own <SEG> bias, but both phrases as classes (cross-sample negatives) + background
    assert [t["labels"].tolist() for t in batch.targets] == [[0], [1]]
    assert out["pred_logits"].shape[-1] == 3


def _grads(model):
    # "has a gradient", not "non-zero": Deformable-DETR zero-initialises the offset / weight projections,
    # so at step 0 the exact gradient of e.g. the encoder's level embeddings is 0
    return {n for n, p in model.named_parameters() if p.grad is not None}


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage_policies_put_gradients_exactly_on_trainable_modules(tok):
    cfg, m1 = tiny_model(None, "s1")
    batch = collate([generic_example(1)], DecodeMode.per_sample, tok, cfg)
    losses, _ = m1.forward_s1(batch.sam_pixels, batch.targets)
    losses["total"].backward()
    assert _grads(m1) == _trainable(m1)
    assert {n.split(".")[0] for n in _trainable(m1)} == {"sam", "segmentor"}
    assert not any(n.startswith(("segmentor.cosine_head", "segmentor.background")) for n in _trainable(m1))

    cfg, m2 = tiny_model(tok, "s2")
    assert m2.segmentor is None
    losses, _ = m2(collate([chat_example(1)], DecodeMode.none, tok, cfg))
    losses["total"].backward()
    assert _grads(m2) == _trainable(m2)
    # S2 aligns: only the two projectors train (the LLM, its embeddings and LM head included, stays frozen)
    assert {n.split(".")[0] for n in _trainable(m2)} == {"image_projector", "seg_projector"}
    assert not any(n.startswith(("sam.", "siglip.", "llm.model.model.layers")) for n in _trainable(m2))

    cfg, m3 = tiny_model(tok, "s3")
    losses, _ = m3(collate([generic_example(1)], DecodeMode.per_sample, tok, cfg))
    losses["total"].backward()
    assert _grads(m3) == _trainable(m3)
    frozen = {n for n, p in m3.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("segmentor.s1_head", "siglip.model.encoder.layers.2", "siglip.model.post_layernorm",
                             "siglip.model.head")) for n in frozen), frozen
    groups = {g["lr_mult"]: g["names"] for g in param_groups(m3, S3, 4e-5, 0.05)}
    assert set(groups) == {0.1, 1.0}
    assert {n.split(".")[0] for n in groups[0.1]} == {"sam", "siglip"}
    assert groups and abs(sum(len(v) for v in groups.values()) - len(_trainable(m3))) == 0


def test_s1_and_s2_exports_chain_into_s3_by_exact_key(tok, tmp_path):
    cfg, m1 = tiny_model(None, "s1", seed=1)
    _, m2 = tiny_model(tok, "s2", seed=2)
    save_stage_checkpoint(m1, S1, cfg, tmp_path / "s1")
    save_stage_checkpoint(m2, S2, cfg, tmp_path / "s2")
    assert read_manifest(tmp_path / "s1")["stage"] == "s1"
    assert not any(k.startswith("segmentor.s1_head") for k in read_manifest(tmp_path / "s1")["keys"])

    _, m3 = tiny_model(tok, "s3", seed=3)
    r1 = load_stage_checkpoint(m3, tmp_path / "s1", S3)
    r2 = load_stage_checkpoint(m3, tmp_path / "s2", S3)
    assert not r1.mismatched and not r1.unexpected and not r2.mismatched and not r2.unexpected
    assert len(r1.matched) == len(read_manifest(tmp_path / "s1")["keys"])
    s3 = m3.state_dict()
    for source, report in ((m1, r1), (m2, r2)):
        src = source.state_dict()
        for key in report.matched:
            assert torch.equal(s3[key], src[key]), key
    # what neither stage trained keeps its fresh initialisation and is reported missing
    assert any(k.startswith("llm_to_decoder") for k in r1.missing)


def test_checkpoint_with_a_wrong_shape_fails_loudly(tok, tmp_path):
    cfg, m1 = tiny_model(None, "s1")
    save_stage_checkpoint(m1, S1, cfg, tmp_path / "s1")
    cfg.decoder.num_queries += 1
    from xsam.model.builder import build_model

    other = build_model(cfg, S3.parts, len(tok))
    with pytest.raises(ValueError, match="query"):
        load_stage_checkpoint(other, tmp_path / "s1", S3)
    report = load_stage_checkpoint(other, tmp_path / "s1", S3, allow_mismatch=True)
    assert any("query" in m[0] for m in report.mismatched)
