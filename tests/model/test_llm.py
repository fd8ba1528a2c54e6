import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xsam.model import templates as T
from xsam.model.config import tiny
from xsam.model.llm import PAD_TOKEN_ID, XSamLLM, expand_visual, pad_batch, seg_positions, span_average
from xsam.model.tokenizer import (
    END_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    REGION_TOKEN_INDEX,
    build_tiny_tokenizer,
    encode_chat,
    token_id,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llm(tok):
    torch.manual_seed(0)
    return XSamLLM(tiny().llm, len(tok)).eval()


def test_expand_visual_places_tokens():
    torch.manual_seed(0)
    embed = nn.Embedding(20, 4)
    ids = torch.tensor([1, 5, IMAGE_TOKEN_INDEX, 7, REGION_TOKEN_INDEX, 8, REGION_TOKEN_INDEX])
    labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, IGNORE_INDEX])
    visual = torch.randn(3, 4, requires_grad=True)
    regions = torch.randn(2, 4)
    e, lab, t = expand_visual(ids, labels, embed, visual, regions)
    assert e.shape == (9, 4) and lab.shape == (9,) and t.shape == (9,)
    assert torch.equal(e[2:5], visual.detach()) and torch.equal(e[6], regions[0]) and torch.equal(e[8], regions[1])
    assert torch.equal(e[[0, 1, 5, 7]], embed(torch.tensor([1, 5, 7, 8])))
    assert t.tolist() == [1, 5, -200, -200, -200, 7, -300, 8, -300]
    assert lab.tolist() == [IGNORE_INDEX] * 7 + [8, IGNORE_INDEX]
    e.sum().backward()
    assert visual.grad is not None and torch.all(visual.grad == 1)
    with pytest.raises(ValueError):
        expand_visual(ids, labels, embed, visual, regions[:1])  # 2 placeholders, 1 region
    with pytest.raises(ValueError):
        expand_visual(torch.tensor([1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]), torch.zeros(3), embed, visual)


def test_pad_batch_right_pads():
    a = (torch.ones(3, 2), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    b = (torch.full((5, 2), 2.0), torch.tensor([7] * 5), torch.tensor([8] * 5))
    embeds, labels, token_ids, mask = pad_batch([a, b])
    assert embeds.shape == (2, 5, 2) and mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert torch.all(embeds[0, 3:] == 0) and torch.all(embeds[0, :3] == 1)
    assert labels[0].tolist() == [1, 2, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert token_ids[0].tolist() == [4, 5, 6, PAD_TOKEN_ID, PAD_TOKEN_ID]


def test_seg_positions_and_span_average():
    seg, p, end_p = 50, 51, 52
    token_ids = torch.tensor([1, IMAGE_TOKEN_INDEX, p, 9, 10, end_p, 3, p, 11, end_p, 4, seg, 5, seg])
    hidden = torch.arange(14 * 3, dtype=torch.float32).reshape(14, 3) ** 1.5
    assert seg_positions(token_ids, seg).tolist() == [11, 13]
    assert seg_positions(token_ids, 99).numel() == 0
    out = span_average(hidden, token_ids, p, end_p)
    manual = torch.stack([hidden[2:6].mean(0), hidden[7:10].mean(0)])
    assert out.shape == (2, 3) and torch.allclose(out, manual)
    assert span_average(hidden, token_ids[:2], p, end_p).shape == (0, 3)
    unbalanced = token_ids.clone()
    unbalanced[9] = 4  # the second </p> missing
    with pytest.raises(ValueError):
        span_average(hidden, unbalanced, p, end_p)
    assert torch.allclose(span_average(hidden, unbalanced, p, end_p, strict=False), manual[:1])
    half = span_average(hidden.half(), token_ids, p, end_p)
    assert half.dtype == torch.float16


def _sample(tok, llm, visual_tokens=16, answer_index=0):
    turns = [(T.with_image(T.referring_question("the red bike", 0)), T.seg_answer(answer_index))]
    ids, labels = encode_chat(turns, tok, 200)
    torch.manual_seed(answer_index)
    return expand_visual(ids, labels, llm.input_embeddings(), torch.randn(visual_tokens, llm.hidden_size))


def test_forward_backward_loss_is_masked_mean(tok, llm):
    embeds, labels, _token_ids, mask = pad_batch([_sample(tok, llm, 16, 0), _sample(tok, llm, 16, 4)])
    loss, hidden = llm(embeds, mask, labels)
    assert hidden.shape == (*embeds.shape[:2], llm.hidden_size)
    logits = llm.model(inputs_embeds=embeds, attention_mask=mask).logits
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, manual, atol=1e-5)
    assert torch.allclose(llm.logits(hidden), logits, atol=1e-5)
    llm.zero_grad()
    loss.backward()
    assert llm.input_embeddings().weight.grad.abs().sum() > 0
    assert llm.model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    no_loss, _ = llm(embeds, mask, torch.full_like(labels, IGNORE_INDEX))
    assert no_loss is None
    llm.zero_grad()


def test_trainable_when_frozen(tok):
    model = XSamLLM(tiny().llm, len(tok))
    assert model.trainable_when_frozen() == ["model.model.embed_tokens.weight", "model.lm_head.weight"]
    model.freeze()
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(model.trainable_when_frozen())
    assert model.vocab_size == len(tok) and model.model.lm_head.weight.shape[0] == len(tok)


def test_save_and_reload_gives_identical_logits(tok, llm, tmp_path):
    llm.save_pretrained(tmp_path / "llm")
    back = XSamLLM.from_pretrained(tmp_path / "llm", len(tok)).eval()
    assert back.load_report.vocab_before == back.load_report.vocab_after == len(tok)
    assert not back.load_report.missing_keys and not back.load_report.unexpected_keys
    embeds, _labels, _, mask = pad_batch([_sample(tok, llm)])
    with torch.no_grad():
        a = llm.logits(llm(embeds, mask)[1])
        b = back.logits(back(embeds, mask)[1])
    assert torch.equal(a, b)
    grown = XSamLLM.from_pretrained(tmp_path / "llm", len(tok) + 2)
    assert grown.vocab_size == len(tok) + 2 and grown.load_report.added_rows == 2
    assert torch.equal(grown.input_embeddings().weight[: len(tok)], llm.input_embeddings().weight)
    with pytest.raises(FileNotFoundError):
        XSamLLM.from_pretrained(tmp_path / "missing")


def _reference_greedy(llm, embeds, n, eos_id):
    """Step-by-step argmax, full recompute, no cache, one unpadded sample."""
    out = []
    seq = embeds[None]
    with torch.no_grad():
        for _ in range(n):
            token = int(llm.model(inputs_embeds=seq).logits[0, -1].argmax())
            out.append(token)
            if token == eos_id:
                break
            seq = torch.cat([seq, llm.input_embeddings()(torch.tensor([[token]]))], dim=1)
    return out


def test_generate_greedy_matches_uncached_loop(tok, llm):
    samples = [_sample(tok, llm, 16, 0), _sample(tok, llm, 5, 1)]  # different lengths -> padding
    embeds, _, _, mask = pad_batch(samples)
    eos = token_id(tok, END_TOKEN)
    got = llm.generate_greedy(embeds, mask, max_new_tokens=12, eos_id=eos)
    for (e, _, _), ids in zip(samples, got):
        assert ids == _reference_greedy(llm, e, 12, eos)
        assert 1 <= len(ids) <= 12
    # eos stops a sample: make the first generated token the eos id
    first = got[0][0]
    assert llm.generate_greedy(embeds[:1], mask[:1], max_new_tokens=12, eos_id=first) == [[first]]
