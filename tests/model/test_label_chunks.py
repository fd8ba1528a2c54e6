"""Any label space fits: an LVIS-size category list is split into passes that each fit the text budget,
merged into one prediction over every category; where the list fits, exactly the single pass."""

import numpy as np
import pytest
import torch
from model_fixtures import boxes_image, tiny_model, tiny_tokenizer

from xsam.model import label_chunks, postprocess
from xsam.model.batching import Example, text_budget
from xsam.model.predict import _generic_passes, _run, predict
from xsam.model.preprocess import scaled_size
from xsam.model.templates import generic_question, seg_answer, with_image
from xsam.model.xsam import DecodeMode

LVIS_SIZE = 1203


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    _, model = tiny_model(tok, "s3", seed=3)
    return model.eval(), tok


def _turns(names):
    return [(with_image(generic_question(names, 0)), seg_answer(0))]


def test_chunks_fit_cover_everything_and_are_maximal(model_tok):
    _, tok = model_tok
    names = [f"thing number {i}" for i in range(LVIS_SIZE)]
    budget = 480
    fits = lambda sub: label_chunks.text_tokens(_turns(sub), tok) <= budget
    chunks = label_chunks.chunk(names, fits)
    assert len(chunks) > 10 and sum(chunks, []) == list(range(LVIS_SIZE))  # every label, in order, once
    for k, idx in enumerate(chunks):
        sub = [names[i] for i in idx]
        assert fits(sub)
        if k + 1 < len(chunks):  # greedy: one more name would not fit
            assert not fits(sub + [names[chunks[k + 1][0]]])
    with pytest.raises(ValueError, match="alone does not fit"):
        label_chunks.chunk(["x" * 5000], fits)


def test_merged_rows_keep_each_pass_distribution():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3 + 1), torch.randn(5, 2 + 1)
    ma, mb = torch.randn(4, 6, 6), torch.randn(5, 6, 6)
    logits, masks = label_chunks.merge([(a, ma), (b, mb)], [[0, 1, 2], [3, 4]], 5)
    assert logits.shape == (9, 6) and masks.shape == (9, 6, 6)
    p = logits.softmax(-1)
    assert torch.allclose(p[:4, [0, 1, 2, 5]], a.softmax(-1)) and torch.all(p[:4, 3:5] == 0)
    assert torch.allclose(p[4:, [3, 4, 5]], b.softmax(-1)) and torch.all(p[4:, :3] == 0)
    assert torch.equal(masks, torch.cat([ma, mb]))


@torch.no_grad()
def test_lvis_size_label_space_predicts_and_a_fitting_list_is_the_single_pass(model_tok):
    model, tok = model_tok
    image, _ = boxes_image(5, h=40, w=56)
    names = [f"thing number {i}" for i in range(LVIS_SIZE)]
    assert label_chunks.text_tokens(_turns(names), tok) > 10 * text_budget(model.cfg)
    logits, masks = _generic_passes(model, tok, image, names)
    q = model.cfg.decoder.num_queries
    assert logits.shape[-1] == LVIS_SIZE + 1 and logits.shape[1] == masks.shape[1]
    assert logits.shape[1] % q == 0 and logits.shape[1] > 10 * q  # one pass per chunk, all merged
    res = postprocess.instance(logits[0], masks[0], scaled_size((40, 56), model.cfg.sam.image_size), (40, 56))
    assert len(res["labels"]) and int(res["labels"].max()) < LVIS_SIZE and res["masks"].shape[1:] == (40, 56)

    small = names[:5]  # fits: exactly the one teacher-forced pass
    ex = Example(image, _turns(small), np.zeros((0, 40, 56), bool), [])
    ref_logits, ref_masks = _run(model, tok, ex, DecodeMode.per_sample)
    got_logits, got_masks = _generic_passes(model, tok, image, small)
    assert torch.equal(got_logits, ref_logits) and torch.equal(got_masks, ref_masks)
    scaled = scaled_size((40, 56), model.cfg.sam.image_size)
    ref = postprocess.semantic(ref_logits[0], ref_masks[0], scaled, (40, 56))
    assert np.array_equal(np.stack([(ref == c).numpy() for c in sorted(int(c) for c in ref.unique())]),
                          predict(model, tok, image, "semantic", small).masks)
