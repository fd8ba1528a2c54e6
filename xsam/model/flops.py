"""Forward FLOPs of every X-SAM module for one image / one sequence, from the preset's sizes.

Convention: a multiply-add is 2 FLOPs; only matrix products, convolutions, attention and bilinear
sampling are counted (norms, activations, softmax and other elementwise work are not), as
`torch.utils.flop_counter.FlopCounterMode` counts them. The encoders and the LLM are counted from
formulas (below); the segmentor is counted by FlopCounterMode on the module itself, built on the meta
device and run at the preset's shapes. Tests check the formulas against the counter on small presets.

    SAM ViT (grid g = I/p, N = g^2 tokens, width C, window w, n_w = ceil(g/w)^2 windows of w^2 tokens,
    windowed blocks work on the zero-padded grid N_p = n_w w^2 tokens in their attention):
        patch embedding   2 N C 3 p^2
        per block         qkv + proj  8 N_a C^2      (N_a = N_p windowed, N global)
                          MLP         16 N C^2       (ratio 4)
                          attention   4 n T^2 C      (QK^T and AV over all heads; n windows of T tokens:
                                                      n_w of w^2 windowed, 1 of N global)
                          rel. pos.   2 N_a (k_h + k_w) C  (the two decomposed einsums, k = w or g)
        blocks run: up to the deepest block the model reads (SamEncoder.out_blocks)
    SigLIP (N tokens, width D, MLP I): patch 2 N D 3 p^2; per layer 8 N D^2 + 4 N D I + 4 N^2 D;
        only the layers up to `select_layer` run.
    LLM (Phi-3: fused qkv with kv width K = kv_heads * head_dim, SwiGLU MLP I), T tokens:
        per layer 2 T D (2 D + 2 K) + 6 T D I + attention; attention = 2 D T (T + 1) causal (each
        query attends to the keys before it: sum over t of 4 D (t + 1)), 4 D T^2 if not causal.
        LM head: 2 D V per labelled token (the model computes logits only where labels exist).
    MLP projectors: 2 T (in * hidden + hidden * out).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from xsam.model.config import LLMConfig, SamConfig, SiglipConfig, XSAMConfig
from xsam.model.xsam import Segmentor


def _sam_out_blocks(cfg: SamConfig) -> int:
    return max(tuple(cfg.connector_blocks) + (cfg.projector_block,))


@dataclass(frozen=True)
class SamFlops:
    """Forward FLOPs of one SAM image, by kind."""

    linear: float  # patch embedding, qkv, proj, MLP
    window_attention: float
    global_attention: float
    rel_pos: float

    @property
    def attention(self) -> float:
        return self.window_attention + self.global_attention

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.rel_pos


def sam_forward(cfg: SamConfig) -> SamFlops:
    """One image through SAM's ViT, blocks 1..max(out_blocks)."""
    g, c, w = cfg.grid, cfg.embed_dim, cfg.window_size
    n = g * g
    n_win = math.ceil(g / w) ** 2 if w > 0 else 0
    n_pad = n_win * w * w
    linear = 2 * n * c * 3 * cfg.patch_size ** 2
    win_att = glob_att = rel = 0.0
    for index in range(_sam_out_blocks(cfg)):  # 0-indexed, as global_attn_indexes
        is_global = w == 0 or index in cfg.global_attn_indexes
        n_att = n if is_global else n_pad
        linear += 8 * n_att * c * c + 16 * n * c * c
        if is_global:
            glob_att += 4 * n * n * c
            rel += 2 * n_att * (2 * g) * c
        else:
            win_att += n_win * 4 * (w * w) ** 2 * c
            rel += 2 * n_att * (2 * w) * c
    return SamFlops(linear, win_att, glob_att, rel)


def siglip_layers_run(cfg: SiglipConfig) -> int:
    """Encoder layers that run: hidden_states[select_layer] follows this many layers."""
    return cfg.num_hidden_layers + 1 + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer


def siglip_forward(cfg: SiglipConfig) -> tuple[float, float]:
    """One image through SigLIP up to the selected layer -> (linear FLOPs, attention FLOPs)."""
    n, d, i = cfg.num_tokens, cfg.hidden_size, cfg.intermediate_size
    layers = siglip_layers_run(cfg)
    linear = 2 * n * d * 3 * cfg.patch_size ** 2 + layers * (8 * n * d * d + 4 * n * d * i)
    return linear, layers * 4 * n * n * d


