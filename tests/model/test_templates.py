import re

import pytest

from xsam.model import templates as T
from xsam.model.tokenizer import parse_gcg


@pytest.mark.parametrize("raw, clean", [
    ("sky-other-merged", "sky"),
    ("playingfield", "playingfield"),
    ("wall-other-merged", "wall"),
    ("door-stuff", "door"),
    ("tv", "tv"),
    ("wall-brick", "wall brick"),
    ("floor-wood", "floor wood"),
    ("window-blind", "window blind"),
    ("building-other-merged", "building"),
    ("food-other-merged", "food"),
    ("water-other", "water"),
    ("mirror-stuff", "mirror"),
    ("paper-merged", "paper"),
    ("dining table", "dining table"),
    ("traffic light", "traffic light"),
    ("Tree-Merged", "tree"),
])
def test_clean_category_name_coco_panoptic(raw, clean):
    assert T.clean_category_name(raw) == clean


def test_template_counts_and_placeholders():
    """The original's lists (AAAI26_Archive map_fns): sizes, placeholders, spot checks word for word."""
    assert len(T.GENERIC_QUESTIONS) == 6 and len(T.REFERRING_QUESTIONS) == 10 and len(T.GCG_QUESTIONS) == 6
    assert len(T.VGD_QUESTIONS) == 6 and len(T.REASONING_QUESTIONS) == len(T.REASONING_SHORT_QUESTIONS) == 5
    assert len(T.REASONING_EXPLAIN_QUESTIONS) == len(T.REASONING_EXPLAIN_ANSWERS) == 5
    assert T.SEG_ANSWERS == ("<SEG>.", "It is <SEG>.", "Sure, <SEG>.", "Sure, it is <SEG>.",
                             "Sure, the segmentation result is <SEG>.")
    assert T.REFERRING_ANSWERS[-1] == "Sure, the segmentation mask is <SEG>."
    assert T.GCG_ANSWER_SUFFIXES == ("<SEG>.", "And <SEG>.", "The segmentation mask is <SEG>.",
                                     "And the segmentation mask is <SEG>.")
    assert T.GENERIC_QUESTIONS[0] == ("Can you segment the image based on the following categories: {categories}? "
                                      "Please output the segmentation masks.")
    assert T.REFERRING_QUESTIONS[0] == "Please identify and segment the <p>{phrase}</p> in this image."
    assert T.GCG_QUESTIONS[1].startswith("Can you provide a brief description of the this image?")  # sic
    assert T.REFERRING_QUESTIONS[6] == T.REFERRING_QUESTIONS[9]  # the original lists it twice (2/10 weight)
    assert all(q.count("{categories}") == 1 for q in T.GENERIC_QUESTIONS)
    assert all(q.count("{regions}") == 1 for q in T.VGD_QUESTIONS)
    assert all(q.count("<p>{phrase}</p>") == 1 for q in T.REFERRING_QUESTIONS)
    assert all(q.count("<p>{query}</p>") == 1 for q in T.REASONING_QUESTIONS + T.REASONING_SHORT_QUESTIONS
               + T.REASONING_EXPLAIN_QUESTIONS)
    answers = T.SEG_ANSWERS + T.REFERRING_ANSWERS + T.REASONING_EXPLAIN_ANSWERS + T.GCG_ANSWER_SUFFIXES
    assert all(a.count("<SEG>") == 1 for a in answers)
    assert all("<SEG>" not in q and "<image>" not in q for q in T.GCG_QUESTIONS + T.GENERIC_QUESTIONS)
    assert len(set(T.GENERIC_QUESTIONS)) == 6 and len(set(T.VGD_QUESTIONS)) == 6


def test_generic_question_lists_clean_names_in_order():
    names = ["person", "sky-other-merged", "wall-brick", "door-stuff"]
    for i in range(len(T.GENERIC_QUESTIONS)):
        q = T.generic_question(names, i)
        assert re.findall(r"<p>(.*?)</p>", q) == ["person", "sky", "wall brick", "door"]
        assert "{" not in q
    assert T.generic_question(["a-b"], 0, clean=False).count("<p>a-b</p>") == 1
    assert T.category_list(["person", "tree-merged"]) == "<p>person</p>, <p>tree</p>"
    with pytest.raises(ValueError):
        T.generic_question([], 0)
    with pytest.raises(ValueError):
        T.generic_question(["person"], len(T.GENERIC_QUESTIONS))
    with pytest.raises(ValueError):
        T.seg_answer(-1)


def test_referring_and_reasoning():
    for i in range(len(T.REFERRING_QUESTIONS)):  # referring phrases are lowercased, as the original
        assert re.findall(r"<p>(.*?)</p>", T.referring_question(" The Man on the left ", i)) == ["the man on the left"]
    sentence = T.reasoning_question("What can hold water?", 0)
    assert sentence == "<p>What can hold water?</p> Please output the corresponding segmentation mask."
    assert T.reasoning_question("the Cup", 3, is_sentence=False) == (
        "What is <p>the Cup</p> in this image? Please output the corresponding segmentation mask.")
    explain = T.reasoning_question("What can hold water?", 0, explain=True)
    assert explain.startswith("<p>What can hold water?</p> Please explain why")
    assert T.reasoning_answer(3, "The cup is hollow.") == "The cup is hollow. And it is <SEG>."
    assert T.reasoning_answer(0, "The cup is hollow.") == "The cup is hollow. <SEG>."
    assert T.reasoning_answer(4) == "Sure, the segmentation mask is <SEG>."


def test_image_and_region_prompts():
    assert T.with_image("Hi?") == "<image>\nHi?"
    q = T.vgd_question(3, 0)
    assert q.count("<p><region></p>") == 3 and q.count("<region>") == 3
    assert T.interactive_question(0).count("<p><region></p>") == 1
    with pytest.raises(ValueError):
        T.vgd_question(0, 0)


@pytest.mark.parametrize("index", range(len(T.GCG_ANSWER_SUFFIXES)))
def test_gcg_answer_round_trip(index):
    caption = "A man rides a red bike."
    spans = [(2, 5), (14, 22)]
    answer = T.gcg_answer(caption, spans, index)
    assert answer.startswith("A <p>man</p>  rides a <p>red bike</p> .")  # X-SAM: one extra space after </p>
    assert answer.endswith(T.GCG_ANSWER_SUFFIXES[index])
    assert parse_gcg(answer) == (caption, spans)
    assert parse_gcg(answer + "<|end|>") == (caption, spans)


def test_gcg_answer_rejects_bad_spans():
    with pytest.raises(ValueError):
        T.gcg_answer("A man rides a red bike.", [(14, 22), (2, 5)], 0)  # not in caption order
    with pytest.raises(ValueError):
        T.gcg_answer("A man rides a red bike.", [(2, 8), (6, 10)], 0)  # overlapping
    with pytest.raises(ValueError):
        T.gcg_answer("short", [(0, 9)], 0)
    assert T.gcg_answer("", [], 1) == "And <SEG>."
