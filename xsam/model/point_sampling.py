"""Point sampling shared by the Hungarian matcher and the set criterion.

Mask losses in Mask2Former are not computed on whole masks but on a few thousand points: the
matcher uses points drawn uniformly, the criterion uses PointRend's uncertainty-based selection
(most points where the prediction is least certain, the rest uniform). Points are normalised
(x, y) coordinates in [0, 1] of the whole frame, so predictions at stride 8 and targets at full
resolution are read at the same places.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinearly read `input` at normalised points.

    Args:
        input: [B, C, H, W] feature maps (any float dtype).
        coords: [B, P, 2] (x, y) in [0, 1]; (0, 0) is the top-left corner of the top-left pixel
            (align_corners=False convention, as grid_sample).
    Returns:
        [B, C, P] sampled values (zeros outside the frame).
    """
    if input.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"point_sample expects [B,C,H,W] and [B,P,2], got {tuple(input.shape)}, "
                         f"{tuple(coords.shape)}")
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(input.dtype)  # [B, P, 1, 2] in [-1, 1]
    out = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    return out.squeeze(3)  # [B, C, P]


def uniform_points(n: int, num_points: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> Tensor:
    """[n, num_points, 2] uniform points in [0, 1] (x, y)."""
    return torch.rand(n, num_points, 2, device=device, generator=generator)


def logit_uncertainty(logits: Tensor) -> Tensor:
    """PointRend uncertainty of mask logits: -|logit| (highest at the decision boundary). Shape kept."""
    return -logits.abs()


def uncertain_points_with_randomness(logits: Tensor, num_points: int, oversample_ratio: float = 3.0,
                                     importance_sample_ratio: float = 0.75,
                                     generator: torch.Generator | None = None) -> Tensor:
    """PointRend training-time point selection.

    Draws int(num_points * oversample_ratio) uniform candidates, keeps the
    int(importance_sample_ratio * num_points) most uncertain ones (uncertainty = -|logit| read at
    the candidates), and fills the rest with fresh uniform points.

    Args:
        logits: [N, 1, h, w] mask logits (one channel; the class-agnostic prediction).
        generator: optional torch.Generator making the selection reproducible.
    Returns:
        [N, num_points, 2] (x, y) in [0, 1]. Not differentiable (meant for use under no_grad).
    """
    if oversample_ratio < 1:
        raise ValueError("oversample_ratio must be >= 1")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError("importance_sample_ratio must be in [0, 1]")
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = uniform_points(n, num_sampled, logits.device, generator)  # [N, S, 2]
    values = point_sample(logits.float(), candidates)  # [N, 1, S]
    uncertainty = logit_uncertainty(values)[:, 0, :]  # [N, S]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = uncertainty.topk(num_uncertain, dim=1).indices  # [N, U]
    chosen = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))  # [N, U, 2]
    if num_random > 0:
        chosen = torch.cat([chosen, uniform_points(n, num_random, logits.device, generator)], dim=1)
    return chosen
