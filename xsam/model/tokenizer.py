"""Text side of X-SAM: special tokens, the tiny offline tokenizer, chat encoding, GCG parsing.

Everything here works on plain ids (lists of ints). Placeholders become negative ids:
``<image>`` -> IMAGE_TOKEN_INDEX (-200), ``<region>`` -> REGION_TOKEN_INDEX (-300); labels use
IGNORE_INDEX (-100). `llm.expand_visual` later replaces the placeholders by embeddings.

Special ids are always looked up by token STRING (`token_id`), never hard-coded, so the same code
serves Phi-3's real SentencePiece-style tokenizer (``<s>`` = 1, ``<|endoftext|>`` = 32000,
``<|assistant|>`` = 32001, ``<|end|>`` = 32007, ``<|user|>`` = 32010) and the tiny byte-level BPE
of `build_tiny_tokenizer`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from xsam.model import templates as T

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
REGION_TOKEN_INDEX = -300
IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region>"

SEG_TOKEN = "<SEG>"
P_TOKEN = "<p>"
END_P_TOKEN = "</p>"
SPECIAL_TOKENS = (SEG_TOKEN, P_TOKEN, END_P_TOKEN)

BOS_TOKEN = "<s>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<unk>", BOS_TOKEN, "</s>", ENDOFTEXT_TOKEN, ASSISTANT_TOKEN, END_TOKEN, USER_TOKEN)

_PLACEHOLDERS = {IMAGE_TOKEN: IMAGE_TOKEN_INDEX, REGION_TOKEN: REGION_TOKEN_INDEX}
_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(p) for p in _PLACEHOLDERS) + ")")


# --------------------------------------------------------------------------- special tokens
def token_id(tokenizer, token: str) -> int:
    """The single id of `token`; KeyError if the tokenizer does not know it as one token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise KeyError(f"token {token!r} is not a single token of this tokenizer")
    return int(tid)


def add_special_tokens(tokenizer) -> int:
    """Register ``<SEG>``, ``<p>``, ``</p>`` as special tokens (never split, one id each); returns how
    many were new. Resize the LLM's embeddings to ``len(tokenizer)`` afterwards."""
    try:  # transformers 5: `extra_special_tokens`
        return tokenizer.add_special_tokens({"extra_special_tokens": list(SPECIAL_TOKENS)},
                                            replace_extra_special_tokens=False)
    except TypeError:  # transformers 4.x
        return tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)},
                                            replace_additional_special_tokens=False)


def _training_text() -> list[str]:
    """Built-in corpus of the tiny tokenizer: the prompt templates plus a little everyday English."""
    words = ("person bicycle car motorcycle bus train truck boat traffic light dog cat horse sheep cow bird "
             "bottle cup chair couch table bed tv laptop book clock sky tree grass wall floor road sea river "
             "building fence ceiling window door mountain sand snow water rock pavement playingfield")
    captions = [
        "A man rides a red bike down the street.", "Two dogs are playing on the grass near a tree.",
        "A woman holds an umbrella in the rain.", "The cat sleeps on a couch next to a window.",
        "A bus is parked beside the road under a blue sky.", "People are walking along the beach at sunset.",
        "Because it is the largest object that can hold water, the answer is the bottle.",
        "What is in the image? There is a table with a cup and a book on it.",
    ]
    text = list(T.ALL_TEMPLATES)
    return text + captions + [words, words.title()]


