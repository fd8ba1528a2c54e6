"""Grounded conversation generation (GCG) metrics, GLaMM protocol, as a mergeable accumulator.

Per image the model gives a caption and one mask per grounded phrase; the ground truth is the
reference caption(s) and one mask per ground-truth phrase. Four numbers, in percent:

mIoU  -- GLaMM's ``compute_miou`` (groundingLMM eval/gcg/evaluate.py), reproduced exactly:
         build the IoU matrix predicted x ground-truth masks; repeatedly take the pair with the
         highest IoU (first in row-major order on ties), record its IoU and remove that prediction
         and that ground truth; stop when nothing is left or the best remaining IoU is 0. The image's
         score is the mean of the recorded IoUs, and 0.0 when nothing was paired (no prediction, no
         ground truth, or no overlap). Unpaired predictions and unpaired ground truths are NOT
         penalised beyond that (GLaMM does not count them). mIoU = mean of the image scores over all
         images added. Kept as GLaMM defines it so that numbers compare with the paper tables
         (X-SAM 69.4, GLaMM 65.8); a mask pair with an empty union has IoU 0.
AP50  -- class-agnostic COCO segm AP at IoU 0.5 (`xsam.eval.instance` with ``class_agnostic=True``),
         every prediction scored 1.0 as GLaMM does, unless the caller gives scores.
METEOR, CIDEr -- pycocoevalcap 1.2, as ``COCOEvalCap`` computes them: captions lower-cased and
         tokenised by the Stanford PTB tokenizer (punctuation dropped), then ``Meteor`` (corpus-level
         score of meteor-1.5) and ``Cider`` (CIDEr-D, document frequencies from the split's
         references). Both reported x100. They need the whole split, so they run once, in
         `result()`; METEOR and the tokenizer start a JVM (``java`` on PATH).

GLaMM's optional phrase recall (BERT text similarity) is not implemented.
"""

from __future__ import annotations

import math
import os
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
    """GCG mIoU / AP50 (per image) and METEOR / CIDEr (per split).

    caption_metrics=False skips METEOR / CIDEr (no Java needed); the result then has only the mask
    metrics.
    """

    primary_metric = PRIMARY_METRIC

    def __init__(self, caption_metrics: bool = True):
        self.caption_metrics = bool(caption_metrics)
        self.metric_names = MASK_METRIC_NAMES + (CAPTION_METRIC_NAMES if self.caption_metrics else ())
        self.image_mious: list[float] = []
        self.instances = InstanceAccumulator(class_agnostic=True)
        self.predictions: list[str] = []
        self.references: list[list[str]] = []

    def __len__(self) -> int:
        return len(self.image_mious)

    def add(self, pred_masks: Sequence[Any], gt_masks: Sequence[Any], pred_caption: str = "",
            gt_captions: str | Sequence[str] = (), pred_scores: Sequence[float] | None = None) -> float:
        """Add one image; returns its GLaMM mIoU (0..1).

        pred_masks: one mask per predicted phrase; gt_masks: one mask per ground-truth phrase (RLE
        dicts or (H, W) arrays). gt_captions: the reference caption or captions (required when
        caption metrics are on). pred_scores: per predicted mask, default 1.0.
        """
        if pred_scores is not None and len(pred_scores) != len(pred_masks):
            raise ValueError(f"{len(pred_scores)} scores for {len(pred_masks)} predicted masks")
        refs = [gt_captions] if isinstance(gt_captions, str) else [str(c) for c in gt_captions]
        if self.caption_metrics and not refs:
            raise ValueError("gt_captions is required when caption metrics are on")
        preds = [to_rle(m) for m in pred_masks]
        gts = [to_rle(m) for m in gt_masks]
        scores = [1.0] * len(preds) if pred_scores is None else [float(s) for s in pred_scores]
        # validates sizes and scores before anything is recorded
        self.instances.add([{"mask": g} for g in gts], [{"mask": p, "score": s} for p, s in zip(preds, scores)])
        miou = greedy_pair_miou(_iou_matrix(preds, gts))
        self.image_mious.append(miou)
        if self.caption_metrics:
            self.predictions.append(str(pred_caption))
            self.references.append(refs)
        return miou

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
        return out

    def __radd__(self, other: Any) -> GCGAccumulator:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    def result(self) -> dict[str, float]:
        """{"mIoU", "AP50"} (+ {"METEOR", "CIDEr"}) in percent; NaN when no image was added."""
        n = len(self.image_mious)
        out = {
            "mIoU": math.fsum(self.image_mious) / n * 100.0 if n else float("nan"),
            "AP50": self.instances.result()["AP50"],
        }
        if self.caption_metrics:
            out.update(caption_scores(self.predictions, self.references))
        return out
