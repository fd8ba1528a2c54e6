"""Per-GPU memory of a training stage: weights, gradients, optimizer state, activations.

Model states (bf16 weights, DeepSpeed ZeRO stage z over N ranks, AdamW; P = all parameters, P_t the
trainable ones; bytes):

    weights     2 P                         z < 3      2 P / N + 2 * max_live   z = 3 (gathered working set)
    gradients   2 P_t (bf16)                z <= 1     2 P_t / N + 4 P_t / N    z >= 2 (bf16 partition + its fp32
                + 4 P_t / N fp32 copy at the step for z = 1;  z = 0: 4 P_t (fp32 accumulation, BF16_Optimizer)
    optimizer   12 P_t / N (fp32 master, exp_avg, exp_avg_sq)   z >= 1;  12 P_t  z = 0
    buckets     2 reduce_bucket, x2 with overlap_comm (z >= 1; the contiguous-gradient buffer, bf16 elements)

Activations are what autograd keeps for the backward pass, MEASURED: each part is built on the meta device
in bf16 at the paper shapes and run forward for one example under `torch.autograd.graph.saved_tensors_hooks`;
the unique storages it saves (parameters excluded) are summed. Attention goes through a stand-in for the
fused SDPA kernels (flash / memory-efficient), which save q, k, v, the output, the fp32 log-sum-exp and an
additive bias when one is given (SAM's relative positions, the decoder's masks) - not the probabilities,
which the CPU / meta math path would save. Per part and example:

    no checkpointing   A = every saved byte
    checkpointing      A = (bytes saved outside the layers) + sum over layers of the layer's input
                           + the largest single layer's saved bytes (recomputed one at a time)

and a micro-batch holds batch x examples of them (decoder parts x items). A part whose backward is 0 (no
trainable part at or before it) keeps nothing. Not counted: the loss (targets at the SAM size, point
samples), transient forward buffers, the allocator's fragmentation - `OVERHEAD` stands for those and the
CUDA / NCCL context.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from xsam.model.config import XSAMConfig
from xsam.model.encoders import SamEncoder, SiglipEncoder
from xsam.model.llm import XSamLLM
from xsam.model.projectors import MLPProjector, SegProjector
from xsam.model.xsam import Segmentor

GiB = 2 ** 30
OVERHEAD = 3 * GiB  # CUDA context + NCCL buffers + allocator fragmentation (assumed)


# --------------------------------------------------------------------------- measuring saved tensors
class _FusedSdpa(torch.autograd.Function):
    """What a fused SDPA kernel keeps for backward (the forward is shape-only: meta tensors)."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(*(t for t in (q, k, v, out, lse, bias) if t is not None))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run: only the saved tensors are measured
        raise NotImplementedError


class FusedAttention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention through `_FusedSdpa` (a boolean mask is kept as it is given)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            bias = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            return _FusedSdpa.apply(q, k, v, bias)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Saved:
    """Bytes autograd keeps for one example of a part (see the module docstring)."""

    total: float  # without checkpointing
    checkpointed: float  # with the part's layers checkpointed


