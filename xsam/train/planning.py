"""Training FLOPs per sample of a stage, part by part, from the model code's own facts.

A sample runs these parts (xsam.model.xsam.XSAM): S1 `sam -> pixel_decoder -> mask_decoder`; S2/S3
`sam, siglip -> projectors -> llm -> lm_head`, and for segmentation examples also
`llm -> llm_to_decoder -> mask_decoder` and `sam -> pixel_decoder -> mask_decoder`. Forward FLOPs per
part come from xsam.model.flops. Which parts train comes from the stage policy applied to the model
(built on the meta device), never from a list kept here. The backward pass of a part costs

    2 F   when its weights train (input gradients + weight gradients)
    1 F   when they are frozen but a trainable part lies upstream (input gradients only: S2's LLM)
    0     when nothing upstream trains: no autograd graph is built (S2's SAM and SigLIP run with
          frozen weights on pixels that need no gradient), so nothing is stored or recomputed

and activation checkpointing (SAM blocks, SigLIP layers, LLM layers: XSAM.enable_activation_checkpointing)
adds one forward of a checkpointed part whose backward is not 0. "model" FLOPs = forward + backward
(what MFU counts), "executed" = model + recompute.

Not counted: the loss (Hungarian matching and point-sampled mask losses over 10 predictions: ~0.15 GFLOP
per target mask, <1% of the segmentor's 0.36 TFLOP at the paper size) and elementwise work (xsam.model.flops).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from xsam.model import flops
from xsam.model.builder import build_model, resolve_config
from xsam.model.config import XSAMConfig
from xsam.model.stages import STAGES, Part, apply_policy
from xsam.train.memory import part_activations
from xsam.train.text_stats import TextStats, assumed_text


def _mean_over_lengths(cfg: XSAMConfig, text: TextStats, fn) -> float:
    return float(np.mean([fn(cfg.num_visual_tokens + n) for n in text.lengths]))


@dataclass(frozen=True)
class PartSpec:
    """One part of the model: its parameters, what feeds it, whether it is checkpointed, and its
    forward FLOPs for one example: forward(cfg, text, head) (the LLM averaged over the measured lengths)."""

    name: str
    prefixes: tuple[str, ...]  # its parameters (names in XSAM)
    upstream: tuple[str, ...]  # the parts whose outputs it consumes
    checkpointed: bool  # recomputed in the backward pass under activation checkpointing
    forward: Callable[[XSAMConfig, TextStats, str], float]
    per_item: bool = False  # runs once per decoder item (else once per example)


PARTS: dict[str, PartSpec] = {p.name: p for p in (
    PartSpec("sam", ("sam",), (), True, lambda cfg, text, head: flops.sam_forward(cfg.sam).total),
    PartSpec("siglip", ("siglip",), (), True, lambda cfg, text, head: sum(flops.siglip_forward(cfg.siglip))),
    PartSpec("image_projector", ("image_projector",), ("siglip",), False,
             lambda cfg, text, head: flops.projector_forward(cfg, 0)["image_projector"]),
    PartSpec("seg_projector", ("seg_projector",), ("sam",), False,
             lambda cfg, text, head: flops.projector_forward(cfg, 0)["seg_projector"]),
    PartSpec("embed_tokens", ("llm.model.model.embed_tokens",), (), False, lambda cfg, text, head: 0.0),  # lookup
    PartSpec("llm", ("llm.model.model.layers", "llm.model.model.norm"),
             ("image_projector", "seg_projector", "embed_tokens"), True,
             lambda cfg, text, head: _mean_over_lengths(cfg, text, lambda t: sum(flops.llm_forward(cfg.llm, t)))),
    PartSpec("lm_head", ("llm.model.lm_head",), ("llm",), False,
             lambda cfg, text, head: flops.lm_head_forward(cfg.llm, cfg.llm.vocab_size, text.labelled)),
    PartSpec("llm_to_decoder", ("llm_to_decoder",), ("llm",), False,
             lambda cfg, text, head: _mean_over_lengths(
                 cfg, text, lambda t: flops.projector_forward(cfg, t)["llm_to_decoder"])),
    PartSpec("pixel_decoder", ("segmentor.connector", "segmentor.pixel_decoder"), ("sam",), False,
             lambda cfg, text, head: flops.segmentor_forward(cfg, head, text.conditions).features),
    PartSpec("mask_decoder", ("segmentor.decoder", "segmentor.s1_head", "segmentor.cosine_head",
                              "segmentor.background"), ("pixel_decoder", "llm_to_decoder"), False,
             lambda cfg, text, head: flops.segmentor_forward(cfg, head, text.conditions).decode, per_item=True),
)}
_MLLM = ("sam", "siglip", "image_projector", "seg_projector", "embed_tokens", "llm", "lm_head")
_SEGMENT = ("llm_to_decoder", "pixel_decoder", "mask_decoder")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class StageModel:
    """The facts of a stage's model: which parts train, parameter counts (for memory)."""

    stage: str
    trains: dict[str, bool]
    trainable_params: int
    frozen_params: int
    head: str  # the class head of the mask decoder: "linear" (S1) or "cosine"


def stage_model(preset: str | XSAMConfig, stage: str) -> StageModel:
    """Build the stage's parts on the meta device, apply its policy and read what trains."""
    return _stage_model(json.dumps(resolve_config(preset).to_dict(), sort_keys=True), stage)


