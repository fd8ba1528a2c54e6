"""The two image encoders: the SigLIP vision tower (image tokens for the LLM) and SAM's ViT image
encoder (features for the segmentation projector and the connector).

SiglipEncoder   pixels [B, 3, S, S] -> hidden_states[select_layer] [B, (S/p)^2, hidden]
SamEncoder      pixels [B, 3, I, I] -> {block: [B, I/16, I/16, embed_dim] channels-last}

Both keep their upstream parameter names (the HF SiglipVisionModel under `.model`; SAM's
`patch_embed.*`, `pos_embed`, `blocks.N.*`) so the published checkpoints load by key through
`xsam.model.weights` (`load_siglip`, `load_sam`).
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import SiglipVisionConfig, SiglipVisionModel

from xsam.model.config import SamConfig, SiglipConfig
from xsam.model.sam_attention import SdpaAttention


def siglip_vision_config(cfg: SiglipConfig) -> SiglipVisionConfig:
    """The transformers config for `cfg` (SigLIP defaults otherwise: gelu_pytorch_tanh, LN eps 1e-6,
    attention-pooling head present so a released checkpoint loads completely)."""
    return SiglipVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
    )


class SiglipEncoder(nn.Module):
    """SigLIP vision tower; returns every token of hidden layer `cfg.select_layer` (SigLIP has no CLS).

    `.model` is the transformers SiglipVisionModel (save_pretrained / load_siglip act on it). Only the
    layers up to the selected one run; the later layers, the post-layernorm and the pooling head
    exist so released checkpoints load key for key, and `unused_prefixes()` names them so a stage
    policy keeps them frozen (they never receive a gradient).
    """

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.cfg = cfg
        self.model = SiglipVisionModel(siglip_vision_config(cfg))
        # hidden_states[0] is the embedding output, so hidden_states[k] follows k layers
        self.num_layers_run = cfg.num_hidden_layers + 1 + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer
        self.gradient_checkpointing = False

    def unused_prefixes(self) -> list[str]:
        """Parameter-name prefixes (relative to this module) that never feed the output."""
        layers = [f"model.encoder.layers.{k}" for k in range(self.num_layers_run, self.cfg.num_hidden_layers)]
        return layers + ["model.post_layernorm", "model.head"]

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] (SigLIP-normalised) -> [B, cfg.num_tokens, cfg.hidden_size]."""
        size = self.cfg.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (size, size):
            raise ValueError(f"SiglipEncoder expects [B, 3, {size}, {size}], got {tuple(pixels.shape)}")
        vision = self.model  # transformers 5: embeddings / encoder / post_layernorm / head directly
        hidden = vision.embeddings(pixels)
        for layer in vision.encoder.layers[: self.num_layers_run]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, None, use_reentrant=False)
            else:
                hidden = layer(hidden, None)
        return hidden


class SamEncoder(nn.Module):
    """SAM's ViT image encoder without its neck (segment-anything's ImageEncoderViT, ViT-L sizes in the
    paper preset: relative positions, LN eps 1e-6, mlp ratio 4, windowed attention except in
    `cfg.global_attn_indexes` (0-indexed, as in segment-anything)).
    Each block's `attn` is a `SdpaAttention` (same parameter names: `blocks.N.attn.qkv.weight`, ...), which
    runs the attention through `scaled_dot_product_attention` with the relative positions as a bias.

    forward returns the channels-last output of every 1-indexed block in
    `cfg.connector_blocks + (cfg.projector_block,)`; only blocks up to the largest one are run.
    Set `gradient_checkpointing = True` to recompute each block in the backward pass (training only).
    """

    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"SAM image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        wanted = tuple(cfg.connector_blocks) + (cfg.projector_block,)
        if any(not 1 <= b <= cfg.depth for b in wanted):
            raise ValueError(f"SAM blocks {wanted} must lie in 1..{cfg.depth}")
        self.out_blocks = tuple(sorted(set(wanted)))
        vit = ImageEncoderViT(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg.window_size,
            global_attn_indexes=tuple(cfg.global_attn_indexes),
        )
        del vit.neck  # X-SAM never uses SAM's neck
        # Adopt the submodules so the parameter names are segment-anything's.
        self.patch_embed = vit.patch_embed
        self.pos_embed = vit.pos_embed
        self.blocks = vit.blocks
        for blk in self.blocks:  # same parameters, attention through SDPA (fused kernels on GPU)
            blk.attn = SdpaAttention.from_attention(blk.attn)
        self.gradient_checkpointing = False

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        """pixels [B, 3, I, I] (SAM-normalised, zero-padded) -> one [B, g, g, embed_dim] per block of
        `out_blocks`, in that order (g = I / patch). A tuple, not a dict keyed by block number:
        DeepSpeed ZeRO-3's module hooks only accept tensors, sequences or string-keyed outputs."""
        size = self.cfg.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (size, size):
            raise ValueError(f"SamEncoder expects [B, 3, {size}, {size}], got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels) + self.pos_embed  # [B, g, g, C]
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        outs: list[Tensor] = []
        for number, blk in enumerate(self.blocks[: self.out_blocks[-1]], start=1):
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
            if number in self.out_blocks:
                outs.append(x)
        return tuple(outs)

    def features(self, pixels: Tensor) -> dict[int, Tensor]:
        """{1-indexed block number: [B, g, g, embed_dim]} for every block in `out_blocks`."""
        return dict(zip(self.out_blocks, self(pixels)))
