"""Prompt templates of every X-SAM task, as data, and their formatters: ONE module that training
(`xsam.train.formatting`), evaluation (`xsam.eval.benchmark`) and predict (`xsam.model.predict`) share.

The lists are the original X-SAM's (branch AAAI26_Archive, xsam/dataset/map_fns/dataset_map_fns/*_map_fn.py),
word for word: they are protocol data the published model was trained on. A formatter takes the template
INDEX: the random choice of a template (per read, per turn) is the caller's, made with the caller's own
RNG, e.g. ``generic_question(names, rng.integers(len(GENERIC_QUESTIONS)))``. Evaluation and predict fix
index 0.

Formats (what the LLM sees between ``<|user|>\\n`` and ``<|end|>``; see `tokenizer.encode_chat`):

- generic / open-vocab:  question from GENERIC_QUESTIONS with ``{categories}`` =
  ``<p>person</p>, <p>sky</p>, ...`` (names cleaned by `clean_category_name`); answer from SEG_ANSWERS.
- referring: question from REFERRING_QUESTIONS with the phrase lowercased inside ``<p>...</p>``; answer
  from REFERRING_ANSWERS; one turn per object (multi-turn), one ``<SEG>`` per answer.
- reasoning: sentence queries -> REASONING_QUESTIONS (``<p>{query}</p> Please output ...``), phrase
  queries -> REASONING_SHORT_QUESTIONS, answers from REFERRING_ANSWERS; the explanation branch asks
  REASONING_EXPLAIN_QUESTIONS and is answered ``"{explanation} " + REASONING_EXPLAIN_ANSWERS[i]``.
- GCG: question from GCG_QUESTIONS; answer = the caption with each grounded span wrapped as
  ``<p>span</p>`` FOLLOWED BY ONE EXTRA SPACE (X-SAM's `tag_caption`: ``f"<p>{span}</p> {rest}"``),
  one space, then a closing sentence from GCG_ANSWER_SUFFIXES (``<SEG>.``, ``And <SEG>.``, ...).
  Example: ``a <p>man</p>  rides a <p>red bike</p> . And <SEG>.`` Phrase i is mask i, in caption
  order. `tokenizer.parse_gcg` inverts this format.
- VGD / interactive: question from VGD_QUESTIONS with ``{regions}`` = ``<p><region></p>, <p><region></p>``
  (one per prompt, interactive: one); answer from SEG_ANSWERS.
- The image: the first user turn of a sample starts with IMAGE_PREFIX (`with_image`).

Not carried over: the original's captioned generic variant (MASK_CAPTION_*: used only with a caption file,
which none of the paper's configs set) and the "cls" / "all" condition formats (the paper uses "phrase").
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PREFIX = "<image>\n"
REGION_SPAN = "<p><region></p>"

# The question and answer lists below are the original's, word for word (typos included: they are the
# prompts the published model was trained on). Where the original formats a phrase as ``<p>{}</p>`` before
# placing it, the template here holds the tags itself.

# genseg_map_fn.py MASK_QUESTION_LIST (generic, semantic, instance, open-vocabulary)
GENERIC_QUESTIONS: tuple[str, ...] = (
    ("Can you segment the image based on the following categories: {categories}? "
    "Please output the segmentation masks."),
    ("Can you generate segmentation masks for this image based on the specified categories: {categories}? "
    "Please generate the segmentation masks."),
    ("Can you provide segmentation masks for this image based on these categories: {categories}? "
    "Please provide the segmentation masks."),
    ("Could you create segmentation masks for this image according to the specified categories: {categories}? "
    "Please create the segmentation masks."),
    ("Could you output segmentation masks for this image that highlight the following categories: {categories}? "
    "Please output the segmentation masks."),
    ("Could you provide segmentation masks for this image according to the specified categories: {categories}? "
    "Please respond with the segmentation masks."),
)

# genseg / vgdseg MASK_ANSWER_LIST / ANSWER_LIST: generic, VGD and interactive answers
SEG_ANSWERS: tuple[str, ...] = (
    "<SEG>.",
    "It is <SEG>.",
    "Sure, <SEG>.",
    "Sure, it is <SEG>.",
    "Sure, the segmentation result is <SEG>.",
)

# refseg_map_fn.py SEG_QUESTIONS (the phrase is lowercased, as the original does)
REFERRING_QUESTIONS: tuple[str, ...] = (
    "Please identify and segment the <p>{phrase}</p> in this image.",
    "Please segment <p>{phrase}</p> in this image.",
    "What is <p>{phrase}</p> in this image? Please output the corresponding segmentation mask.",
    "Can you segment <p>{phrase}</p> in this image? Please generate the segmentation mask.",
    ("Could you provide a segmentation mask for the <p>{phrase}</p> in this image? "
    "Please provide the segmentation mask."),
    "Where is the <p>{phrase}</p> in this picture? Please output the segmentation masks.",
    ("Can you highlight the <p>{phrase}</p> in this image with a segmentation mask? "
    "Please output the segmentation mask."),
    ("Could you provide a segmentation mask for the <p>{phrase}</p> in this image? "
    "Please respond with the segmentation mask."),
    "Where is the <p>{phrase}</p> in this picture? Please output the corresponding segmentation mask.",
    ("Can you highlight the <p>{phrase}</p> in this image with a segmentation mask? "
    "Please output the segmentation mask."),
)
# refseg / reaseg ANSWER_LIST: referring and reasoning answers
REFERRING_ANSWERS: tuple[str, ...] = (
    "<SEG>.",
    "It is <SEG>.",
    "Sure, <SEG>.",
    "Sure, it is <SEG>.",
    "Sure, the segmentation mask is <SEG>.",
)

# reaseg_map_fn.py: SHORT_QUESTIONS for phrase queries, LONG_QUESTIONS for sentence queries,
# EXPLANATORY_QUESTIONS for the explanation branch (answered "{explanation} " + REASONING_EXPLAIN_ANSWERS)
REASONING_SHORT_QUESTIONS: tuple[str, ...] = (
    "Can you segment <p>{query}</p> in this image? Please output the segmentation mask.",
    "Can you give the segmentation mask for <p>{query}</p> in this image? Please respond with the segmentation mask.",
    ("Can you highlight <p>{query}</p> and output the corresponding segmentation mask? "
    "Please provide the segmentation mask."),
    "What is <p>{query}</p> in this image? Please output the corresponding segmentation mask.",
    "What is <p>{query}</p> in this image? Please generate a segmentation mask for this image.",
)
REASONING_QUESTIONS: tuple[str, ...] = (
    "<p>{query}</p> Please output the corresponding segmentation mask.",
    "<p>{query}</p> Please generate a segmentation mask for this image.",
    "<p>{query}</p> Please extract the segmentation mask.",
    "<p>{query}</p> Please return the segmentation predictions as masks.",
    "<p>{query}</p> Please segment the image.",
)
REASONING_EXPLAIN_QUESTIONS: tuple[str, ...] = (
    "<p>{query}</p> Please explain why and output the corresponding segmentation mask.",
    "<p>{query}</p> Please explain the reason and output the corresponding segmentation mask.",
    "<p>{query}</p> Please give some explanation and output the corresponding segmentation mask.",
    "<p>{query}</p> Please explain the reason and output the corresponding segmentation mask.",
    "<p>{query}</p> Please give detailed explanation and output the corresponding segmentation mask.",
)
REASONING_EXPLAIN_ANSWERS: tuple[str, ...] = (
    "<SEG>.",
    "It is <SEG>.",
    "And <SEG>.",
    "And it is <SEG>.",
    "And the segmentation mask is <SEG>.",
)

# gcgseg_map_fn.py QUESTION_LIST / ANSWER_LIST
GCG_QUESTIONS: tuple[str, ...] = (
    ("Could you please give me a brief description of the image? "
    "Please respond with interleaved segmentation masks for the corresponding parts of the answer."),
    ("Can you provide a brief description of the this image? "
    "Please output interleaved segmentation masks for the corresponding phrases."),
    ("Please briefly describe the contents of the image. "
    "Please respond with interleaved segmentation masks for the corresponding parts of the answer."),
    ("Could you give a brief explanation of what can be found within this picture? "
    "Please output interleaved segmentation masks for the corresponding phrases."),
    ("Could you give me an brief explanation of this picture? "
    "Please respond with interleaved segmentation masks for the corresponding phrases."),
    ("Could you provide me with a briefly analysis of this photo? "
    "Please output interleaved segmentation masks for the corresponding parts of the answer."),
)
# The sentence closing a GCG answer; the text before "<SEG>" is the lead-in that parse_gcg removes.
GCG_ANSWER_SUFFIXES: tuple[str, ...] = (
    "<SEG>.",
    "And <SEG>.",
    "The segmentation mask is <SEG>.",
    "And the segmentation mask is <SEG>.",
)
GCG_LEAD_INS: tuple[str, ...] = tuple(s.split("<SEG>")[0].strip() for s in GCG_ANSWER_SUFFIXES)

# vgdseg_map_fn.py QUESTION_LIST (interactive segmentation uses the same list, one region)
VGD_QUESTIONS: tuple[str, ...] = (
    ("Can you segment the image based on the following regions: {regions}? "
    "Please output the corresponding segmentation mask."),
    ("Can you generate segmentation masks for this image based on the specified regions: {regions}? "
    "Please generate the segmentation masks."),
    ("Can you provide segmentation masks for this image based on these regions: {regions}? "
    "Please provide the segmentation masks."),
    ("Could you create segmentation masks for this image according to the specified regions: {regions}? "
    "Please create the segmentation masks."),
    ("Could you output segmentation masks for this image that highlight the following regions: {regions}? "
    "Please output the segmentation masks."),
    ("Could you provide segmentation masks for this image according to the specified regions: {regions}? "
    "Please respond with the segmentation masks."),
)
INTERACTIVE_QUESTIONS = VGD_QUESTIONS

ALL_TEMPLATES: tuple[str, ...] = (GENERIC_QUESTIONS + SEG_ANSWERS + REFERRING_QUESTIONS + REFERRING_ANSWERS
                                  + REASONING_SHORT_QUESTIONS + REASONING_QUESTIONS + REASONING_EXPLAIN_QUESTIONS
                                  + REASONING_EXPLAIN_ANSWERS + GCG_QUESTIONS + GCG_ANSWER_SUFFIXES + VGD_QUESTIONS)

_NAME_SUFFIXES = ("-merged", "-other", "-stuff")


def clean_category_name(name: str) -> str:
    """COCO-panoptic style name -> prompt name: lowercase, trailing ``-merged`` / ``-other`` /
    ``-stuff`` stripped (repeatedly: "sky-other-merged" -> "sky"), remaining hyphens -> spaces
    ("wall-brick" -> "wall brick"), whitespace collapsed."""
    out = name.strip().lower()
    stripped = True
    while stripped:
        stripped = False
        for suffix in _NAME_SUFFIXES:
            if out.endswith(suffix) and len(out) > len(suffix):
                out = out[: -len(suffix)]
                stripped = True
    return " ".join(out.replace("-", " ").split())


def _pick(templates: Sequence[str], index: int, what: str) -> str:
    if not 0 <= int(index) < len(templates):
        raise ValueError(f"{what} template index {index} out of range [0, {len(templates)})")
    return templates[int(index)]


def with_image(question: str) -> str:
    """Prefix the first user turn of a sample with the image placeholder."""
    return IMAGE_PREFIX + question


def category_list(names: Sequence[str], clean: bool = True) -> str:
    """``["person", "sky-other-merged"]`` -> ``"<p>person</p>, <p>sky</p>"`` (in the given order)."""
    if not names:
        raise ValueError("a category prompt needs at least one category")
    return ", ".join(f"<p>{clean_category_name(n) if clean else n}</p>" for n in names)


def generic_question(names: Sequence[str], index: int, clean: bool = True) -> str:
    """Generic / open-vocabulary question listing `names` (condition i = the i-th name)."""
    return _pick(GENERIC_QUESTIONS, index, "generic").format(categories=category_list(names, clean))


def seg_answer(index: int) -> str:
    """A teacher-forced segmentation answer with exactly one ``<SEG>``."""
    return _pick(SEG_ANSWERS, index, "answer")


def referring_question(phrase: str, index: int) -> str:
    """Referring question for `phrase`, lowercased and stripped as the original's refseg formatting."""
    return _pick(REFERRING_QUESTIONS, index, "referring").format(phrase=phrase.strip().lower())


