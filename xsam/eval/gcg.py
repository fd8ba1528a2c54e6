"""Grounded conversation generation (GCG) metrics, GLaMM protocol, as a mergeable accumulator.

Per image the model gives a caption and one mask per grounded phrase; the ground truth is the
reference caption(s) and one mask per ground-truth phrase. Four numbers, in percent:

mIoU  -- GLaMM's ``compute_miou`` (groundingLMM eval/gcg/evaluate.py), reproduced exactly:
         build the IoU matrix predicted x ground-truth masks; repeatedly take the pair with the
         highest IoU (first in row-major order on ties), record its IoU and remove that prediction
         and that ground truth; stop when nothing is left or the best remaining IoU is 0. The image's
         score is the mean of the recorded IoUs, and 0.0 when nothing was paired (no prediction, no
         ground truth, or no overlap). Unpaired predictions and unpaired ground truths are NOT
         penalised beyond that (GLaMM does not count them). mIoU = mean of the image scores over the
         images with a predicted mask (see below). Kept as GLaMM defines it so that numbers compare with the paper tables
         (X-SAM 69.4, GLaMM 65.8); a mask pair with an empty union has IoU 0.
AP50  -- class-agnostic COCO segm AP at IoU 0.5 (`xsam.eval.instance` with ``class_agnostic=True``),
         every prediction scored 1.0 as GLaMM does, unless the caller gives scores.
METEOR, CIDEr -- pycocoevalcap 1.2, as ``COCOEvalCap`` computes them: captions lower-cased and
         tokenised by the Stanford PTB tokenizer (punctuation dropped), then ``Meteor`` (corpus-level
         score of meteor-1.5) and ``Cider`` (CIDEr-D, document frequencies from the split's
         references). Both reported x100. They need the whole split, so they run once, in
         `result()`; METEOR and the tokenizer start a JVM (``java`` on PATH).

The original X-SAM protocol around these numbers (xsam/xsam/tools/eval.py, xsam/xsam/model/xsam.py
`predict`, gcgseg_process_fn.py, gcgseg_evaluator.py), which this module owns:

- generation: greedy, at most GCG_MAX_NEW_TOKENS = 512 new tokens (xsam/utils/config.py);
- a sample whose generation does not hold exactly one ``<SEG>`` and at least one ``<p> ... </p>``
  phrase yields no segmentation output and is SKIPPED (counted, in no metric): `skip_reason`,
  `GCGAccumulator.skip`;
- the phrase masks are painted in phrase order into ONE label map (`paint_label_map`), so they
  are disjoint; the image's predicted masks are the non-empty labels of that map, largest first
  (`predicted_masks`), every one scored 1.0;
- mIoU and AP50 are computed over the images with >= 1 predicted mask only (an image whose map
  is empty is left out of both; mIoU is 0.0 if no image has a mask, so a model that never produces
  a scoreable answer ranks last instead of vanishing); METEOR / CIDEr over every image that was
  not skipped.

GLaMM's optional phrase recall (BERT text similarity) is not implemented.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from xsam.eval.instance import InstanceAccumulator, to_rle

PRIMARY_METRIC = "mIoU"
MASK_METRIC_NAMES = ("mIoU", "AP50")
CAPTION_METRIC_NAMES = ("METEOR", "CIDEr")
GCG_MAX_NEW_TOKENS = 512  # the original's GenerationConfig(max_new_tokens=512), greedy
IGNORE_LABEL = 255  # "no phrase" in the label map
SEG_TOKEN, P_TOKEN, END_P_TOKEN = "<SEG>", "<p>", "</p>"
END_TOKENS = ("<|end|>", "<|endoftext|>")


def _phrases(starts: list[int], ends: list[int]) -> int:
    """Phrases the original embeds: the i-th `<p>` paired with the i-th `</p>` (zip), one that ends
    at or after its start (an empty slice gives no condition embedding)."""
    return sum(e >= b for b, e in zip(starts, ends))


def skip_reason(generated: str | Sequence[int], seg_id: int | None = None, p_id: int | None = None,
                end_p_id: int | None = None) -> str | None:
    """Why the original would skip this GCG sample, or None when it is scored.

    generated: the generated token ids (then give seg_id, p_id and end_p_id; the last generated token
    is left out, as the original scans ``sequences[..., :-1]``), or the decoded text (special tokens
    kept; read up to the first end token). Reasons: "no <SEG>", "several <SEG>" (the segmentor runs
    only for exactly one), "no phrase" (no ``<p> ... </p>`` pair: no condition embedding)."""
    if isinstance(generated, str):
        text = generated
        for end in END_TOKENS:
            text = text.split(end)[0]
        n_seg = text.count(SEG_TOKEN)
        starts = [m.start() for m in re.finditer(re.escape(P_TOKEN), text)]
        n_p = _phrases(starts, [m.start() for m in re.finditer(re.escape(END_P_TOKEN), text)])
    else:
        if seg_id is None or p_id is None or end_p_id is None:
            raise ValueError("token ids need seg_id, p_id and end_p_id")
        ids = [int(t) for t in generated][:-1]
        n_seg = ids.count(int(seg_id))
        n_p = _phrases([i for i, t in enumerate(ids) if t == int(p_id)],
                       [i for i, t in enumerate(ids) if t == int(end_p_id)])
    if n_seg == 0:
        return "no <SEG>"
    if n_seg > 1:
        return "several <SEG>"
    if n_p == 0:
        return "no phrase"
    return None


def paint_label_map(masks: Any) -> Any:
    """[K, H, W] bool phrase masks (torch or numpy) -> [H, W] label map (same kind): k + 1 where
    phrase k is the LAST one covering the pixel (painted in phrase order), IGNORE_LABEL elsewhere."""
    if not isinstance(masks, np.ndarray) and hasattr(masks, "device"):  # a torch tensor: on its device
        from xsam.model.postprocess import paint_label_map as paint

        return paint(masks)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"phrase masks must be [K, H, W], got shape {masks.shape}")
    if masks.shape[0] >= IGNORE_LABEL:
        raise ValueError(f"{masks.shape[0]} phrases do not fit a label map with ignore label {IGNORE_LABEL}")
    top = (masks * np.arange(1, masks.shape[0] + 1)[:, None, None]).max(0, initial=0)
    return np.where(top > 0, top, IGNORE_LABEL).astype(np.int64)


def predicted_masks(label_map: Any) -> tuple[list[np.ndarray], list[int]]:
    """The original's predicted masks of one image (gcgseg_evaluator `_get_rle_masks`): one (H, W)
    bool mask per label present in the map (IGNORE_LABEL excluded), largest area first (ties: lower
    label first) -> (masks, labels)."""
    lm = np.asarray(label_map.cpu() if hasattr(label_map, "cpu") else label_map)
    labels, areas = np.unique(lm, return_counts=True)
    keep = labels < IGNORE_LABEL
    labels, areas = labels[keep], areas[keep]
    order = np.argsort(-areas, kind="stable")
    return [lm == labels[i] for i in order], [int(labels[i]) for i in order]


def greedy_pair_miou(iou: np.ndarray) -> float:
    """GLaMM's one-to-one greedy pairing on an IoU matrix [n_pred, n_gt]; 0.0 when nothing pairs."""
    iou = np.array(iou, dtype=np.float64, copy=True)
    if iou.ndim != 2:
        raise ValueError(f"the IoU matrix must be 2-D [n_pred, n_gt], got shape {iou.shape}")
    paired: list[float] = []
    while iou.size > 0:
        flat = int(np.argmax(iou))
        best = iou.flat[flat]
        if not best > 0:
            break
        i, j = np.unravel_index(flat, iou.shape)
        paired.append(float(best))
        iou[i, :] = -1.0  # removing the row and column; relative order of the rest is unchanged,
        iou[:, j] = -1.0  # so the first-maximum tie rule picks the same pair as np.delete would
    return float(np.mean(paired)) if paired else 0.0


