"""Prompt templates of every X-SAM task (reference section 4), as data, and their formatters.

The templates are plain strings. A formatter takes the template INDEX: the random choice of a
template (per read, reference section 2) is the caller's, made with the caller's own RNG, e.g.
``generic_question(names, rng.integers(len(GENERIC_QUESTIONS)))``. Evaluation fixes the index.

Formats (what the LLM sees between ``<|user|>\\n`` and ``<|end|>``; see `tokenizer.encode_chat`):

- generic / open-vocab:  question from GENERIC_QUESTIONS with ``{categories}`` =
  ``<p>person</p>, <p>sky</p>, ...`` (names cleaned by `clean_category_name`); answer from SEG_ANSWERS.
- referring: question from REFERRING_QUESTIONS (``<p>{phrase}</p>`` inside); answer from SEG_ANSWERS;
  one turn per object (multi-turn), one ``<SEG>`` per answer.
- reasoning: sentence queries -> REASONING_QUESTIONS (``<p>{query}</p> Please output ...``), phrase
  queries -> REFERRING_QUESTIONS; with an explanation: REASONING_EXPLAIN_QUESTIONS answered
  ``{explanation} And it is <SEG>.`` (REASONING_EXPLAIN_ANSWER).
- GCG: question from GCG_QUESTIONS; answer = the caption with each grounded span wrapped as
  ``<p>span</p>`` FOLLOWED BY ONE EXTRA SPACE (X-SAM's `tag_caption`: ``f"<p>{span}</p> {rest}"``),
  one space, then a closing sentence from GCG_ANSWER_SUFFIXES (``<SEG>.``, ``And <SEG>.``, ...).
  Example: ``A <p>man</p>  rides a <p>red bike</p> . And <SEG>.`` Phrase i is mask i, in caption
  order. `tokenizer.parse_gcg` inverts this format.
- VGD / interactive: question from VGD_QUESTIONS with ``{regions}`` = ``<p><region></p>, <p><region></p>``
  (one per prompt, interactive: one); answer from SEG_ANSWERS.
- The image: the first user turn of a sample starts with IMAGE_PREFIX (`with_image`).
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PREFIX = "<image>\n"
REGION_SPAN = "<p><region></p>"

GENERIC_QUESTIONS: tuple[str, ...] = (
    ("Can you segment the image based on the following categories: {categories}? "
     "Please output the segmentation masks."),
    "Please segment the image according to these categories: {categories}. Please output the segmentation masks.",
    ("Could you find the following categories in this image and segment them: {categories}? "
     "Please output the segmentation masks."),
    ("Segment every region of the image that belongs to one of these categories: {categories}. "
     "Please output the segmentation masks."),
    "Which regions of this image show {categories}? Please output the segmentation masks.",
    "Given the categories {categories}, can you segment this image? Please output the segmentation masks.",
)

# Answers of every teacher-forced segmentation task (generic, referring, reasoning, VGD, interactive).
SEG_ANSWERS: tuple[str, ...] = (
    "<SEG>.",
    "It is <SEG>.",
    "Sure, <SEG>.",
    "Sure, it is <SEG>.",
    "Sure, the segmentation result is <SEG>.",
)

REFERRING_QUESTIONS: tuple[str, ...] = (
    "Please segment <p>{phrase}</p> in this image.",
    "Can you segment <p>{phrase}</p> in this image?",
    "What is <p>{phrase}</p> in this image? Please output the segmentation mask.",
    "Where is <p>{phrase}</p> in this image? Please output the segmentation mask.",
    "Could you provide the segmentation mask of <p>{phrase}</p> in this image?",
    "Please output the segmentation mask of <p>{phrase}</p> in this image.",
    "Segment <p>{phrase}</p> in the image.",
    "Can you find <p>{phrase}</p> in this image and output its segmentation mask?",
    "Please identify <p>{phrase}</p> in this image and segment it.",
    "Which part of this image is <p>{phrase}</p>? Please respond with the segmentation mask.",
)

REASONING_QUESTIONS: tuple[str, ...] = (
    "<p>{query}</p> Please output the corresponding segmentation mask.",
)
REASONING_EXPLAIN_QUESTIONS: tuple[str, ...] = (
    "<p>{query}</p> Please explain why and output the corresponding segmentation mask.",
)
REASONING_EXPLAIN_ANSWER = "{explanation} And it is <SEG>."

GCG_QUESTIONS: tuple[str, ...] = (
    ("Can you provide a brief description of this image? "
     "Please output interleaved segmentation masks for the corresponding phrases."),
    ("Please briefly describe the contents of this image. "
     "Please output interleaved segmentation masks for the corresponding phrases."),
    ("Could you give a short caption of this image? "
     "Please output interleaved segmentation masks for the corresponding phrases."),
    ("What is happening in this image? Please answer briefly and output interleaved segmentation masks "
     "for the corresponding phrases."),
    ("Describe this image in one or two sentences. "
     "Please output interleaved segmentation masks for the corresponding phrases."),
    ("Can you summarise this image in a few words? "
     "Please output interleaved segmentation masks for the corresponding phrases."),
)
# The sentence closing a GCG answer; the text before "<SEG>" is the lead-in that parse_gcg removes.
GCG_ANSWER_SUFFIXES: tuple[str, ...] = (
    "<SEG>.",
    "And <SEG>.",
    "And the segmentation result is <SEG>.",
    "And the segmentation masks are <SEG>.",
)
GCG_LEAD_INS: tuple[str, ...] = tuple(s.split("<SEG>")[0].strip() for s in GCG_ANSWER_SUFFIXES)

VGD_QUESTIONS: tuple[str, ...] = (
    ("Can you segment the image based on the following regions: {regions}? "
     "Please output the corresponding segmentation mask."),
)
INTERACTIVE_QUESTIONS = VGD_QUESTIONS

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
    return _pick(REFERRING_QUESTIONS, index, "referring").format(phrase=phrase.strip())


def reasoning_question(query: str, index: int, is_sentence: bool = True, explain: bool = False) -> str:
    """ReasonSeg question. Phrase queries (``is_sentence=False``) use the referring templates; the
    explanation branch (drawn by the caller, p=0.5 when an explanation exists) asks to explain."""
    query = query.strip()
    if explain:
        return _pick(REASONING_EXPLAIN_QUESTIONS, index, "reasoning-explain").format(query=query)
    if is_sentence:
        return _pick(REASONING_QUESTIONS, index, "reasoning").format(query=query)
    return referring_question(query, index)


def reasoning_answer(index: int, explanation: str | None = None) -> str:
    """``{explanation} And it is <SEG>.`` when an explanation is given, else a SEG_ANSWERS entry."""
    if explanation is not None:
        return REASONING_EXPLAIN_ANSWER.format(explanation=explanation.strip())
    return seg_answer(index)


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