def llm_forward(cfg: LLMConfig, tokens: float, causal: bool = True) -> tuple[float, float]:
    """One sequence of `tokens` through the decoder layers (no LM head) -> (linear, attention) FLOPs."""
    d, t = cfg.hidden_size, tokens
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    linear = cfg.num_hidden_layers * (2 * t * d * (2 * d + 2 * kv) + 6 * t * d * cfg.intermediate_size)
    attention = cfg.num_hidden_layers * (2 * d * t * (t + 1) if causal else 4 * d * t * t)
    return linear, attention


def lm_head_forward(cfg: LLMConfig, vocab: int, labelled_tokens: float) -> float:
    return 2 * cfg.hidden_size * vocab * labelled_tokens


def mlp_forward(tokens: float, in_dim: int, hidden: int, out_dim: int) -> float:
    return 2 * tokens * (in_dim * hidden + hidden * out_dim)


def projector_forward(cfg: XSAMConfig, llm_tokens: float) -> dict[str, float]:
    """The three MLP projectors: image (SigLIP tokens), segmentation (SAM tokens after pixel shuffle)
    and LLM -> decoder (applied to every hidden state of the sequence)."""
    dim = cfg.llm.hidden_size
    return {
        "image_projector": mlp_forward(cfg.siglip.num_tokens, cfg.siglip.hidden_size, dim, dim),
        "seg_projector": mlp_forward(cfg.sam.num_tokens, 4 * cfg.sam.embed_dim, dim, dim),
        "llm_to_decoder": mlp_forward(llm_tokens, dim, cfg.decoder.hidden_dim, cfg.decoder.hidden_dim),
    }


# --------------------------------------------------------------------------- the segmentor, counted
def _grid_sample_flop(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    """Bilinear sampling: 4 taps, one multiply-add each, per output element (FlopCounterMode has no
    formula for grid_sample; the deformable attention of the pixel decoder runs on it)."""
    return 8 * math.prod(out_shape)


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash-attention kernel, counted as FlopCounterMode counts the CUDA ones (QK^T and AV in
    full: the counter ignores causal masking)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


COUNTER_MAPPING = {torch.ops.aten.grid_sampler_2d: _grid_sample_flop,
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def counted(fn, *args, **kwargs) -> tuple[object, float]:
    """Run fn(*args, **kwargs) under FlopCounterMode (grid_sample included) -> (result, FLOPs)."""
    counter = FlopCounterMode(display=False, custom_mapping=COUNTER_MAPPING)
    with counter:
        result = fn(*args, **kwargs)
    return result, float(counter.get_total_flops())


@dataclass(frozen=True)
class SegmentorFlops:
    """Forward FLOPs of the segmentor: `features` once per image (connector + pixel decoder),
    `decode` once per decoder item (masked-attention decoder, mask embeddings, the class head)."""

    features: float
    decode: float


@functools.lru_cache(maxsize=32)
def _segmentor_forward(cfg_json: str, head: str, conditions: int) -> SegmentorFlops:
    cfg = XSAMConfig.from_dict(json.loads(cfg_json))
    g, c, d = cfg.sam.grid, cfg.sam.embed_dim, cfg.decoder.hidden_dim
    with torch.device("meta"):
        seg = Segmentor(cfg)
        feats = {b: torch.empty(1, g, g, c) for b in seg.blocks}
        (mask_features, multi_scale), features = counted(seg.features, feats)
        if head == "linear":
            classify, bias = seg.s1_head, None
        elif head == "cosine":
            cond, cond_mask = torch.empty(1, conditions, d), torch.ones(1, conditions, dtype=torch.bool)
            classify, bias = functools.partial(seg.cosine, cond=cond, cond_mask=cond_mask), torch.empty(1, d)
        else:
            raise ValueError(f"head must be 'linear' or 'cosine', not {head!r}")
        _, decode = counted(seg.decode, mask_features, multi_scale, classify, bias)
    return SegmentorFlops(features, decode)


def segmentor_forward(cfg: XSAMConfig, head: str, conditions: float = 1) -> SegmentorFlops:
    """Count the segmentor on the meta device at the preset's shapes. head: "linear" (S1, the
    num_s1_classes + 1 way head) or "cosine" (S3, `conditions` classes + background; the count is affine
    in them, so it is made at 1 and 2 classes and extended along the line)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    one = _segmentor_forward(key, head, 1)
    if head != "cosine":
        return one
    two = _segmentor_forward(key, head, 2)
    return SegmentorFlops(one.features, one.decode + (conditions - 1) * (two.decode - one.decode))