def _as_array(mask: Any) -> np.ndarray:
    """(H, W) array-like or RLE -> (H, W) bool array."""
    if isinstance(mask, dict) or hasattr(mask, "counts"):
        return mask_utils.decode(to_rle(mask)).astype(bool)
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {m.shape}")
    return m.astype(bool, copy=False)


def _iou_matrix(preds: list[dict], gts: list[dict]) -> np.ndarray:
    if not preds or not gts:
        return np.zeros((len(preds), len(gts)))
    return np.asarray(mask_utils.iou(preds, gts, [0] * len(gts)), dtype=np.float64).reshape(len(preds), len(gts))


def check_caption_tools() -> None:
    """Raise a clear error when pycocoevalcap or Java (for METEOR and the PTB tokenizer) is missing."""
    try:
        import pycocoevalcap.cider.cider
        import pycocoevalcap.meteor.meteor
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError as e:
        raise ImportError("GCG caption metrics (METEOR, CIDEr) need the 'pycocoevalcap' package "
                          "(pip install 'pycocoevalcap>=1.2')") from e
    if shutil.which("java") is None:
        raise RuntimeError("GCG caption metrics need Java: no 'java' executable on PATH (METEOR and the "
                           "PTB tokenizer of pycocoevalcap run on the JVM; e.g. apt-get install default-jre-headless)")