@functools.lru_cache(maxsize=16)
def _stage_model(cfg_json: str, stage: str) -> StageModel:
    cfg, policy = XSAMConfig.from_dict(json.loads(cfg_json)), STAGES[stage]
    with torch.device("meta"):
        model = build_model(cfg, policy.parts)
    counts = apply_policy(model, policy, model.unused_prefixes())
    named = list(model.named_parameters())
    trains = {name: any(p.requires_grad for n, p in named if _under(n, spec.prefixes))
              for name, spec in PARTS.items()}
    head = "linear" if any(p.requires_grad for n, p in named if _under(n, ("segmentor.s1_head",))) else "cosine"
    return StageModel(stage, trains, counts["trainable"], counts["frozen"], head)


def parts_run(stage: str, items: float) -> tuple[str, ...]:
    """The parts one example of `stage` runs (items: its decoder items; 0 = a chat example)."""
    parts = STAGES[stage].parts
    if Part.mllm not in parts:
        return ("sam", "pixel_decoder", "mask_decoder")
    return _MLLM + (_SEGMENT if items > 0 and Part.segmentor in parts else ())


def backward_factor(part: str, trains: dict[str, bool], run: tuple[str, ...]) -> int:
    """Backward FLOPs of `part` in units of its forward (see the module docstring)."""
    if trains[part]:
        return 2
    seen, todo = set(), list(PARTS[part].upstream)
    while todo:
        up = todo.pop()
        if up in run and up not in seen:
            if trains[up]:
                return 1
            seen.add(up)
            todo += PARTS[up].upstream
    return 0


@dataclass(frozen=True)
class PartCost:
    forward: float
    backward: float
    recompute: float


@dataclass(frozen=True)
class SampleFlops:
    """Training FLOPs of one stored sample, per part."""

    parts: dict[str, PartCost]

    @property
    def model(self) -> float:
        return sum(c.forward + c.backward for c in self.parts.values())

    @property
    def executed(self) -> float:
        return self.model + sum(c.recompute for c in self.parts.values())

    @property
    def forward(self) -> float:
        return sum(c.forward for c in self.parts.values())


S1_TEXT = TextStats(1, (0.0,), 0, 1, 0, "S1: no text, one decoder item per image")
_DEFAULT_SOURCE = {"s2": "llava_pretrain_558k", "s3": "coco_panoptic"}


def sample_flops(preset: str | XSAMConfig, stage: str, activation_checkpointing: bool = False,
                 text: TextStats | None = None) -> SampleFlops:
    """FLOPs of one stored training sample of `stage`, per part. preset: a name or an XSAMConfig.
    text: the source's TextStats (S2 / S3; default: the assumption for LCS-558K in S2 and COCO panoptic
    in S3); S1 has none."""
    cfg, sm = resolve_config(preset), stage_model(preset, stage)
    if stage == "s1":
        text = S1_TEXT
    elif text is None:
        text = assumed_text(_DEFAULT_SOURCE[stage], stage)
    run = parts_run(stage, text.items)
    out = {}
    for part in run:
        f = PARTS[part].forward(cfg, text, sm.head) * text.examples * (text.items if PARTS[part].per_item else 1)
        back = backward_factor(part, sm.trains, run) * f
        again = f if activation_checkpointing and PARTS[part].checkpointed and back > 0 else 0.0
        out[part] = PartCost(f, back, again)
    return SampleFlops(out)


def activation_bytes(preset: str | XSAMConfig, stage: str, text: TextStats | None, batch: int, activation_checkpointing: bool,
                     tokens: int | None = None) -> float:
    """Activation bytes of one micro-batch of `batch` stored samples (xsam.train.memory: measured per part
    on the meta device). tokens: force every example's LLM sequence length (e.g. the 4096 limit); default:
    num_visual_tokens + the source's longest measured (or assumed) text."""
    cfg, sm = resolve_config(preset), stage_model(preset, stage)
    text = S1_TEXT if stage == "s1" else text or assumed_text(_DEFAULT_SOURCE[stage], stage)
    seq = tokens or cfg.num_visual_tokens + int(max(text.lengths))
    run = parts_run(stage, text.items)
    per_example = 0.0
    for part in run:
        if backward_factor(part, sm.trains, run) == 0:
            continue  # no graph through it: nothing kept
        saved = part_activations(cfg, part, sm.trains[part], tokens=seq, head=sm.head,
                                 conditions=text.conditions, labelled=text.labelled)
        keep = saved.checkpointed if activation_checkpointing and PARTS[part].checkpointed else saved.total
        per_example += keep * (text.items if PARTS[part].per_item else 1)
    return per_example * text.examples * batch


def train_flops_per_sample(preset: str | XSAMConfig, stage: str, activation_checkpointing: bool = False,
                           text: TextStats | None = None) -> float:
    """Model FLOPs (forward + backward, no recompute: what MFU counts) of one training sample; see
    `sample_flops` for the arguments and the per-part figures."""
    return sample_flops(preset, stage, activation_checkpointing, text).model


def implied_mfu(flops_total: float, hours: float, gpus: int, peak: float) -> float:
    """The model FLOPs utilisation a run of `flops_total` in `hours` on `gpus` GPUs of `peak` FLOP/s means."""
    return flops_total / (hours * 3600 * gpus * peak)
