"""GCG metrics: GLaMM greedy-pairing mIoU, class-agnostic AP50, METEOR / CIDEr (Java), merging."""

from __future__ import annotations

import math
import pickle
import shutil
import sys

import numpy as np
import pytest

from xsam.eval import gcg
from xsam.eval.gcg import (
    GCG_MAX_NEW_TOKENS,
    GCGAccumulator,
    caption_scores,
    caption_scores_per_image,
    check_caption_tools,
    greedy_pair_miou,
    paint_label_map,
    predicted_masks,
    skip_reason,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR / PTB tokenizer need java")


def rect(y0, x0, y1, x1, shape=(40, 40)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def rect_rand(rng):
    y0, x0 = rng.integers(0, 35, 2)
    return rect(y0, x0, y0 + rng.integers(2, 12), x0 + rng.integers(2, 12))


def _glamm_style(iou):
    """The pairing as GLaMM writes it (np.delete of the paired row and column)."""
    paired = []
    while iou.size > 0 and np.max(iou) > 0:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        paired.append(iou[i, j])
        iou = np.delete(np.delete(iou, i, axis=0), j, axis=1)
    return float(np.mean(paired)) if paired else 0.0


def test_greedy_pairing_hand_cases():
    # greedy, not optimal: 0.9 is paired first, leaving 0.1 (the optimum 0.8 + 0.85 is not searched)
    assert greedy_pair_miou(np.array([[0.9, 0.8], [0.85, 0.1]])) == pytest.approx(0.5)
    # pairing stops at IoU 0: unpaired predictions / ground truths cost nothing
    assert greedy_pair_miou(np.array([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])) == pytest.approx(0.5)
    assert greedy_pair_miou(np.zeros((0, 3))) == 0.0  # no prediction
    assert greedy_pair_miou(np.zeros((2, 0))) == 0.0  # no ground truth
    assert greedy_pair_miou(np.zeros((2, 2))) == 0.0  # no overlap


def test_greedy_pairing_matches_glamm_formulation():
    rng = np.random.default_rng(0)
    for _ in range(200):
        iou = np.round(rng.random((rng.integers(0, 6), rng.integers(0, 6))), 1)  # ties on purpose
        iou[rng.random(iou.shape) < 0.3] = 0.0
        assert greedy_pair_miou(iou) == pytest.approx(_glamm_style(iou.copy()))


def test_mask_metrics_hand_case():
    a, b, c = rect(0, 0, 10, 10), rect(20, 20, 40, 40), rect(0, 20, 10, 40)
    acc = GCGAccumulator(caption_metrics=False)
    assert acc.add([b, a], [a, b]) == pytest.approx(1.0)  # order of phrases does not matter
    assert acc.add([a], [a, c]) == pytest.approx(1.0)  # one of two GT found
    r = acc.result()
    assert set(r) == {"mIoU", "AP50"}
    assert r["mIoU"] == pytest.approx(100.0)
    # 3 of 4 GT found at precision 1: 76 of COCO's 101 recall points -> 76 / 101
    assert r["AP50"] == pytest.approx(100 * 76 / 101)
    half = GCGAccumulator(caption_metrics=False)  # IoU 0.5 exactly: pairs, and counts at AP50
    half.add([rect(0, 0, 10, 20)], [rect(0, 0, 10, 10)])
    assert half.result() == {"mIoU": pytest.approx(50.0), "AP50": pytest.approx(100.0)}


def test_only_images_with_a_predicted_mask_enter_miou_and_ap50():
    a, c = rect(0, 0, 10, 10), rect(0, 20, 10, 40)
    acc = GCGAccumulator(caption_metrics=False)
    acc.add([a], [a])
    assert acc.add([], [c]) is None  # nothing predicted: left out of both (the original's imgIds)
    assert acc.add([np.zeros((40, 40), bool)], [c]) is None  # a phrase whose mask is empty: no mask either
    assert acc.result() == {"mIoU": pytest.approx(100.0), "AP50": pytest.approx(100.0)}
    assert acc.counts() == {"images": 3, "mask_images": 1, "skipped": 0}
    none = GCGAccumulator(caption_metrics=False)
    none.add([], [c])
    assert none.result()["mIoU"] == 0.0 and math.isnan(none.result()["AP50"])
    assert math.isnan(GCGAccumulator(caption_metrics=False).result()["mIoU"])


def test_phrase_masks_are_painted_into_one_label_map():
    a, b = rect(0, 0, 10, 20), rect(0, 10, 10, 30)  # overlap on cols 10..19: phrase 1 paints over phrase 0
    lm = paint_label_map(np.stack([a, b]))
    assert lm.dtype == np.int64 and set(np.unique(lm)) == {1, 2, 255}
    assert (lm[:10, :10] == 1).all() and (lm[:10, 10:30] == 2).all() and (lm[10:] == 255).all()
    masks, labels = predicted_masks(lm)
    assert labels == [2, 1] and [int(m.sum()) for m in masks] == [200, 100]  # largest first
    assert not (masks[0] & masks[1]).any()
    acc = GCGAccumulator(caption_metrics=False)  # the accumulator paints overlapping input itself
    assert acc.add([a, b], [rect(0, 0, 10, 10), b]) == pytest.approx(1.0)
    torch = pytest.importorskip("torch")
    assert np.array_equal(paint_label_map(torch.from_numpy(np.stack([a, b]))).numpy(), lm)


def test_skip_rule_and_generation_length():
    assert GCG_MAX_NEW_TOKENS == 512
    assert skip_reason("A <p>man</p> on a <p>horse</p>. And <SEG>.<|end|>") is None
    assert skip_reason("A man on a horse.<|end|> <SEG>") == "no <SEG>"  # after the end token
    assert skip_reason("A <p>man</p>. <SEG> <SEG>.") == "several <SEG>"
    assert skip_reason("A man. <SEG>.") == "no phrase"
    assert skip_reason("A </p>man<p>. <SEG>.") == "no phrase"  # no <p> ... </p> pair
    assert skip_reason("A <p>man. <SEG>.") == "no phrase"  # never closed
    seg, p, end_p, end = 7, 5, 6, 2
    ids = {"seg_id": seg, "p_id": p, "end_p_id": end_p}
    assert skip_reason([11, p, 12, end_p, 13, seg, end], **ids) is None
    assert skip_reason([11, p, 12, end_p, 13, seg], **ids) == "no <SEG>"  # the last token is not scanned
    assert skip_reason([11, p, 12, 13, seg, end], **ids) == "no phrase"
    with pytest.raises(ValueError):
        skip_reason([1, 2], seg_id=seg, p_id=p)
    acc = GCGAccumulator(caption_metrics=False)
    acc.skip("no <SEG>")
    acc.skip("no <SEG>")
    other = GCGAccumulator(caption_metrics=False)
    other.skip("no phrase")
    merged = acc + other
    assert merged.counts() == {"images": 0, "mask_images": 0, "skipped": 3, "skipped/no <SEG>": 2,
                               "skipped/no phrase": 1}
    assert len(merged) == 0 and merged.result()["mIoU"] == 0.0  # skipped samples score nothing
    assert math.isnan(merged.result()["AP50"])


def test_empty_ground_truth_image():
    acc = GCGAccumulator(caption_metrics=False)
    acc.add([rect(0, 0, 5, 5)], [])  # GLaMM: no pair -> 0.0; a false positive for AP
    r = acc.result()
    assert r["mIoU"] == 0.0 and math.isnan(r["AP50"])  # no GT in the split at all: AP undefined


def test_merge_equals_single_pass():
    rng = np.random.default_rng(3)
    images = []
    for _ in range(6):
        gts = [rect_rand(rng) for _ in range(3)]
        preds = [rect_rand(rng) for _ in range(rng.integers(0, 4))]
        images.append((preds, gts, "a caption", ["a reference"]))
    whole, a, b = GCGAccumulator(), GCGAccumulator(), GCGAccumulator()
    for i, im in enumerate(images):
        whole.add(*im)
        (a if i < 2 else b).add(*im)
    merged = pickle.loads(pickle.dumps(a)) + b  # what Ray does between tasks
    assert merged.image_mious == whole.image_mious and merged.references == whole.references
    mask_only = GCGAccumulator(caption_metrics=False)
    for im in images:
        mask_only.add(*im)
    merged.caption_metrics = False  # the mask metrics, without starting a JVM
    assert merged.result() == mask_only.result()


def test_missing_tools_raise_clear_errors(monkeypatch):
    monkeypatch.setattr(gcg.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="[Jj]ava"):
        check_caption_tools()
    monkeypatch.setitem(sys.modules, "pycocoevalcap.meteor.meteor", None)
    with pytest.raises(ImportError, match="pycocoevalcap"):
        caption_scores(["a dog"], [["a dog"]])
    acc = GCGAccumulator()
    acc.add([], [], "a dog", "a dog")
    with pytest.raises(ImportError, match="pycocoevalcap"):
        acc.result()


def test_result_computes_captions_once_over_the_merged_split(monkeypatch):
    calls = []

    def fake(predictions, references):
        calls.append((list(predictions), [list(r) for r in references]))
        return {"METEOR": 12.5, "CIDEr": 40.0}

    monkeypatch.setattr(gcg, "caption_scores", fake)
    a, b = GCGAccumulator(), GCGAccumulator()
    a.add([rect(0, 0, 5, 5)], [rect(0, 0, 5, 5)], "first", "ref one")
    b.add([], [rect(0, 0, 5, 5)], "second", ["ref two", "ref two bis"])  # no mask: captions only
    r = (a + b).result()
    assert calls == [(["first", "second"], [["ref one"], ["ref two", "ref two bis"]])]
    assert r == {"mIoU": pytest.approx(100.0), "AP50": pytest.approx(100.0), "METEOR": 12.5, "CIDEr": 40.0}
    with pytest.raises(ValueError):
        GCGAccumulator().add([], [], "a caption")  # references are required with caption metrics


@needs_java
def test_caption_metrics_identical_vs_unrelated():
    """One JVM run (METEOR start-up dominates): 5 identical and 5 unrelated captions."""
    refs = ["A man riding a brown horse on the beach.",
            "Two dogs play with a red ball in the park.",
            "A plate of pasta with tomato sauce on a wooden table.",
            "A woman holding an umbrella in the rain, next to a bus.",
            "Snow covers the mountains behind a small lake."]
    unrelated = ["computers are arranged near printers", "an airplane parked at the gate",
                 "three zebras graze in tall grass", "a clock tower against blue sky",
                 "laptop keyboard and mouse"]
    corpus, per_image = caption_scores_per_image(refs + unrelated, [[r] for r in refs + refs])
    meteor, cider = per_image["METEOR"], per_image["CIDEr"]
    assert meteor.shape == cider.shape == (10,)
    assert np.all(meteor[:5] > 99.0)  # an identical caption gets METEOR's maximum, 1 (x100)
    assert np.all(meteor[5:] < 30.0)
    assert cider[:5].min() > cider[5:].max() + 100.0
    assert corpus["CIDEr"] == pytest.approx(cider.mean())
    assert 30.0 < corpus["METEOR"] < 99.0
