"""Per-task post-processing of ONE image's decoder outputs, as the original X-SAM evaluates them.

Every function takes
    mask_cls:    [Q, K+1] class logits (last = background),
    mask_pred:   [Q, h, w] mask logits at stride 8 of the padded SAM frame ([h*8, w*8]),
    scaled_size: (h_s, w_s) the image's size inside the padded frame (longest side = SAM size),
    orig_size:   (H, W) the original image size,
and returns results at the original size, on the device of `mask_pred` (torch ops only; the few
small per-query lists a result needs are read back at the end). Any float dtype is accepted;
the arithmetic is float32. Class scores are softmax(mask_cls) without the background column.

Geometry: the original's segmentor upsamples the mask logits bilinearly to the padded frame
(x_segmentor.postprocess_masks_preds), then `sem_seg_postprocess` crops the image's top-left
scaled_size and resizes bilinearly (align_corners=False) to orig_size. Per task (original files
under xsam/xsam/dataset/process_fns/postprocess_fns/ and xsam/xsam/dataset/utils/process.py):

- panoptic (genseg_process_fn.py `_panoptic_genseg_postprocess` + process.py `compute_segments`,
  the HF/DETR fusion): see `panoptic_result`;
- instance / VGD (genseg `_instance_genseg_postprocess`, vgdseg_process_fn.py): the top-Q
  (query, class) pairs of the Q*K class probabilities (`topk(num_queries)`, threshold 0 keeps all
  of them; COCOeval's maxDets=100 decides later), mask = logit > 0, score = class prob x mean
  mask probability inside the mask;
- semantic (genseg `_semantic_genseg_postprocess`): sigmoid of the frame-size logits, the
  class-weighted probability maps einsum(softmax[:, :-1], sigmoid) are cropped and resized to the
  original size (the PROBABILITY maps are resized, not the logits), then argmax;
- interactive (intseg_process_fn.py): top-Q scores as instance; keep score >= 0.5 or the best;
  the mask whose BOX has the highest IoU with the prompt's box;
- referring (refseg_process_fn.py): the best query's sigmoid > 0.5;
- GCG (gcgseg_process_fn.py): per phrase the best query's sigmoid > 0.5, painted in phrase order
  into ONE label map (a later phrase overwrites an earlier one), so phrase masks are disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_STRIDE = 8  # mask_pred resolution relative to the padded SAM frame
GCG_IGNORE = 255  # the label of "no phrase" in the GCG label map (the original's ignore index)


def _frame_crop(mask_pred: Tensor, scaled_size: Sequence[int], stride: int = MASK_STRIDE) -> Tensor:
    """[Q, h, w] logits -> [Q, h_s, w_s] float32 logits: bilinear to the padded frame, image crop."""
    q, h, w = mask_pred.shape
    h_s, w_s = int(scaled_size[0]), int(scaled_size[1])
    frame = (h * stride, w * stride)
    if h_s > frame[0] or w_s > frame[1]:
        raise ValueError(f"scaled size {(h_s, w_s)} does not fit in the padded frame {frame}")
    if q == 0:
        return mask_pred.new_zeros((0, h_s, w_s), dtype=torch.float32)
    x = F.interpolate(mask_pred[None].float(), size=frame, mode="bilinear", align_corners=False)
    return x[0, :, :h_s, :w_s]


def _to_size(x: Tensor, size: Sequence[int]) -> Tensor:
    """[C, h, w] float -> [C, H, W], bilinear, align_corners=False (sem_seg_postprocess)."""
    out_size = (int(size[0]), int(size[1]))
    if x.shape[0] == 0:
        return x.new_zeros((0, *out_size))
    return F.interpolate(x[None], size=out_size, mode="bilinear", align_corners=False)[0]


def resize_to_original(mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
                       stride: int = MASK_STRIDE) -> Tensor:
    """[Q, h, w] logits at 1/stride of the padded frame -> [Q, H, W] float32 logits at orig_size."""
    return _to_size(_frame_crop(mask_pred, scaled_size, stride), orig_size)


def _class_probs(mask_cls: Tensor) -> Tensor:
    """[Q, K+1] logits -> [Q, K] float32 softmax probabilities without the background column."""
    return mask_cls.float().softmax(-1)[:, :-1]


def _mask_scores(logits: Tensor) -> tuple[Tensor, Tensor]:
    """[N, H, W] logits -> (binary masks logit > 0 [N, H, W] bool, mean probability inside [N])."""
    binary = logits > 0
    inside = (logits.sigmoid() * binary).flatten(1).sum(1)
    return binary, inside / (binary.flatten(1).sum(1) + 1e-6)


# ------------------------------------------------------------------ panoptic


@dataclass
class PanopticResult:
    """seg_map [H, W] int32 (0 = void, segment ids 1..n, never reused); segments: dict(id,
    category_id (class index), isthing, score) in creation order; accepted: (query, class, fused)
    of every query that passed the validity check, in query order (a fused stuff query adds its
    pixels to the segment of its class); upstream_id_reuses: how many of them the original's
    counter (`compute_segments`) would give an id another segment already has."""

    seg_map: Tensor
    segments: list[dict] = field(default_factory=list)
    accepted: list[tuple[int, int, bool]] = field(default_factory=list)
    upstream_id_reuses: int = 0


def count_upstream_id_reuse(accepted: Sequence[tuple[int, bool]]) -> int:
    """Replay the segment-id counter of the original's `compute_segments` (HF DETR, transformers
    issue #23461) over the accepted queries [(class, fused)] in query order; return how many NEW
    segments it would give an id that an earlier segment already holds.

    Upstream: a query of a fused (stuff) class seen before sets `current_segment_id` back to that
    class's id; the next new segment then takes `current_segment_id + 1`, which can be an id in
    use. Here ids only grow, so this only counts; nothing is reproduced."""
    current, memory, used, reuses = 0, {}, set(), 0
    for cls, fused in accepted:
        if cls in memory:  # merge into the class's segment: upstream rewinds the counter here
            current = memory[cls]
            continue
        current += 1
        reuses += current in used
        used.add(current)
        if fused:
            memory[cls] = current
    return reuses


def panoptic_result(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
                    is_thing: Sequence[bool], object_threshold: float = 0.0, mask_threshold: float = 0.5,
                    overlap_threshold: float = 0.8) -> PanopticResult:
    """HF/DETR panoptic fusion as the original evaluates it (threshold 0.0 in its eval configs):
    score, class = max / argmax of softmax(mask_cls)[:, :-1] (never the background); the queries
    with score > object_threshold (with 0.0: all Q) go to `fuse_panoptic` with sigmoid(logits at
    orig_size)."""
    h, w = int(orig_size[0]), int(orig_size[1])
    scores, labels = _class_probs(mask_cls).max(-1)
    kept = (scores > object_threshold).nonzero().flatten()
    if kept.numel() == 0:
        return PanopticResult(torch.zeros(h, w, dtype=torch.int32, device=mask_pred.device))
    probs = resize_to_original(mask_pred[kept], scaled_size, orig_size).sigmoid()
    return fuse_panoptic(scores[kept], labels[kept], probs, is_thing, mask_threshold, overlap_threshold,
                         queries=kept.tolist())


def fuse_panoptic(scores: Tensor, labels: Tensor, probs: Tensor, is_thing: Sequence[bool],
                  mask_threshold: float = 0.5, overlap_threshold: float = 0.8,
                  queries: Sequence[int] | None = None) -> PanopticResult:
    """The fusion of the original's `compute_segments` (+ `check_segment_validity`) on k queries:
    scores [k], labels [k] (class indices), probs [k, H, W] mask probabilities at the output size;
    queries: their indices among all Q (default 0..k-1), for `PanopticResult.accepted`.

    1. weighted = score * prob; every pixel goes to the query with the highest weighted value
       (first on ties);
    2. a query is a segment when won > 0, own > 0 and won / own > overlap_threshold, with won = its
       pixels from 1 and own = #(weighted >= mask_threshold) (score-weighted: upstream multiplies the
       probabilities in place before this check); the ratio is a float32 division compared in
       double, as upstream's `.item() > 0.8` (so exactly 4/5 counts as > 0.8);
    3. the segment = ALL the pixels it won (also those below mask_threshold); queries of the same
       stuff class (not is_thing) merge into one segment (score = the first query's).
    Pixels of the other queries are void (0). Ids are 1..n in creation order, never reused.
    """
    k = scores.shape[0]
    queries = list(range(k)) if queries is None else list(queries)
    weighted = probs.float() * scores.float()[:, None, None]
    owner = weighted.argmax(0)  # [H, W]
    won = torch.bincount(owner.flatten(), minlength=k)
    own = (weighted >= mask_threshold).flatten(1).sum(1)
    ratio = won.float() / own.float().clamp(min=1)
    valid = (won > 0) & (own > 0) & (ratio.double() > overlap_threshold)
    # the small per-query lists the segment records need
    classes, valid_l, score_l = labels.tolist(), valid.tolist(), scores.float().tolist()
    out = PanopticResult(torch.zeros(owner.shape, dtype=torch.int32, device=probs.device))
    stuff_ids: dict[int, int] = {}
    seg_of = [0] * k
    for i, ok in enumerate(valid_l):
        if not ok:
            continue
        cls = classes[i]
        fused = not bool(is_thing[cls])
        out.accepted.append((queries[i], cls, fused))
        if fused and cls in stuff_ids:
            seg_of[i] = stuff_ids[cls]
            continue
        seg_of[i] = len(out.segments) + 1
        if fused:
            stuff_ids[cls] = seg_of[i]
        out.segments.append({"id": seg_of[i], "category_id": cls, "isthing": not fused, "score": score_l[i]})
    out.seg_map = torch.tensor(seg_of, dtype=torch.int32, device=probs.device)[owner]
    out.upstream_id_reuses = count_upstream_id_reuse([(c, f) for _, c, f in out.accepted])
    return out


def panoptic(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
             is_thing: Sequence[bool], object_threshold: float = 0.0, mask_threshold: float = 0.5,
             overlap_threshold: float = 0.8) -> tuple[Tensor, list[dict]]:
    """`panoptic_result` -> (seg_map [H, W] int32, 0 = void, ids 1..n; segments: list of dict(id,
    category_id (class index), isthing, score))."""
    r = panoptic_result(mask_cls, mask_pred, scaled_size, orig_size, is_thing, object_threshold, mask_threshold,
                        overlap_threshold)
    return r.seg_map, r.segments


# ------------------------------------------------------------------ instance / vgd / semantic


def instance(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
             top_k: int | None = None) -> dict[str, Tensor]:
    """The top-k (query, class) pairs by class probability (background excluded), k = Q by default
    as the original (`topk(num_queries)` over the Q*K pairs; capped at Q*K); mask = logit > 0;
    score = class prob x mean mask probability inside the mask. Nothing is thresholded: COCOeval's
    maxDets (100 per image and category) decides.
    Returns dict(masks [k, H, W] bool, labels [k] long, scores [k] float), by score (desc; ties:
    by class probability, then query-major pair order)."""
    probs = _class_probs(mask_cls)  # [Q, K]
    num_queries, num_classes = probs.shape
    k = min(num_queries if top_k is None else int(top_k), probs.numel())
    flat = probs.flatten().argsort(descending=True, stable=True)[:k]
    cls_scores = probs.flatten()[flat]
    queries, labels = flat // num_classes, flat % num_classes
    unique, inverse = torch.unique(queries, return_inverse=True)
    binary, mask_scores = _mask_scores(resize_to_original(mask_pred[unique], scaled_size, orig_size))
    scores = cls_scores * mask_scores[inverse]
    order = scores.argsort(descending=True, stable=True)
    return {"masks": binary[inverse][order], "labels": labels[order], "scores": scores[order]}


def vgd(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
        top_k: int | None = None) -> dict[str, Tensor]:
    """Visual-grounded segmentation: the instance post-processing (classes = the prompts)."""
    return instance(mask_cls, mask_pred, scaled_size, orig_size, top_k=top_k)


def semantic(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int],
             orig_size: Sequence[int]) -> Tensor:
    """argmax over classes of the class-weighted probability maps -> [H, W] long.

    Order as the original: logits -> padded frame (bilinear) -> sigmoid -> einsum with
    softmax(mask_cls)[:, :-1] -> crop -> bilinear to orig_size -> argmax (first on ties)."""
    probs = _class_probs(mask_cls)  # [Q, K]
    maps = torch.einsum("qc,qhw->chw", probs, _frame_crop(mask_pred, scaled_size).sigmoid())  # [K, h_s, w_s]
    return _to_size(maps, orig_size).argmax(0)


# ------------------------------------------------------------------ referring / gres / gcg


def _condition_scores(mask_cls: Tensor) -> Tensor:
    """[Q, K+1] -> [Q]: softmax probability of class 0 (the single condition)."""
    return mask_cls.float().softmax(-1)[:, 0]


def referring(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int],
              orig_size: Sequence[int]) -> Tensor:
    """The mask (sigmoid > 0.5) of the query with the highest class-0 probability -> [H, W] bool."""
    best = int(_condition_scores(mask_cls).argmax())
    return resize_to_original(mask_pred[best:best + 1], scaled_size, orig_size)[0].sigmoid() > 0.5


def gres(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
         threshold: float = 0.6) -> Tensor:
    """Generalised referring: union of the masks (sigmoid > 0.5) of the queries with class-0
    probability >= threshold, or of the best query's mask if there is none -> [H, W] bool."""
    scores = _condition_scores(mask_cls)
    chosen = (scores >= threshold).nonzero().flatten()
    if chosen.numel() == 0:
        chosen = scores.argmax().reshape(1)
    return (resize_to_original(mask_pred[chosen], scaled_size, orig_size).sigmoid() > 0.5).any(0)


def paint_label_map(masks: Tensor) -> Tensor:
    """[K, H, W] bool phrase masks -> [H, W] long label map: pixel = k + 1 of the LAST phrase k
    covering it (phrases painted in order, later ones overwrite), GCG_IGNORE where none does."""
    k = masks.shape[0]
    if k >= GCG_IGNORE:
        raise ValueError(f"{k} phrases do not fit a label map with ignore label {GCG_IGNORE}")
    if k == 0:
        return torch.full(masks.shape[1:], GCG_IGNORE, dtype=torch.long, device=masks.device)
    ids = torch.arange(1, k + 1, device=masks.device)[:, None, None]
    top = (masks.bool() * ids).amax(0)
    return torch.where(top > 0, top, torch.full_like(top, GCG_IGNORE))


def label_map_masks(label_map: Tensor, num_phrases: int) -> Tensor:
    """[H, W] label map -> [num_phrases, H, W] bool, phrase k = pixels labelled k + 1 (disjoint)."""
    ids = torch.arange(1, num_phrases + 1, device=label_map.device)[:, None, None]
    return label_map[None] == ids


def gcg(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int]) -> Tensor:
    """Grounded conversation: phrase k -> the query with the highest probability of k, its mask
    sigmoid > 0.5, painted in phrase order into one label map -> [K, H, W] bool, DISJOINT (a phrase
    fully painted over is empty)."""
    best = _class_probs(mask_cls).argmax(0)  # [K]
    binary = resize_to_original(mask_pred[best], scaled_size, orig_size).sigmoid() > 0.5
    return label_map_masks(paint_label_map(binary), binary.shape[0])


