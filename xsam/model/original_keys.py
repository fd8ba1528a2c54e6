"""The original X-SAM checkpoint keys -> this project's keys, as data, with the tensor transforms.

The published checkpoints (inits/X-SAM/{s1_seg_finetune,s2_align_pretrain,s3_mixed_finetune}/<cfg>/
pytorch_model.bin) are `torch.save`d state dicts of the authors' model (branch AAAI26_Archive). Their
keys differ from this project's by name only, except in three places where a tensor changes:

    concat_qkv            the transformer decoder's self-attention keeps q / k / v projections apart
                          (`...self_attn.{q,k,v}_proj.{weight,bias}`); the project's nn.MultiheadAttention
                          holds them as one `in_proj_{weight,bias}` = cat(q, k, v) along dim 0.
    pixel_shuffle_groups  connector level 0 (scale 2) ends in a pixel shuffle that the original reads
                          with channel group g = 2*dx + dy and the project with g = 2*dy + dx
                          (xsam.model.pixel_shuffle); the 4 output-channel groups of `levels.0.4.weight`
                          and `levels.0.5.{weight,bias}` (the LayerNorm after it) are reordered [0, 2, 1, 3]
                          (its own inverse).
    vocab_rows            rows of `embed_tokens` / `lm_head` are placed by token (see `vocab_row_map`).

`RULES` is the table: (original pattern, project pattern[, transform]), tried in order, first match
wins, in BOTH directions (`to_project` for importing, `to_original` for the inverse the tests use to
build checkpoints in the original's names). Pattern placeholders:

    {name}          one or more digits (a layer index)
    {name:a|b|c}    one of the listed words
    {name*}         the rest of the key (anything, dots included)

A placeholder present on the original side only (the `{part:q|k|v}` of `concat_qkv`) makes the rule
many-to-one: its alternatives, in the listed order, are the parts that are concatenated.

`DROPPED` are original keys left out on purpose: SAM's neck (the project uses SAM's block outputs,
not the neck; 6 keys) and `shared_image_embedding` (SAM's prompt-encoder positional table, unused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

# --------------------------------------------------------------------------- the table
P = "{p:weight|bias}"  # the parameter of a Linear / Conv / norm
ENC = "segmentor.pixel_decoder.encoder.layers.{n}"  # Deformable-DETR encoder layers (same prefix both sides)
DEC = "segmentor.decoder.decoder.layers.{n}"  # original masked-attention decoder layers
ORIGINAL_ADDED_TOKENS = ("<SEG>", "<p>", "</p>")  # appended by the original to the base vocabulary, in this order
VOCAB_KEYS = ("llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight")  # project keys, rows by token

# (original, project[, transform])
TABLE: tuple[tuple[str, ...], ...] = (
    # LLM (Phi3ForCausalLM): one more `model.` level in the project; vocabulary rows placed by token
    ("llm.model.embed_tokens.weight", "llm.model.model.embed_tokens.weight", "vocab_rows"),
    ("llm.lm_head.weight", "llm.model.lm_head.weight", "vocab_rows"),
    ("llm.{m:model|lm_head}.{rest*}", "llm.model.{m}.{rest}"),
    # SigLIP vision tower (transformers 4 names it `vision_model.*`, as the published checkpoints; 5 drops the level)
    ("visual_encoder.vision_model.{rest*}", "siglip.model.{rest}"),
    ("visual_encoder.{rest*}", "siglip.model.{rest}"),
    # SAM ViT (transformers' SamVisionEncoder names -> segment_anything's)
    ("segmentor.encoder.patch_embed.projection." + P, "sam.patch_embed.proj.{p}"),
    ("segmentor.encoder.pos_embed", "sam.pos_embed"),
    ("segmentor.encoder.layers.{n}.layer_norm{a:1|2}." + P, "sam.blocks.{n}.norm{a}.{p}"),
    ("segmentor.encoder.layers.{n}.{m:attn|mlp}.{rest*}", "sam.blocks.{n}.{m}.{rest}"),
    # projectors (Linear, GELU, Linear)
    ("visual_projector.model.{j:0|2}." + P, "image_projector.layers.{j}.{p}"),
    ("seg_projector.model.{j:0|2}." + P, "seg_projector.mlp.layers.{j}.{p}"),
    ("llm_projector.model.{j:0|2}." + P, "llm_to_decoder.layers.{j}.{p}"),
    # connector; level 0 (scale 2) output channels reordered for the pixel shuffle
    ("seg_connector.model.0.model.{k:4|5}." + P, "segmentor.connector.levels.0.{k}.{p}", "pixel_shuffle_groups"),
    ("seg_connector.model.{i}.model.{k}." + P, "segmentor.connector.levels.{i}.{k}.{p}"),
    # pixel decoder
    ("segmentor.pixel_decoder.input_projections.{rest*}", "segmentor.pixel_decoder.input_proj.{rest}"),
    ("segmentor.pixel_decoder.level_embed", "segmentor.pixel_decoder.encoder.level_embed"),
    (ENC + ".self_attn.{rest*}", ENC + ".self_attn.{rest}"),
    (ENC + ".self_attn_layer_norm." + P, ENC + ".norm1.{p}"),
    (ENC + ".fc1." + P, ENC + ".linear1.{p}"),
    (ENC + ".fc2." + P, ENC + ".linear2.{p}"),
    (ENC + ".final_layer_norm." + P, ENC + ".norm2.{p}"),
    ("segmentor.pixel_decoder.adapter_1.{rest*}", "segmentor.pixel_decoder.lateral_conv.{rest}"),
    ("segmentor.pixel_decoder.layer_1.{rest*}", "segmentor.pixel_decoder.output_conv.{rest}"),
    ("segmentor.pixel_decoder.mask_projection." + P, "segmentor.pixel_decoder.mask_features.{p}"),
    # transformer decoder
    ("segmentor.decoder.queries_embedder.weight", "segmentor.decoder.query_embed.weight"),
    ("segmentor.decoder.queries_features.weight", "segmentor.decoder.query_feat.weight"),
    ("segmentor.decoder.level_embed.weight", "segmentor.decoder.level_embed.weight"),
    ("segmentor.decoder.decoder.layernorm." + P, "segmentor.decoder.decoder_norm.{p}"),
    ("segmentor.decoder.decoder.mask_predictor.mask_embedder.{j}.0." + P, "segmentor.decoder.mask_embed.layers.{j}.{p}"),
    (DEC + ".cross_attn.{rest*}", "segmentor.decoder.cross_attention_layers.{n}.multihead_attn.{rest}"),
    (DEC + ".cross_attn_layer_norm." + P, "segmentor.decoder.cross_attention_layers.{n}.norm.{p}"),
    (DEC + ".self_attn.{part:q|k|v}_proj." + P, "segmentor.decoder.self_attention_layers.{n}.self_attn.in_proj_{p}",
     "concat_qkv"),
    (DEC + ".self_attn.out_proj." + P, "segmentor.decoder.self_attention_layers.{n}.self_attn.out_proj.{p}"),
    (DEC + ".self_attn_layer_norm." + P, "segmentor.decoder.self_attention_layers.{n}.norm.{p}"),
    (DEC + ".fc1." + P, "segmentor.decoder.ffn_layers.{n}.linear1.{p}"),
    (DEC + ".fc2." + P, "segmentor.decoder.ffn_layers.{n}.linear2.{p}"),
    (DEC + ".final_layer_norm." + P, "segmentor.decoder.ffn_layers.{n}.norm.{p}"),
    # heads: AAAI names first (the inverse writes them); the later revision keeps logit_scale in class_predictor
    ("segmentor.logit_scale", "segmentor.cosine_head.logit_scale"),
    ("segmentor.class_predictor.logit_scale", "segmentor.cosine_head.logit_scale"),
    ("segmentor.class_predictor." + P, "segmentor.s1_head.linear.{p}"),  # S1's closed-set 134-way head
    ("bg_embeds.weight", "segmentor.background.embedding.weight"),
)

DROPPED: tuple[str, ...] = ("segmentor.encoder.neck", "segmentor.shared_image_embedding")  # key prefixes


# --------------------------------------------------------------------------- patterns
_PLACEHOLDER = re.compile(r"\{(\w+)(\*|:[\w|]+)?\}")


@dataclass(frozen=True)
class _Side:
    """One side of a rule: a regex with named groups and a str.format template."""

    regex: re.Pattern
    template: str
    names: tuple[str, ...]
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _kinds(pattern: str) -> dict[str, str | None]:
    return {m.group(1): m.group(2) for m in _PLACEHOLDER.finditer(pattern)}


def _compile(pattern: str, inherit: dict[str, str | None] | None = None) -> _Side:
    """A placeholder written without a kind takes the kind `inherit` gives it (the project side
    writes `{p}` for the original side's `{p:weight|bias}`)."""
    regex, template, names, choices, pos = "", "", [], {}, 0
    for m in _PLACEHOLDER.finditer(pattern):
        literal = pattern[pos:m.start()]
        regex += re.escape(literal)
        template += literal
        name, kind = m.group(1), m.group(2) or (inherit or {}).get(m.group(1))
        if kind == "*":
            regex += f"(?P<{name}>.+)"
        elif kind:
            choices[name] = tuple(kind[1:].split("|"))
            regex += f"(?P<{name}>{'|'.join(re.escape(c) for c in choices[name])})"
        else:
            regex += rf"(?P<{name}>\d+)"
        template += "{" + name + "}"
        names.append(name)
        pos = m.end()
    regex += re.escape(pattern[pos:])
    template += pattern[pos:]
    return _Side(re.compile(regex + r"\Z"), template, tuple(names), choices)


@dataclass(frozen=True)
class KeyRule:
    """One row of the table. `fused`: the original-only placeholder whose alternatives are concatenated."""

    original: _Side
    project: _Side
    transform: str | None
    fused: str | None

    @classmethod
    def parse(cls, original: str, project: str, transform: str | None = None) -> KeyRule:
        o, p = _compile(original), _compile(project, _kinds(original))
        extra = sorted(set(o.names) - set(p.names))
        if set(p.names) - set(o.names) or len(extra) > 1 or (extra and extra[0] not in o.choices):
            raise ValueError(f"rule {original!r} -> {project!r}: placeholders do not pair up")
        return cls(o, p, transform, extra[0] if extra else None)


RULES: tuple[KeyRule, ...] = tuple(KeyRule.parse(*row) for row in TABLE)


@dataclass(frozen=True)
class Mapped:
    """Where an original key goes: the project key, its rule, and (many-to-one rules) which part it is."""

    project: str
    rule: KeyRule
    part: int | None = None  # index among the fused parts (q 0, k 1, v 2)

    @property
    def parts(self) -> int:
        return len(self.rule.original.choices[self.rule.fused]) if self.rule.fused else 1


def is_dropped(key: str) -> bool:
    """An original key left out on purpose (SAM neck, shared_image_embedding)."""
    return any(key == p or key.startswith(p + ".") for p in DROPPED)


def to_project(key: str) -> Mapped | None:
    """The project key of an original key (first matching rule), or None when no rule matches."""
    for rule in RULES:
        m = rule.original.regex.match(key)
        if m:
            values = m.groupdict()
            part = rule.original.choices[rule.fused].index(values.pop(rule.fused)) if rule.fused else None
            return Mapped(rule.project.template.format(**values), rule, part)
    return None


def to_original(key: str) -> tuple[list[str], KeyRule] | None:
    """The original key(s) of a project key (several, in concatenation order, for a fused key) and the
    rule, or None when no rule matches. Where two original names share a project key, the first
    rule's (AAAI) name is given."""
    for rule in RULES:
        m = rule.project.regex.match(key)
        if m:
            values = m.groupdict()
            if not rule.fused:
                return [rule.original.template.format(**values)], rule
            return [rule.original.template.format(**values, **{rule.fused: c})
                    for c in rule.original.choices[rule.fused]], rule
    return None


# --------------------------------------------------------------------------- tensor transforms
def concat_qkv(parts: list[Tensor]) -> Tensor:
    """q, k, v projection weights [d, d] (or biases [d]) -> in_proj [3d, d] (or [3d])."""
    return torch.cat(parts, dim=0)


def split_qkv(t: Tensor, n: int = 3) -> list[Tensor]:
    """Inverse of `concat_qkv`: in_proj -> [q, k, v]."""
    return [c.clone() for c in t.chunk(n, dim=0)]


SHUFFLE_GROUP_ORDER = (0, 2, 1, 3)  # project group 2*dy+dx <- original group 2*dx+dy; its own inverse


def pixel_shuffle_groups(t: Tensor) -> Tensor:
    """Reorder the 4 equal output-channel groups (dim 0) of a scale-2 pixel shuffle's input layer as
    SHUFFLE_GROUP_ORDER: converts between the original's and the project's channel order (both ways)."""
    if t.shape[0] % 4:
        raise ValueError(f"pixel_shuffle_groups: dim 0 of {tuple(t.shape)} is not divisible by 4")
    groups = t.reshape(4, t.shape[0] // 4, *t.shape[1:])
    return groups[list(SHUFFLE_GROUP_ORDER)].reshape(t.shape).clone()


# --------------------------------------------------------------------------- vocabulary rows
@dataclass
class VocabMap:
    """Where each project row comes from. `source[t]`: the original row of project id t, or -1 (a
    token the original does not have). `unused`: original rows no project token takes."""

    original_rows: int
    source: list[int]
    missing_tokens: list[str]
    unused_rows: list[int]

    @property
    def moved(self) -> dict[int, int]:
        """project id -> original row, for the rows that change place."""
        return {t: s for t, s in enumerate(self.source) if s >= 0 and s != t}


def vocab_row_map(tokenizer, original_rows: int) -> VocabMap:
    """Place the original's vocabulary rows by token. The original is the base tokenizer (ids
    0 .. B-1, B = original_rows - 3) with ORIGINAL_ADDED_TOKENS appended in that order (ids B, B+1, B+2).
    Project id t takes: the original row of its token if that token is one of the three; else row t
    if t < B (base ids stay); else nothing (a token only the project has: -1)."""
    base = original_rows - len(ORIGINAL_ADDED_TOKENS)
    if base <= 0:
        raise ValueError(f"an original vocabulary of {original_rows} rows cannot hold the base vocabulary and "
                         f"{len(ORIGINAL_ADDED_TOKENS)} added tokens")
    source, missing = [], []
    for t, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token in ORIGINAL_ADDED_TOKENS:
            source.append(base + ORIGINAL_ADDED_TOKENS.index(token))
        elif t < base:
            source.append(t)
        else:
            source.append(-1)
            missing.append(token)
    unused = sorted(set(range(original_rows)) - set(source))
    return VocabMap(original_rows, source, missing, unused)


def place_rows(t: Tensor, vocab: VocabMap) -> Tensor:
    """Original rows [original_rows, D] -> project rows [len(tokenizer), D]; rows of tokens the
    original lacks get the mean of the original rows (as transformers initialises added rows)."""
    src = torch.tensor(vocab.source, dtype=torch.long)
    out = t[src.clamp(min=0)].clone()
    if vocab.missing_tokens:
        out[src < 0] = t.float().mean(dim=0).to(t.dtype)
    return out


def original_row_order(tokenizer) -> list[int]:
    """Inverse of `vocab_row_map` for a project tokenizer whose non-X-SAM tokens are ids 0 .. B-1:
    the project id of each original row (base ids, then ORIGINAL_ADDED_TOKENS in the original's order)."""
    ids = [tokenizer.convert_tokens_to_ids(tok) for tok in ORIGINAL_ADDED_TOKENS]
    base = [t for t in range(len(tokenizer)) if t not in ids]
    if base != list(range(len(base))):
        raise ValueError("the X-SAM tokens are not the last ids of this tokenizer: it has no original order")
    return base + ids