def build_tiny_tokenizer(folder: str | Path, vocab_size: int = 480, with_special_tokens: bool = True):
    """Train a small byte-level BPE (`tokenizers`) on a built-in text list, with the Phi-3 chat tokens
    (and, unless `with_special_tokens` is False, the X-SAM tokens), wrap it in PreTrainedTokenizerFast,
    save it to `folder` and return it. Reload with ``AutoTokenizer.from_pretrained(folder)``.
    ``len(tokenizer) <= vocab_size + 3 <= 512`` (the tiny LLM's vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size + len(SPECIAL_TOKENS) > 512:
        raise ValueError("the tiny tokenizer must fit the tiny LLM's vocabulary of 512")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHAT_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_training_text(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS_TOKEN, eos_token=ENDOFTEXT_TOKEN,
                                        unk_token="<unk>", pad_token=ENDOFTEXT_TOKEN,
                                        clean_up_tokenization_spaces=False)
    if with_special_tokens:
        add_special_tokens(tokenizer)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


# --------------------------------------------------------------------------- encoding
def tokenize(text: str, tokenizer) -> list[int]:
    """Text with ``<image>`` / ``<region>`` placeholders -> ids with -200 / -300 in their places.
    Each stretch of text between placeholders is encoded on its own, without BOS/EOS."""
    ids: list[int] = []
    for piece in _PLACEHOLDER_RE.split(text):
        if piece in _PLACEHOLDERS:
            ids.append(_PLACEHOLDERS[piece])
        elif piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids


def _truncate_text(ids: list[int], labels: list[int], max_text_tokens: int) -> tuple[list[int], list[int]]:
    """Drop text tokens from the end until at most `max_text_tokens` remain; placeholders always stay."""
    excess = sum(1 for i in ids if i >= 0) - max_text_tokens
    if excess <= 0:
        return ids, labels
    keep = [True] * len(ids)
    for k in range(len(ids) - 1, -1, -1):
        if excess == 0:
            break
        if ids[k] >= 0:
            keep[k] = False
            excess -= 1
    return [i for i, m in zip(ids, keep) if m], [lab for lab, m in zip(labels, keep) if m]


def encode_chat(turns: Sequence[tuple[str, str]], tokenizer, max_text_tokens: int) -> tuple[list[int], list[int]]:
    """Phi-3 chat: BOS, then per turn ``<|user|>\\n{input}<|end|>\\n<|assistant|>\\n{output}<|end|>\\n``
    (empty system prompt, so no system block). Returns (input_ids, labels), equal length; labels are the
    ids of each ``{output}<|end|>`` and IGNORE_INDEX everywhere else. The output is encoded on its own
    and ``<|end|>`` appended by id, so the labelled ids decode to exactly ``{output}<|end|>``.
    At most `max_text_tokens` non-placeholder ids are kept (cut from the end); placeholders are never cut."""
    bos, end = token_id(tokenizer, BOS_TOKEN), token_id(tokenizer, END_TOKEN)
    ids, labels = [bos], [IGNORE_INDEX]
    for k, (user, answer) in enumerate(turns):
        sep = "\n" if k else ""  # the "\n" that closes the previous turn, unlabelled
        prompt = tokenize(f"{sep}{USER_TOKEN}\n{user}{END_TOKEN}\n{ASSISTANT_TOKEN}\n", tokenizer)
        output = tokenize(answer, tokenizer) + [end]
        if any(i < 0 for i in output):
            raise ValueError("placeholders (<image>, <region>) belong in the user turn, not the answer")
        ids += prompt + output
        labels += [IGNORE_INDEX] * len(prompt) + output
    tail = tokenize("\n", tokenizer)
    ids, labels = ids + tail, labels + [IGNORE_INDEX] * len(tail)
    return _truncate_text(ids, labels, max_text_tokens)


def encode_prompt(user: str, tokenizer) -> list[int]:
    """The ids `encode_chat` puts before a first answer: BOS + ``<|user|>\n{user}<|end|>\n<|assistant|>\n``
    (what greedy generation continues from)."""
    return [token_id(tokenizer, BOS_TOKEN)] + tokenize(f"{USER_TOKEN}\n{user}{END_TOKEN}\n{ASSISTANT_TOKEN}\n",
                                                       tokenizer)


# --------------------------------------------------------------------------- GCG answers
_GENERATION_ENDS = (END_TOKEN, ENDOFTEXT_TOKEN, "</s>")


def _strip_lead_in(text: str) -> str:
    """Remove the closing sentence's lead-in (e.g. "And", "And the segmentation result is")."""
    stripped = text.rstrip()
    low = stripped.lower()
    for lead in sorted((x for x in T.GCG_LEAD_INS if x), key=len, reverse=True):
        if low.endswith(lead.lower()) and (len(low) == len(lead) or not low[-len(lead) - 1].isalnum()):
            return stripped[: -len(lead)]
    return text


def parse_gcg(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Invert `templates.gcg_answer`: ``"A <p>man</p>  rides a <p>red bike</p> . And <SEG>."`` ->
    ``("A man rides a red bike.", [(2, 5), (14, 22)])``.

    Everything from the first ``<SEG>`` on is dropped, then the closing sentence's lead-in (one of
    templates.GCG_LEAD_INS) if present; ``<|end|>`` and other end tokens are removed. Tags are removed
    and each ``<p> ... </p>`` becomes a (start, end) char span of the caption (whitespace inside the
    tags trimmed). One space right after ``</p>`` is dropped when the next character is not a letter or
    digit (the extra space of X-SAM's format; ``</p> rides`` keeps its space). A ``<p>`` never closed
    or a stray ``</p>`` (free generation) gives no span.
    """
    for stop in _GENERATION_ENDS:
        text = text.replace(stop, "")
    if SEG_TOKEN in text:
        text = _strip_lead_in(text[: text.index(SEG_TOKEN)])
    text = text.replace(SEG_TOKEN, "")
    caption, spans, open_at = [], [], None
    length, after_close = 0, False
    for piece in re.split(r"(<p>|</p>)", text):
        if piece == P_TOKEN:
            open_at = length
        elif piece == END_P_TOKEN:
            if open_at is not None and length > open_at:
                spans.append((open_at, length))
            open_at = None
            after_close = True
            continue
        elif piece:
            if after_close and piece[0] == " " and not piece[1:2].isalnum():
                piece = piece[1:]  # the extra space gcg_answer (X-SAM) puts after "</p>"
            caption.append(piece)
            length += len(piece)
        after_close = False
    raw = "".join(caption)
    lead = len(raw) - len(raw.lstrip())
    caption_text = raw.strip()
    out = []
    for start, end in spans:
        while start < end and raw[start].isspace():
            start += 1
        while end > start and raw[end - 1].isspace():
            end -= 1
        start, end = max(start - lead, 0), min(end - lead, len(caption_text))
        if end > start:
            out.append((start, end))
    return caption_text, out
