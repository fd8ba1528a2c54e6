"""Per-task post-processing of ONE image's decoder outputs (reference section 5).

Every function takes
    mask_cls:    [Q, K+1] class logits (last = background),
    mask_pred:   [Q, h, w] mask logits at stride 8 of the padded SAM frame ([h*8, w*8]),
    scaled_size: (h_s, w_s) the image's size inside the padded frame (longest side = SAM size),
    orig_size:   (H, W) the original image size,
and returns results at the original size. Geometry (`resize_to_original`): mask logits are
upsampled bilinearly to the padded frame, cropped to scaled_size (the image sits top-left, padding
is bottom/right), resized bilinearly to orig_size, and only then thresholded (sigmoid > 0.5, i.e.
logit > 0). Class scores are softmax(mask_cls); for the single-condition tasks (referring, gres,
interactive) a query's score is the probability of class 0, the one condition.
Only the queries a task needs are resized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_STRIDE = 8  # mask_pred resolution relative to the padded SAM frame


def resize_to_original(mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
                       stride: int = MASK_STRIDE) -> Tensor:
    """[Q, h, w] logits at 1/stride of the padded frame -> [Q, H, W] float32 logits at orig_size."""
    q, h, w = mask_pred.shape
    h_s, w_s = int(scaled_size[0]), int(scaled_size[1])
    frame = (h * stride, w * stride)
    if h_s > frame[0] or w_s > frame[1]:
        raise ValueError(f"scaled size {(h_s, w_s)} does not fit in the padded frame {frame}")
    out_size = (int(orig_size[0]), int(orig_size[1]))
    if q == 0:
        return mask_pred.new_zeros((0, *out_size), dtype=torch.float32)
    x = F.interpolate(mask_pred[None].float(), size=frame, mode="bilinear", align_corners=False)
    x = x[:, :, :h_s, :w_s]
    x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
    return x[0]


def _condition_scores(mask_cls: Tensor) -> Tensor:
    """[Q, K+1] -> [Q]: softmax probability of class 0 (the single condition)."""
    return mask_cls.float().softmax(-1)[:, 0]


def panoptic(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
             is_thing: Sequence[bool], object_threshold: float = 0.0, mask_threshold: float = 0.5,
             overlap_threshold: float = 0.8) -> tuple[Tensor, list[dict]]:
    """Mask2Former panoptic inference.

    Queries whose best class is not the background and whose score > object_threshold are kept;
    each pixel goes to the kept query with the highest score x mask probability; a query is dropped
    if the pixels it wins (and where its probability >= mask_threshold) are less than
    overlap_threshold of its own (>= mask_threshold) area; stuff queries of the same class fuse
    into one segment (score = that of the first query that created it).
    Returns (seg_map [H, W] int32, 0 = void, ids 1..n; segments: list of dict(id, category_id
    (class index), isthing, score)).
    """
    probs = mask_cls.float().softmax(-1)
    scores, labels = probs.max(-1)
    background = mask_cls.shape[-1] - 1
    keep = (labels != background) & (scores > object_threshold)
    seg_map = torch.zeros(int(orig_size[0]), int(orig_size[1]), dtype=torch.int32, device=mask_pred.device)
    segments: list[dict] = []
    if not bool(keep.any()):
        return seg_map, segments
    cur_scores, cur_classes = scores[keep], labels[keep]
    cur_masks = resize_to_original(mask_pred[keep], scaled_size, orig_size).sigmoid()  # [k, H, W]
    owner = (cur_scores[:, None, None] * cur_masks).argmax(0)  # [H, W]
    stuff_ids: dict[int, int] = {}
    next_id = 0
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        thing = bool(is_thing[cls])
        won = owner == k
        own = cur_masks[k] >= mask_threshold
        mask = won & own
        won_area, own_area = int(won.sum()), int(own.sum())
        if won_area == 0 or own_area == 0 or int(mask.sum()) == 0:
            continue
        if won_area / own_area < overlap_threshold:
            continue
        if not thing and cls in stuff_ids:
            seg_map[mask] = stuff_ids[cls]
            continue
        next_id += 1
        if not thing:
            stuff_ids[cls] = next_id
        seg_map[mask] = next_id
        segments.append({"id": next_id, "category_id": cls, "isthing": thing, "score": float(cur_scores[k])})
    return seg_map, segments


def instance(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
             top_k: int = 100) -> dict[str, Tensor]:
    """Top-k (query, class) pairs by class probability (background excluded); score = class prob x
    mean mask probability inside the binary (prob > 0.5) mask.
    Returns dict(masks [k, H, W] bool, labels [k] long, scores [k] float), sorted by score (desc)."""
    probs = mask_cls.float().softmax(-1)[:, :-1]  # [Q, K]
    num_classes = probs.shape[1]
    k = min(top_k, probs.numel())
    cls_scores, flat = probs.flatten().topk(k)
    queries, labels = flat // num_classes, flat % num_classes
    unique, inverse = torch.unique(queries, return_inverse=True)
    logits = resize_to_original(mask_pred[unique], scaled_size, orig_size)[inverse]  # [k, H, W]
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = cls_scores * mask_scores
    order = scores.argsort(descending=True, stable=True)
    return {"masks": binary[order], "labels": labels[order], "scores": scores[order]}


def vgd(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
        top_k: int = 100) -> dict[str, Tensor]:
    """Visual-grounded segmentation: the instance post-processing (classes = the prompts)."""
    return instance(mask_cls, mask_pred, scaled_size, orig_size, top_k=top_k)


def semantic(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int],
             orig_size: Sequence[int]) -> Tensor:
    """argmax over classes of einsum(softmax(mask_cls)[:, :-1], sigmoid(masks)) -> [H, W] long."""
    probs = mask_cls.float().softmax(-1)[:, :-1]
    masks = resize_to_original(mask_pred, scaled_size, orig_size).sigmoid()
    return torch.einsum("qc,qhw->chw", probs, masks).argmax(0)


def referring(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int],
              orig_size: Sequence[int]) -> Tensor:
    """The mask (prob > 0.5) of the query with the highest class-0 probability -> [H, W] bool."""
    best = int(_condition_scores(mask_cls).argmax())
    return resize_to_original(mask_pred[best:best + 1], scaled_size, orig_size)[0] > 0


def gres(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
         threshold: float = 0.6) -> Tensor:
    """Generalised referring: union of the masks of the queries with class-0 probability >=
    threshold, or of the best query's mask if there is none -> [H, W] bool."""
    scores = _condition_scores(mask_cls)
    chosen = (scores >= threshold).nonzero().flatten()
    if chosen.numel() == 0:
        chosen = scores.argmax().reshape(1)
    return (resize_to_original(mask_pred[chosen], scaled_size, orig_size) > 0).any(0)