def saved_bytes(module: nn.Module, fn, layers: list[nn.Module] = ()) -> Saved:
    """Run fn() (a forward through `module`) and sum the unique storages saved for backward."""
    exclude = {p.untyped_storage()._cdata for p in module.parameters()}
    exclude |= {b.untyped_storage()._cdata for b in module.buffers()}
    sizes: dict[int, int] = {}
    owner: dict[int, int | None] = {}
    inputs: dict[int, int] = {}
    current: list[int | None] = [None]

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in exclude and s._cdata not in sizes:
            sizes[s._cdata], owner[s._cdata] = s.nbytes(), current[0]
        return t

    def enter(index):
        def hook(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            inputs[index] = x.untyped_storage().nbytes()
            current[0] = index
        return hook

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(lambda *a: current.__setitem__(0, None)) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FusedAttention():
            fn()
    finally:
        for h in handles:
            h.remove()
    per_layer = [sum(n for s, n in sizes.items() if owner[s] == i) for i in range(len(layers))]
    outside = sum(n for s, n in sizes.items() if owner[s] is None)
    total = float(sum(sizes.values()))
    if not layers or not total:  # nothing saved: no graph, nothing to checkpoint either
        return Saved(total, total)
    return Saved(total, float(outside + sum(inputs.values()) + max(per_layer)))


def _prepare(module: nn.Module, train: bool) -> nn.Module:
    module.to(torch.bfloat16).train()
    for p in module.parameters():
        p.requires_grad_(train)
    return module


def _x(*shape, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.bfloat16, requires_grad=grad)


# --------------------------------------------------------------------------- the parts, one example each
# each: (cfg, train, head, tokens, conditions, labelled) -> Saved, run on the meta device
def _sam(cfg: XSAMConfig, train: bool, *_) -> Saved:
    m, size = _prepare(SamEncoder(cfg.sam), train), cfg.sam.image_size
    return saved_bytes(m, lambda: m(_x(1, 3, size, size, grad=not train)), list(m.blocks[: m.out_blocks[-1]]))


def _siglip(cfg: XSAMConfig, train: bool, *_) -> Saved:
    m, size = _prepare(SiglipEncoder(cfg.siglip), train), cfg.siglip.image_size
    return saved_bytes(m, lambda: m(_x(1, 3, size, size, grad=not train)),
                       list(m.model.encoder.layers[: m.num_layers_run]))


def _image_projector(cfg: XSAMConfig, train: bool, *_) -> Saved:
    m = _prepare(MLPProjector(cfg.siglip.hidden_size, cfg.llm.hidden_size), train)
    return saved_bytes(m, lambda: m(_x(1, cfg.siglip.num_tokens, cfg.siglip.hidden_size, grad=not train)))


def _seg_projector(cfg: XSAMConfig, train: bool, *_) -> Saved:
    m, g = _prepare(SegProjector(cfg.sam.embed_dim, cfg.llm.hidden_size), train), cfg.sam.grid
    return saved_bytes(m, lambda: m(_x(1, g, g, cfg.sam.embed_dim, grad=not train)))


def _embed_tokens(*_) -> Saved:
    return Saved(0.0, 0.0)  # a lookup keeps only its integer ids


def _lm_head(cfg: XSAMConfig, train: bool, head, tokens, conditions, labelled: int) -> Saved:
    """Logits at the labelled positions, in fp32 for the cross-entropy (XSamLLM.forward)."""
    m = _prepare(nn.Linear(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False), train)
    target = torch.zeros(labelled, dtype=torch.long)
    return saved_bytes(m, lambda: F.cross_entropy(m(_x(labelled, cfg.llm.hidden_size, grad=True)).float(), target))


def _llm_to_decoder(cfg: XSAMConfig, train: bool, head, tokens: int, *_) -> Saved:
    dim, out = cfg.llm.hidden_size, cfg.decoder.hidden_dim
    m = _prepare(MLPProjector(dim, out, hidden_dim=out), train)
    return saved_bytes(m, lambda: m(_x(1, tokens, dim, grad=True)))


def _llm(cfg: XSAMConfig, train: bool, head, tokens: int, *_) -> Saved:
    """The decoder layers as Phi3Model.forward runs them (causal SDPA, no padding mask)."""
    llm = XSamLLM(cfg.llm, cfg.llm.vocab_size)
    inner = _prepare(llm.model.model, train)
    layers = list(inner.layers[: cfg.llm.num_hidden_layers])

    def run():
        h = _x(1, tokens, cfg.llm.hidden_size, grad=True)  # the projectors / embeddings upstream train
        pos = torch.arange(tokens)[None]
        rope = inner.rotary_emb(h, position_ids=pos)
        for layer in layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
        return inner.norm(h)

    return saved_bytes(inner, run, layers)


def _segmentor_inputs(cfg: XSAMConfig, train: bool) -> tuple[Segmentor, dict]:
    g = cfg.sam.grid
    seg = _prepare(Segmentor(cfg), train)
    return seg, {b: _x(1, g, g, cfg.sam.embed_dim, grad=True) for b in seg.blocks}


def _pixel_decoder(cfg: XSAMConfig, train: bool, *_) -> Saved:
    """Connector + pixel decoder, once per example."""
    seg, feats = _segmentor_inputs(cfg, train)
    return saved_bytes(seg, lambda: seg.features(feats))


def _mask_decoder(cfg: XSAMConfig, train: bool, head: str, tokens, conditions: int, *_) -> Saved:
    """Masked-attention decoder + class head, once per decoder item."""
    seg, feats = _segmentor_inputs(cfg, train)
    d = cfg.decoder.hidden_dim
    with torch.no_grad():
        mask_features, multi_scale = seg.features(feats)
    mask_features.requires_grad_(True)
    for m in multi_scale:
        m.requires_grad_(True)
    if head == "linear":
        classify, bias = seg.s1_head, None
    else:
        cond, keep = _x(1, conditions, d, grad=True), torch.ones(1, conditions, dtype=torch.bool)
        classify, bias = functools.partial(seg.cosine, cond=cond, cond_mask=keep), _x(1, d, grad=True)
    return saved_bytes(seg, lambda: seg.decode(mask_features, multi_scale, classify, bias))


_MEASURE = {"sam": _sam, "siglip": _siglip, "image_projector": _image_projector, "seg_projector": _seg_projector,
            "embed_tokens": _embed_tokens, "llm": _llm, "lm_head": _lm_head, "llm_to_decoder": _llm_to_decoder,
            "pixel_decoder": _pixel_decoder, "mask_decoder": _mask_decoder}


@functools.lru_cache(maxsize=128)
def _part(cfg_json: str, part: str, train: bool, head: str, tokens: int, conditions: int, labelled: int) -> Saved:
    if part not in _MEASURE:
        raise KeyError(f"no activation measurement for part {part!r}")
    with torch.device("meta"):
        return _MEASURE[part](XSAMConfig.from_dict(json.loads(cfg_json)), train, head, tokens, conditions, labelled)


# the size a part's saved bytes grow with, and the two sizes it is measured at
_GROWS_WITH = {"llm": ("tokens", 64), "llm_to_decoder": ("tokens", 64), "lm_head": ("labelled", 1),
               "mask_decoder": ("conditions", 1)}


def part_activations(cfg: XSAMConfig, part: str, train: bool, tokens: float = 0, head: str = "cosine",
                     conditions: float = 1, labelled: float = 1) -> Saved:
    """Saved bytes of one example of `part` (train: its weights train; else only input gradients flow).
    tokens: the LLM sequence length (llm, llm_to_decoder); labelled: LM-head tokens; conditions: cosine-head
    classes. The bytes are affine in these (fused attention keeps no T^2 term), so a part is measured at two
    sizes p and 2p and extended along the line: the measurements are shape-only and cached."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    sizes = {"tokens": 64, "conditions": 1, "labelled": 1}
    if part not in _GROWS_WITH:
        return _part(key, part, train, head, **sizes)
    name, p = _GROWS_WITH[part]
    a = _part(key, part, train, head, **{**sizes, name: p})
    b = _part(key, part, train, head, **{**sizes, name: 2 * p})
    x = {"tokens": tokens, "conditions": conditions, "labelled": labelled}[name]
    return Saved(a.total + (x - p) / p * (b.total - a.total),
                 a.checkpointed + (x - p) / p * (b.checkpointed - a.checkpointed))


# --------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class StateBytes:
    weights: float
    gradients: float
    optimizer: float
    buckets: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buckets


def state_bytes(trainable: int, frozen: int, zero_stage: int, world: int, *, reduce_bucket: int = 500_000_000,
                overlap_comm: bool = False, max_live_parameters: int = 1_000_000_000) -> StateBytes:
    """Weights, gradients, optimizer state and communication buckets per GPU (formulas in the docstring)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    p, pt, n = trainable + frozen, trainable, world
    weights = 2 * p / n + 2 * min(max_live_parameters, p) if zero_stage == 3 else 2 * p
    if zero_stage == 0:
        grads, optim = 2 * pt + 4 * pt, 12 * pt
    elif zero_stage == 1:
        grads, optim = 2 * pt + 4 * pt / n, 12 * pt / n
    else:
        grads, optim = 6 * pt / n, 12 * pt / n
    buckets = 2 * min(reduce_bucket, pt) * (2 if overlap_comm else 1) if zero_stage >= 1 else 0.0
    return StateBytes(float(weights), float(grads), float(optim), float(buckets))