# ------------------------------------------------------------------ interactive


def mask_boxes(masks: Tensor) -> Tensor:
    """[N, H, W] bool -> [N, 4] float32 tight boxes (x0, y0, x1 + 1, y1 + 1); zeros for an empty
    mask (detectron2 BitMasks.get_bounding_boxes)."""
    _, h, w = masks.shape
    cols, rows = masks.any(1), masks.any(2)  # [N, W], [N, H]
    x0 = cols.int().argmax(1)
    x1 = w - cols.flip(1).int().argmax(1)
    y0 = rows.int().argmax(1)
    y1 = h - rows.flip(1).int().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(cols.any(1)[:, None], boxes, torch.zeros_like(boxes))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """[N, 4] x [M, 4] (x0, y0, x1, y1) -> [N, M] IoU; 0 where boxes do not overlap (detectron2)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    inter = wh.prod(2)
    return torch.where(inter > 0, inter / (area_a[:, None] + area_b[None] - inter), torch.zeros_like(inter))


def interactive(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
                prompt_mask: Tensor, threshold: float = 0.5) -> Tensor:
    """One visual prompt (mask_cls [Q, 2]: the prompt's class and background) -> [H, W] bool.

    score = class-0 probability x mean mask probability inside the mask (logit > 0); the queries
    with score >= threshold, and the best one in any case, are candidates; the candidate whose box
    has the highest IoU with the box of prompt_mask ([H, W] bool at orig_size) wins (first in query
    order on ties; the original's order there is topk(sorted=False)'s)."""
    if tuple(prompt_mask.shape) != (int(orig_size[0]), int(orig_size[1])):
        raise ValueError(f"prompt mask {tuple(prompt_mask.shape)} is not at the original size {tuple(orig_size)}")
    if mask_cls.shape[-1] != 2:
        raise ValueError(f"interactive post-processing takes one prompt class + background, got {mask_cls.shape}")
    binary, mask_scores = _mask_scores(resize_to_original(mask_pred, scaled_size, orig_size))
    scores = _condition_scores(mask_cls) * mask_scores
    candidates = ((scores >= threshold) | (scores == scores.max())).nonzero().flatten()
    prompt_box = mask_boxes(prompt_mask.to(binary.device).bool()[None])
    iou = box_iou(mask_boxes(binary[candidates]), prompt_box)[:, 0]
    return binary[candidates[int(iou.argmax())]]