def gcg(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int]) -> Tensor:
    """Grounded conversation: for each phrase (class) k the mask of the query with the highest
    probability of k -> [K, H, W] bool."""
    best = mask_cls.float().softmax(-1)[:, :-1].argmax(0)  # [K]
    return resize_to_original(mask_pred[best], scaled_size, orig_size) > 0


def interactive(mask_cls: Tensor, mask_pred: Tensor, scaled_size: Sequence[int], orig_size: Sequence[int],
                prompt_mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Queries with class-0 probability >= threshold (or the best one if none); among them the mask
    with the highest IoU with prompt_mask ([H, W] bool at orig_size; first on ties) -> [H, W] bool."""
    if tuple(prompt_mask.shape) != (int(orig_size[0]), int(orig_size[1])):
        raise ValueError(f"prompt mask {tuple(prompt_mask.shape)} is not at the original size {tuple(orig_size)}")
    scores = _condition_scores(mask_cls)
    chosen = (scores >= threshold).nonzero().flatten()
    if chosen.numel() == 0:
        chosen = scores.argmax().reshape(1)
    masks = resize_to_original(mask_pred[chosen], scaled_size, orig_size) > 0  # [c, H, W]
    prompt = prompt_mask.to(masks.device).bool()[None]
    inter = (masks & prompt).flatten(1).sum(1).float()
    union = (masks | prompt).flatten(1).sum(1).float()
    iou = inter / union.clamp(min=1.0)
    return masks[int(iou.argmax())]