def _one_line(text: str) -> str:
    return " ".join(str(text).splitlines())


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer on a list of sentences (lower-cased, punctuation removed).

    Same jar, options and punctuation list as ``PTBTokenizer.tokenize``, but the temporary file lives
    in the system temp directory instead of the (possibly read-only) package directory.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not sentences:
        return []
    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="xsam_ptb_") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(_one_line(s) + "\n" for s in sentences))
        proc = subprocess.run(
            ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
             "-encoding", "utf-8", path],
            capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    punct = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines[:len(sentences)]]


def caption_scores_per_image(predictions: Sequence[str], references: Sequence[Sequence[str]]
                             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Corpus METEOR / CIDEr (x100, as `caption_scores`) and the per-image scores (x100).

    The corpus METEOR is meteor-1.5's aggregate over the split's statistics, not the mean of the
    per-image scores; the corpus CIDEr is the mean of the per-image CIDEr-D.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        return {k: float("nan") for k in CAPTION_METRIC_NAMES}, {k: np.zeros(0) for k in CAPTION_METRIC_NAMES}
    if any(len(r) == 0 for r in references):
        raise ValueError("every image needs at least one reference caption")
    check_caption_tools()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor

    # '|||' separates fields in METEOR's stdin protocol: it must not appear in any sentence
    tokens = [t.replace("|||", " ") for t in
              ptb_tokenize(list(predictions) + [r for refs in references for r in refs])]
    res = {i: [tokens[i]] for i in range(len(predictions))}
    gts, k = {}, len(predictions)
    for i, refs in enumerate(references):
        gts[i] = tokens[k:k + len(refs)]
        k += len(refs)
    cider, cider_per_image = Cider().compute_score(gts, res)
    meteor_scorer = Meteor()
    try:
        meteor, meteor_per_image = meteor_scorer.compute_score(gts, res)
    finally:  # stop the JVM now rather than whenever the scorer is garbage-collected
        proc = meteor_scorer.meteor_p
        if proc.stdin:
            proc.stdin.close()
        proc.kill()
        proc.wait()
    corpus = {"METEOR": float(meteor) * 100.0, "CIDEr": float(cider) * 100.0}
    per_image = {"METEOR": np.asarray(meteor_per_image, dtype=np.float64) * 100.0,
                 "CIDEr": np.asarray(cider_per_image, dtype=np.float64) * 100.0}
    return corpus, per_image


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus METEOR and CIDEr (x100) of one predicted caption per image against its reference(s)."""
    return caption_scores_per_image(predictions, references)[0]


class GCGAccumulator:
    """GCG mIoU / AP50 (per image with a predicted mask) and METEOR / CIDEr (per split).

    caption_metrics=False skips METEOR / CIDEr (no Java needed); the result then has only the mask
    metrics. Skipped samples (`skip`) and images without a predicted mask are counted (`counts`).
    """

    primary_metric = PRIMARY_METRIC

    def __init__(self, caption_metrics: bool = True):
        self.caption_metrics = bool(caption_metrics)
        self.metric_names = MASK_METRIC_NAMES + (CAPTION_METRIC_NAMES if self.caption_metrics else ())
        self.image_mious: list[float] = []  # one per image with >= 1 predicted mask
        # only images with a prediction are added, each counted (the original's imgIds = images predicted)
        self.instances = InstanceAccumulator(class_agnostic=True, crowd="ignore", images_without_gt="count")
        self.predictions: list[str] = []
        self.references: list[list[str]] = []
        self.images = 0  # samples added (not skipped)
        self.skipped: dict[str, int] = {}  # skip reason -> samples

    def __len__(self) -> int:
        return self.images

    def skip(self, reason: str) -> None:
        """Count a sample the protocol skips (see `skip_reason`); it enters no metric."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, pred_masks: Sequence[Any], gt_masks: Sequence[Any], pred_caption: str = "",
            gt_captions: str | Sequence[str] = (), pred_scores: Sequence[float] | None = None) -> float | None:
        """Add one image; returns its GLaMM mIoU (0..1), or None when it has no predicted mask.

        pred_masks: one (H, W) mask per predicted phrase, in phrase order (arrays; painted into one
        label map here, so overlapping input is resolved as the original does); gt_masks: one mask
        per ground-truth phrase (RLE dicts or (H, W) arrays). gt_captions: the reference caption or
        captions (required when caption metrics are on). pred_scores: per phrase, default 1.0.
        """
        if pred_scores is not None and len(pred_scores) != len(pred_masks):
            raise ValueError(f"{len(pred_scores)} scores for {len(pred_masks)} predicted masks")
        refs = [gt_captions] if isinstance(gt_captions, str) else [str(c) for c in gt_captions]
        if self.caption_metrics and not refs:
            raise ValueError("gt_captions is required when caption metrics are on")
        gts = [to_rle(m) for m in gt_masks]
        preds, scores = [], []
        if len(pred_masks):
            stacked = np.stack([_as_array(m) for m in pred_masks])
            masks, labels = predicted_masks(paint_label_map(stacked))
            preds = [to_rle(m) for m in masks]
            scores = [1.0 if pred_scores is None else float(pred_scores[k - 1]) for k in labels]
        miou = None
        if preds:
            # validates sizes and scores before anything is recorded
            self.instances.add([{"mask": g} for g in gts], [{"mask": p, "score": s} for p, s in zip(preds, scores)])
            miou = greedy_pair_miou(_iou_matrix(preds, gts))
            self.image_mious.append(miou)
        self.images += 1
        if self.caption_metrics:
            self.predictions.append(str(pred_caption))
            self.references.append(refs)
        return miou

    def counts(self) -> dict[str, int]:
        """{"images": added, "mask_images": with >= 1 predicted mask, "skipped": skipped samples,
        "skipped/<reason>": per reason}."""
        out = {"images": self.images, "mask_images": len(self.image_mious), "skipped": sum(self.skipped.values())}
        out.update({f"skipped/{k}": v for k, v in sorted(self.skipped.items())})
        return out

    def __add__(self, other: GCGAccumulator) -> GCGAccumulator:
        if not isinstance(other, GCGAccumulator):
            raise TypeError(f"cannot merge GCGAccumulator with {type(other).__name__}")
        if other.caption_metrics != self.caption_metrics:
            raise ValueError("cannot merge GCGAccumulators with different caption_metrics settings")
        out = GCGAccumulator(self.caption_metrics)
        out.image_mious = self.image_mious + other.image_mious
        out.instances = self.instances + other.instances
        out.predictions = self.predictions + other.predictions
        out.references = self.references + other.references
        out.images = self.images + other.images
        out.skipped = {k: self.skipped.get(k, 0) + other.skipped.get(k, 0) for k in {*self.skipped, *other.skipped}}
        return out

    def __radd__(self, other: Any) -> GCGAccumulator:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    def result(self) -> dict[str, float]:
        """{"mIoU", "AP50"} (+ {"METEOR", "CIDEr"}) in percent over the images with a predicted mask
        (captions: every image added). mIoU is 0.0 when samples were seen (added or skipped) but none
        has a mask (the original prints 0.0, or nothing when every sample failed), NaN when none was."""
        n = len(self.image_mious)
        seen = self.images + sum(self.skipped.values())
        out = {
            "mIoU": math.fsum(self.image_mious) / n * 100.0 if n else (0.0 if seen else float("nan")),
            "AP50": self.instances.result()["AP50"],
        }
        if self.caption_metrics:
            out.update(caption_scores(self.predictions, self.references))
        return out
