import pytest
from transformers import AutoTokenizer

from xsam.model import templates as T
from xsam.model.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    CHAT_TOKENS,
    END_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    REGION_TOKEN_INDEX,
    SPECIAL_TOKENS,
    USER_TOKEN,
    add_special_tokens,
    build_tiny_tokenizer,
    encode_chat,
    parse_gcg,
    token_id,
    tokenize,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _decode_text(tok, ids):
    """Decode ids with placeholders shown as <image> / <region>."""
    out, run = [], []
    for i in ids + [None]:
        if i is None or i < 0:
            out.append(tok.decode(run, skip_special_tokens=False))
            run = []
            if i is not None:
                out.append({IMAGE_TOKEN_INDEX: "<image>", REGION_TOKEN_INDEX: "<region>"}[i])
        else:
            run.append(i)
    return "".join(out)


def test_special_tokens_single_ids_and_survive_reload(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "plain", with_special_tokens=False)
    assert len(tok.encode("<SEG>", add_special_tokens=False)) > 1  # not known yet
    assert add_special_tokens(tok) == 3
    ids = {t: tok.encode(t, add_special_tokens=False) for t in SPECIAL_TOKENS}
    assert all(len(v) == 1 for v in ids.values()) and len({v[0] for v in ids.values()}) == 3
    assert add_special_tokens(tok) == 0
    tok.save_pretrained(tmp_path / "saved")
    back = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert len(back) == len(tok) <= 512
    for t in SPECIAL_TOKENS:
        assert back.encode(t, add_special_tokens=False) == ids[t]
        assert t in back.all_special_tokens
    for t in CHAT_TOKENS:
        assert len(back.encode(t, add_special_tokens=False)) == 1
    text = "A <p>man</p> rides<SEG>."
    assert back.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert add_special_tokens(back) == 0


def test_tiny_tokenizer_fits_tiny_vocab(tok, tmp_path):
    assert len(tok) <= 512
    assert tok.decode(tok.encode("Sure, the segmentation result is <SEG>.", add_special_tokens=False)) \
        == "Sure, the segmentation result is <SEG>."
    with pytest.raises(ValueError):
        build_tiny_tokenizer(tmp_path / "big", vocab_size=600)


def test_token_id_by_string(tok):
    assert token_id(tok, END_TOKEN) == tok.encode(END_TOKEN, add_special_tokens=False)[0]
    assert token_id(tok, BOS_TOKEN) == tok.bos_token_id
    with pytest.raises(KeyError):
        token_id(tok, "<not-a-token>")


def test_tokenize_places_placeholders(tok):
    ids = tokenize("<image>\nIs <region> left of <region>?", tok)
    assert ids[0] == IMAGE_TOKEN_INDEX
    regions = [k for k, i in enumerate(ids) if i == REGION_TOKEN_INDEX]
    assert len(regions) == 2 and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tok.decode(ids[regions[0] + 1:regions[1]]) == " left of "
    assert _decode_text(tok, ids) == "<image>\nIs <region> left of <region>?"
    first_region = ids.index(REGION_TOKEN_INDEX)
    assert tok.decode(ids[1:first_region]) == "\nIs "
    assert ids[-1] >= 0 and tok.decode(ids[-1:]) == "?"


def _label_runs(labels):
    runs, cur = [], []
    for lab in labels + [IGNORE_INDEX]:
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(lab)
    return runs


def test_encode_chat_labels_cover_exactly_the_answers(tok):
    turns = [(T.with_image(T.referring_question("the red bike", 0)), T.seg_answer(2)),
             ("And <p>the <region></p>?", "Sure, it is <SEG>.")]
    ids, labels = encode_chat(turns, tok, max_text_tokens=1000)
    assert len(ids) == len(labels) and ids[0] == tok.bos_token_id
    expected = "".join(f"{USER_TOKEN}\n{u}{END_TOKEN}\n{ASSISTANT_TOKEN}\n{a}{END_TOKEN}\n" for u, a in turns)
    assert _decode_text(tok, ids) == BOS_TOKEN + expected
    runs = _label_runs(labels)
    assert [tok.decode(r) for r in runs] == [a + END_TOKEN for _, a in turns]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i < 0)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(REGION_TOKEN_INDEX) == 1
    with pytest.raises(ValueError):
        encode_chat([("q", "a <image>")], tok, 100)


def test_encode_chat_truncates_text_only(tok):
    turns = [("<image>\n" + "Describe the picture in detail please. " * 3, "A man rides a red bike. " * 3),
             ("What about <region>?", "It is a dog.")]
    full_ids, _full_labels = encode_chat(turns, tok, max_text_tokens=10_000)
    budget = 25
    ids, labels = encode_chat(turns, tok, max_text_tokens=budget)
    assert sum(1 for i in ids if i >= 0) == budget
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(REGION_TOKEN_INDEX) == 1  # the region was past the cut
    text = [i for i in ids if i >= 0]
    assert text == [i for i in full_ids if i >= 0][:budget]
    assert len(labels) == len(ids)


def test_parse_gcg():
    caption, spans = parse_gcg("A <p>man</p> rides a <p>red bike</p>. And <SEG>.")
    assert caption == "A man rides a red bike."
    assert spans == [(2, 5), (14, 22)]
    assert [caption[s:e] for s, e in spans] == ["man", "red bike"]
    # no lead-in, whitespace inside tags, end token from generation
    caption, spans = parse_gcg("<p> Two dogs</p> play on <p>grass</p>. <SEG>.<|end|>")
    assert caption == "Two dogs play on grass." and [caption[s:e] for s, e in spans] == ["Two dogs", "grass"]
    # free generation: unclosed / stray tags give no span, no <SEG> keeps the whole text
    caption, spans = parse_gcg("A <p>cat</p> and </p>a <p>dog")
    assert caption == "A cat and a dog" and spans == [(2, 5)]
    assert parse_gcg("And the segmentation mask is <SEG>.") == ("", [])
    assert parse_gcg("The segmentation mask is <SEG>.") == ("", [])


def test_encode_prompt_is_the_prefix_encode_chat_uses(tmp_path):
    from xsam.model.tokenizer import build_tiny_tokenizer, encode_chat, encode_prompt

    tok = build_tiny_tokenizer(tmp_path)
    ids, _ = encode_chat([("<image>\nDescribe it.", "A box.")], tok, 1000)
    prompt = encode_prompt("<image>\nDescribe it.", tok)
    assert ids[: len(prompt)] == prompt and len(ids) > len(prompt) and -200 in prompt