def referring_answer(index: int) -> str:
    """A referring / reasoning answer with exactly one ``<SEG>``."""
    return _pick(REFERRING_ANSWERS, index, "referring answer")


def reasoning_question(query: str, index: int, is_sentence: bool = True, explain: bool = False) -> str:
    """ReasonSeg question: REASONING_QUESTIONS for a sentence query, REASONING_SHORT_QUESTIONS for a phrase
    query, REASONING_EXPLAIN_QUESTIONS for the explanation branch (drawn per turn by the caller). The query
    keeps its case (the original lowercases referring phrases, not reasoning queries)."""
    query = query.strip()
    if explain:
        return _pick(REASONING_EXPLAIN_QUESTIONS, index, "reasoning-explain").format(query=query)
    if is_sentence:
        return _pick(REASONING_QUESTIONS, index, "reasoning").format(query=query)
    return _pick(REASONING_SHORT_QUESTIONS, index, "reasoning-short").format(query=query)


def reasoning_answer(index: int, explanation: str | None = None) -> str:
    """``"{explanation} " + REASONING_EXPLAIN_ANSWERS[index]`` with an explanation, else REFERRING_ANSWERS[index]."""
    if explanation is not None:
        return f"{explanation.strip()} {_pick(REASONING_EXPLAIN_ANSWERS, index, 'reasoning-explain answer')}"
    return referring_answer(index)


