"""Mask2Former set criterion: Hungarian matching, then class CE + point-sampled mask BCE and dice.

For the final prediction and every auxiliary (intermediate) one, separately:
- queries are matched to targets by the HungarianMatcher;
- loss_ce: cross-entropy over the K+1 classes (last = background / no-object, weight
  `no_object_weight`); unmatched queries have the background as target; weighted mean as
  F.cross_entropy(weight=...) computes it;
- loss_mask / loss_dice: on `num_points` points per matched mask chosen by PointRend uncertainty
  sampling of the prediction, targets read at the same normalised points at their own (full)
  resolution; summed over masks and divided by num_masks.
num_masks = number of target masks in the batch, summed over ranks with torch.distributed when it
is initialised and divided by the world size (so every rank uses the same mean), clamped >= 1.
All losses come back already multiplied by their weights; aux ones get the suffix `_i`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from xsam.model.config import LossConfig
from xsam.model.matcher import HungarianMatcher
from xsam.model.point_sampling import point_sample, uncertain_points_with_randomness


def sigmoid_ce_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """logits, labels: [M, P] -> scalar: per-mask mean BCE, summed, / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """logits, labels: [M, P] -> scalar: sum of 1 - (2|p t| + 1) / (|p| + |t| + 1), / num_masks."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


def count_masks(targets: list[dict], device: torch.device | str = "cpu") -> float:
    """Total number of target masks, averaged over ranks when torch.distributed is initialised
    (all-reduce SUM / world size), clamped >= 1. Without distributed: the local count (>= 1)."""
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world_size = dist.get_world_size()
    return torch.clamp(count / world_size, min=1.0).item()


class SetCriterion(nn.Module):
    """Matching + weighted losses for the decoder's outputs (final + aux)."""

    def __init__(self, matcher: HungarianMatcher, loss_cfg: LossConfig):
        super().__init__()
        self.matcher = matcher
        self.class_weight = loss_cfg.class_weight
        self.mask_weight = loss_cfg.mask_weight
        self.dice_weight = loss_cfg.dice_weight
        self.no_object_weight = loss_cfg.no_object_weight
        self.num_points = loss_cfg.num_points
        self.oversample_ratio = loss_cfg.oversample_ratio
        self.importance_sample_ratio = loss_cfg.importance_sample_ratio

    @classmethod
    def from_config(cls, loss_cfg: LossConfig) -> SetCriterion:
        """The criterion with a matcher using the same weights and point count as the losses."""
        matcher = HungarianMatcher(cost_class=loss_cfg.class_weight, cost_mask=loss_cfg.mask_weight,
                                   cost_dice=loss_cfg.dice_weight, num_points=loss_cfg.num_points)
        return cls(matcher, loss_cfg)

    def loss_labels(self, pred_logits: Tensor, targets: list[dict],
                    indices: list[tuple[Tensor, Tensor]]) -> Tensor:
        """pred_logits [B, Q, K+1] -> unweighted CE (background weight on the last class)."""
        b, q, k1 = pred_logits.shape
        target_classes = torch.full((b, q), k1 - 1, dtype=torch.int64, device=pred_logits.device)
        for i, (target, (index_q, index_t)) in enumerate(zip(targets, indices)):
            labels = target["labels"].to(pred_logits.device)
            target_classes[i, index_q.to(pred_logits.device)] = labels[index_t.to(labels.device)]
        weight = torch.ones(k1, device=pred_logits.device)
        weight[-1] = self.no_object_weight
        return F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, weight)

    def loss_masks(self, pred_masks: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                   num_masks: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """pred_masks [B, Q, h, w] -> unweighted (sigmoid BCE, dice) on uncertainty-sampled points."""
        src = torch.cat([pred_masks[i, index_q.to(pred_masks.device)] for i, (index_q, _) in enumerate(indices)])
        if src.shape[0] == 0:
            zero = pred_masks.sum() * 0.0  # keeps the graph connected (no unused parameters)
            return zero, zero.clone()
        src = src.float()[:, None]  # [M, 1, h, w]
        with torch.no_grad():
            coords = uncertain_points_with_randomness(src, self.num_points, self.oversample_ratio,
                                                      self.importance_sample_ratio, generator)  # [M, P, 2]
            labels, start = [], 0
            for target, (_, index_t) in zip(targets, indices):
                n = len(index_t)
                if n == 0:
                    continue
                masks = target["masks"].to(pred_masks.device)[index_t.to(pred_masks.device)].float()
                labels.append(point_sample(masks[:, None], coords[start:start + n])[:, 0])
                start += n
            point_labels = torch.cat(labels)  # [M, P]
        point_logits = point_sample(src, coords)[:, 0]  # [M, P]
        return sigmoid_ce_loss(point_logits, point_labels, num_masks), dice_loss(point_logits, point_labels,
                                                                                   num_masks)

    def _losses(self, out: dict, targets: list[dict], num_masks: float, suffix: str,
                generator: torch.Generator | None) -> dict[str, Tensor]:
        indices = self.matcher(out["pred_logits"], out["pred_masks"], targets, generator=generator)
        loss_mask, loss_dice = self.loss_masks(out["pred_masks"], targets, indices, num_masks, generator)
        return {
            f"loss_ce{suffix}": self.class_weight * self.loss_labels(out["pred_logits"], targets, indices),
            f"loss_mask{suffix}": self.mask_weight * loss_mask,
            f"loss_dice{suffix}": self.dice_weight * loss_dice,
        }

    def forward(self, outputs: dict, targets: list[dict],
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """
        Args:
            outputs: dict(pred_logits [B, Q, K+1], pred_masks [B, Q, h, w], aux_outputs: list of
                dicts with the same two keys (optional)). K may change from batch to batch.
            targets: B dicts with "labels" [N] long in [0, K), "masks" [N, H, W] float / bool
                (full resolution of the padded frame).
            generator: optional torch.Generator for every point draw (reproducible losses).
        Returns:
            dict of weighted scalar losses: loss_ce, loss_mask, loss_dice and, for aux output i,
            loss_ce_i, loss_mask_i, loss_dice_i.
        """
        num_masks = count_masks(targets, outputs["pred_logits"].device)
        losses = self._losses(outputs, targets, num_masks, "", generator)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self._losses(aux, targets, num_masks, f"_{i}", generator))
        return losses
