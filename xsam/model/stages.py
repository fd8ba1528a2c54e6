"""The three training stages as data: which parts exist, which train, at which learning-rate
multiplier (reference section 2). A trainer reads `param_groups(model, policy, lr, wd)`.

    S1 segmentor fine-tune : SAM encoder (lr x0.1), connector, pixel + transformer decoder, linear
                             134-way head. No LLM, no SigLIP.
    S2 alignment           : only the two projectors; the LLM (embedding and LM head included),
                             SigLIP and SAM frozen, as the reference (freeze_llm=True). No decoder.
    S3 mixed fine-tune     : everything; SigLIP and SAM at lr x0.1. The S1 linear head is dropped,
                             the cosine head and latent background start fresh.

Rules are matched by parameter-name prefix, first match wins; a parameter no rule matches is a
bug in the policy and raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn


class Part(str, Enum):
    """Groups of modules a stage builds (see xsam.model.xsam.XSAM)."""

    segmentor = "segmentor"  # connector, pixel decoder, transformer decoder, heads
    mllm = "mllm"  # SigLIP, projectors, LLM, LLM->decoder projector


@dataclass(frozen=True)
class Rule:
    prefix: str
    trainable: bool
    lr_mult: float = 1.0


@dataclass(frozen=True)
class StagePolicy:
    name: str
    parts: frozenset[Part]
    rules: tuple[Rule, ...]
    # what the stage exports for the next one (prefixes); S1 leaves its linear head out, so S3's
    # cosine head and latent background start fresh, as the reference says
    exports: tuple[str, ...]

    def rule_for(self, param_name: str) -> Rule:
        for rule in self.rules:
            if param_name == rule.prefix or param_name.startswith(rule.prefix + "."):
                return rule
        raise KeyError(f"stage {self.name}: no rule covers parameter {param_name!r}")


S1 = StagePolicy(
    name="s1",
    parts=frozenset({Part.segmentor}),
    rules=(
        Rule("sam", True, 0.1),
        Rule("segmentor.cosine_head", False),  # built, unused until S3
        Rule("segmentor.background", False),
        Rule("segmentor", True, 1.0),  # connector, pixel decoder, transformer decoder, s1_head
    ),
    exports=("sam", "segmentor.connector", "segmentor.pixel_decoder", "segmentor.decoder"),
)

S2 = StagePolicy(
    name="s2",
    parts=frozenset({Part.mllm}),
    rules=(
        Rule("image_projector", True),
        Rule("seg_projector", True),
        Rule("llm", False),  # embedding and LM head included (reference S2: freeze_llm=True)
        Rule("siglip", False),
        Rule("sam", False),
        Rule("llm_to_decoder", False),  # built, trained from S3 on
    ),
    # the frozen embedding rows of the added special tokens go along, so S3 starts from the rows the
    # projectors were aligned against
    exports=("image_projector", "seg_projector", "llm.model.model.embed_tokens", "llm.model.lm_head"),
)

S3 = StagePolicy(
    name="s3",
    parts=frozenset({Part.segmentor, Part.mllm}),
    rules=(
        Rule("siglip", True, 0.1),
        Rule("sam", True, 0.1),
        Rule("segmentor.s1_head", False),  # dropped: the cosine head replaces it
        Rule("segmentor", True),
        Rule("image_projector", True),
        Rule("seg_projector", True),
        Rule("llm_to_decoder", True),
        Rule("llm", True),
    ),
    exports=("",),  # everything
)

STAGES = {p.name: p for p in (S1, S2, S3)}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def apply_policy(model: nn.Module, policy: StagePolicy, unused: tuple[str, ...] = ()) -> dict[str, int]:
    """Set requires_grad per the rules; parameters under `unused` (never on the forward path, e.g.
    SigLIP's layers after the selected one) stay frozen whatever the rule. Returns the counts."""
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        trainable = policy.rule_for(name).trainable and not _under(name, unused)
        param.requires_grad_(trainable)
        counts["trainable" if trainable else "frozen"] += param.numel()
    return counts


def param_groups(model: nn.Module, policy: StagePolicy, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups (after `apply_policy`), one per learning-rate multiplier; weight
    decay applies to every trainable parameter, norms and biases included (reference S3; S2 uses 0)."""
    groups: dict[float, list] = {}
    names: dict[float, list[str]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            mult = policy.rule_for(name).lr_mult
            groups.setdefault(mult, []).append(param)
            names.setdefault(mult, []).append(name)
    return [{"params": params, "lr": lr * mult, "weight_decay": weight_decay, "lr_mult": mult,
             "names": names[mult]} for mult, params in sorted(groups.items())]