def gcg_question(index: int) -> str:
    return _pick(GCG_QUESTIONS, index, "gcg")


def gcg_answer(caption: str, phrases: Sequence[tuple[int, int]], index: int) -> str:
    """Wrap each char span ``(start, end)`` of `caption` as ``<p>...</p>`` plus one space (as X-SAM's
    `tag_caption`) and append the closing sentence GCG_ANSWER_SUFFIXES[index]. Spans must be sorted,
    non-empty and non-overlapping (the caller sorts them and its masks with them: phrase i <-> mask i)."""
    suffix = _pick(GCG_ANSWER_SUFFIXES, index, "gcg answer")
    parts, prev = [], 0
    for start, end in phrases:
        if not prev <= start < end <= len(caption):
            raise ValueError(f"GCG spans must be sorted, non-empty, non-overlapping and inside the caption: "
                             f"{list(phrases)} for a caption of {len(caption)} chars")
        parts += [caption[prev:start], "<p>", caption[start:end], "</p> "]
        prev = end
    parts.append(caption[prev:])
    body = "".join(parts).rstrip()
    return f"{body} {suffix}" if body else suffix


def region_list(num_regions: int) -> str:
    if num_regions < 1:
        raise ValueError("a region prompt needs at least one region")
    return ", ".join([REGION_SPAN] * num_regions)


def vgd_question(num_regions: int, index: int) -> str:
    """VGD question with `num_regions` ``<p><region></p>`` spans (region i = the i-th ``<region>``)."""
    return _pick(VGD_QUESTIONS, index, "vgd").format(regions=region_list(num_regions))


def interactive_question(index: int) -> str:
    """Interactive segmentation: one prompted region."""
    return _pick(INTERACTIVE_QUESTIONS, index, "interactive").format(regions=region_list(1))
