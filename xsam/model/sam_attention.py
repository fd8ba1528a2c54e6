"""SAM ViT attention through `torch.nn.functional.scaled_dot_product_attention`.

segment-anything's `Attention.forward` materialises the scores `(q * scale) @ k^T` [B*heads, N, N], adds the
decomposed relative-position term (`add_decomposed_rel_pos`) and soft-maxes them itself. `SdpaAttention`
has the same constructor and the same parameters (`qkv`, `proj`, `rel_pos_h`, `rel_pos_w`), so the
published SAM checkpoints load by key, but passes the relative-position term to SDPA as an additive bias:

    softmax(q @ k^T * scale + bias) @ v
    bias[b, n, (i, j), (k, l)] = rel_h[b, n, i, j, k] + rel_w[b, n, i, j, l]

with rel_h / rel_w computed from the UNSCALED q, exactly as segment-anything does (it adds them after the
scale), and `scale = head_dim ** -0.5`, SDPA's default. On GPU the fused memory-efficient kernel takes the
bias (and returns its gradient), so the probabilities are never materialised; the bias itself is
[B, heads, N, N]. On CPU, PyTorch's fused (flash) kernel refuses a bias that needs a gradient, so training
there runs SDPA's math kernel (no memory saved); without autograd (inference, a frozen encoder) it is fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import Tensor


def rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_size: tuple[int, int],
                 k_size: tuple[int, int]) -> Tensor:
    """The decomposed relative-position term of MViTv2 / SAM as an additive attention bias.

    q [B, heads, q_h * q_w, head_dim] (unscaled), rel_pos_h [2 * max(q_h, k_h) - 1, head_dim] (or any length,
    then interpolated as segment-anything does), rel_pos_w likewise ->
    bias [B, heads, q_h * q_w, k_h * k_w] in q's dtype.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h)  # [q_h, k_h, head_dim]
    r_w = get_rel_pos(q_w, k_w, rel_pos_w)  # [q_w, k_w, head_dim]
    b, heads, _, dim = q.shape
    r_q = q.reshape(b, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)  # [B, heads, q_h, q_w, k_h]
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)  # [B, heads, q_h, q_w, k_w]
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, q_h * q_w, k_h * k_w)


class SdpaAttention(Attention):
    """segment-anything's `Attention` (same constructor, same parameter names and shapes) whose forward
    calls `scaled_dot_product_attention` with the relative-position term as an additive bias."""

    @classmethod
    def from_attention(cls, attn: Attention) -> SdpaAttention:
        """A `SdpaAttention` with `attn`'s configuration that takes over `attn`'s parameter tensors (same
        storage, device, dtype and requires_grad; no copy and no draw from the random generator)."""
        input_size = None
        if attn.use_rel_pos:
            input_size = ((attn.rel_pos_h.shape[0] + 1) // 2, (attn.rel_pos_w.shape[0] + 1) // 2)
        with torch.device("meta"):
            new = cls(attn.qkv.in_features, num_heads=attn.num_heads, qkv_bias=attn.qkv.bias is not None,
                      use_rel_pos=attn.use_rel_pos, input_size=input_size)
        new.qkv, new.proj = attn.qkv, attn.proj  # adopt the submodules and parameters themselves
        if attn.use_rel_pos:
            new.rel_pos_h, new.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        return new

    def forward(self, x: Tensor) -> Tensor:
        """x [B, H, W, dim] (one window or the whole grid) -> [B, H, W, dim]."""
        b, h, w, _ = x.shape
        # [B, H*W, 3, heads, head_dim] -> 3 x [B, heads, H*W, head_dim]
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # [B, heads, H*W, hd]
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))
