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
    assert len(T.GENERIC_QUESTIONS) == 6 and len(T.REFERRING_QUESTIONS) == 10 and len(T.GCG_QUESTIONS) == 6
    assert T.SEG_ANSWERS == ("<SEG>.", "It is <SEG>.", "Sure, <SEG>.", "Sure, it is <SEG>.",
                             "Sure, the segmentation result is <SEG>.")
    assert all(q.count("{categories}") == 1 for q in T.GENERIC_QUESTIONS)
    assert all(q.count("<p>{phrase}</p>") == 1 for q in T.REFERRING_QUESTIONS)
    assert all(a.count("<SEG>") == 1 for a in T.SEG_ANSWERS + T.GCG_ANSWER_SUFFIXES)
    assert all("<SEG>" not in q and "<image>" not in q for q in T.GCG_QUESTIONS + T.GENERIC_QUESTIONS)
    assert len(set(T.GENERIC_QUESTIONS)) == 6 and len(set(T.REFERRING_QUESTIONS)) == 10


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
    for i in range(len(T.REFERRING_QUESTIONS)):
        assert re.findall(r"<p>(.*?)</p>", T.referring_question(" the man on the left ", i)) == ["the man on the left"]
    sentence = T.reasoning_question("What can hold water?", 0)
    assert sentence == "<p>What can hold water?</p> Please output the corresponding segmentation mask."
    assert T.reasoning_question("the cup", 3, is_sentence=False) == T.referring_question("the cup", 3)
    explain = T.reasoning_question("What can hold water?", 0, explain=True)
    assert explain.startswith("<p>What can hold water?</p> Please explain why")
    assert T.reasoning_answer(0, "The cup is hollow.") == "The cup is hollow. And it is <SEG>."
    assert T.reasoning_answer(1) == "It is <SEG>."


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
