"""Hungarian matching of predicted queries to target masks (Mask2Former style).

Cost of pairing query q with target t:
    cost_class * (-softmax(pred_logits[q])[label_t])
  + cost_mask  * mean over points of sigmoid BCE(pred_mask[q], target_mask[t])
  + cost_dice  * (1 - (2 sum(p * t) + 1) / (sum p + sum t + 1))
with the masks read at `num_points` points drawn uniformly per image (the same points for every
query and target of that image). Solved with scipy's linear_sum_assignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from xsam.model.point_sampling import point_sample, uniform_points

__all__ = ["HungarianMatcher", "pairwise_dice", "pairwise_sigmoid_ce", "point_sample"]


def pairwise_sigmoid_ce(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE of every (prediction, target) pair.

    inputs: [Q, P] logits; targets: [N, P] in [0, 1] -> [Q, N].
    """
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1.0 - targets).T) / num_points


def pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice loss (+1 smoothing) of every pair. inputs: [Q, P] logits; targets: [N, P] -> [Q, N]."""
    probs = inputs.sigmoid()
    numerator = 2.0 * (probs @ targets.T)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the weighted class + mask + dice cost."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, masks: Tensor, labels: Tensor, target_masks: Tensor,
                    coords: Tensor) -> Tensor:
        """Cost of every (query, target) pair of ONE image.

        Args:
            logits: [Q, K+1] class logits (last = background).
            masks: [Q, h, w] mask logits.
            labels: [N] long in [0, K).
            target_masks: [N, H, W] float / bool (any resolution; read at the same normalised points).
            coords: [P, 2] (x, y) points in [0, 1].
        Returns:
            [Q, N] float32 cost.
        """
        cost_class = -logits.float().softmax(-1)[:, labels]  # [Q, N]
        pts = coords[None].float()  # [1, P, 2]
        pred = point_sample(masks[None].float(), pts)[0]  # [Q, P]
        tgt = point_sample(target_masks[None].float(), pts)[0]  # [N, P]
        return (self.cost_class * cost_class + self.cost_mask * pairwise_sigmoid_ce(pred, tgt)
                + self.cost_dice * pairwise_dice(pred, tgt))

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_masks: Tensor, targets: list[dict],
                generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            pred_logits: [B, Q, K+1] class logits.
            pred_masks: [B, Q, h, w] mask logits.
            targets: B dicts with "labels" [N] long in [0, K) and "masks" [N, H, W] float / bool.
            generator: optional torch.Generator for the uniform points (one draw of [num_points, 2]
                per image, in batch order).
        Returns:
            B pairs (index_q [n] long, index_t [n] long) on the CPU, n = min(Q, N), index_q sorted.
        """
        if pred_logits.shape[0] != len(targets) or pred_masks.shape[0] != len(targets):
            raise ValueError(f"batch of {pred_logits.shape[0]} predictions but {len(targets)} targets")
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            coords = uniform_points(1, self.num_points, pred_masks.device, generator)[0]
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels.to(pred_logits.device),
                                    target["masks"].to(pred_masks.device), coords)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
