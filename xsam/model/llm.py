"""The LLM of X-SAM (Phi-3, transformers Phi3ForCausalLM) and the embedding-level sequence helpers.

Sequence flow (per sample): `tokenizer.encode_chat` ids with -200 / -300 placeholders ->
`expand_visual` -> [T', D] embeddings with the visual tokens in place -> `pad_batch` (right padding)
-> `XSamLLM.forward` -> (LM loss, last hidden state [B, T', D]). `seg_positions` and `span_average`
then read the ``<SEG>`` states and the ``<p> ... </p>`` condition embeddings off the hidden states,
using the `token_ids` that `expand_visual` returns (real ids, -200 on visual positions, -300 on regions).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xsam.model.config import LLMConfig
from xsam.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX

log = logging.getLogger(__name__)

PAD_TOKEN_ID = IGNORE_INDEX  # what pad_batch writes into token_ids (never a real id or a placeholder)


# --------------------------------------------------------------------------- sequence helpers
def expand_visual(input_ids: Tensor | Sequence[int], labels: Tensor | Sequence[int], embed: nn.Embedding,
                  visual: Tensor | None, regions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Replace the placeholders of one sample by embeddings.

    input_ids, labels: [T] (ids with exactly one -200 when `visual` is given, one -300 per region).
    visual: [Nv, D] visual tokens; regions: [R, D] region tokens (in ``<region>`` order) or None.
    -> (inputs_embeds [T', D] with T' = T - 1 + Nv, labels [T'] (IGNORE_INDEX on visual and region
        positions), token_ids [T'] long (real ids; -200 on the Nv visual positions; -300 on regions)).
    """
    weight = embed.weight
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=weight.device)
    labs = torch.as_tensor(labels, dtype=torch.long, device=weight.device)
    if ids.shape != labs.shape or ids.dim() != 1:
        raise ValueError(f"input_ids {tuple(ids.shape)} and labels {tuple(labs.shape)} must be equal 1-D")
    n_image = int((ids == IMAGE_TOKEN_INDEX).sum())
    n_region = int((ids == REGION_TOKEN_INDEX).sum())
    if n_image != (0 if visual is None else 1):
        raise ValueError(f"{n_image} <image> placeholders for {'no' if visual is None else 'one'} visual input")
    if n_region != (0 if regions is None else len(regions)):
        raise ValueError(f"{n_region} <region> placeholders but {0 if regions is None else len(regions)} regions")
    text = embed(ids.clamp(min=0))  # [T, D]; placeholder rows are replaced below
    places = torch.nonzero(ids < 0).flatten().tolist()
    embeds, out_labels, token_ids, prev, region = [], [], [], 0, 0
    for pos in places:
        embeds.append(text[prev:pos])
        out_labels.append(labs[prev:pos])
        token_ids.append(ids[prev:pos])
        if ids[pos] == IMAGE_TOKEN_INDEX:
            block, fill = visual, IMAGE_TOKEN_INDEX
        elif ids[pos] == REGION_TOKEN_INDEX:
            block, fill = regions[region:region + 1], REGION_TOKEN_INDEX
            region += 1
        else:
            raise ValueError(f"unknown negative id {int(ids[pos])} in input_ids")
        embeds.append(block.to(device=text.device, dtype=text.dtype))
        out_labels.append(labs.new_full((len(block),), IGNORE_INDEX))
        token_ids.append(ids.new_full((len(block),), fill))
        prev = pos + 1
    embeds.append(text[prev:])
    out_labels.append(labs[prev:])
    token_ids.append(ids[prev:])
    return torch.cat(embeds), torch.cat(out_labels), torch.cat(token_ids)


def pad_batch(items: Sequence[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-pad `expand_visual` outputs to the longest.

    -> (inputs_embeds [B, T, D] (zeros on padding), labels [B, T] (IGNORE_INDEX on padding),
        token_ids [B, T] (PAD_TOKEN_ID on padding), attention_mask [B, T] long (1 = real token))."""
    if not items:
        raise ValueError("pad_batch needs at least one sequence")
    length = max(len(e) for e, _, _ in items)
    first = items[0][0]
    embeds = first.new_zeros(len(items), length, first.shape[-1])
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long, device=first.device)
    token_ids = torch.full((len(items), length), PAD_TOKEN_ID, dtype=torch.long, device=first.device)
    mask = torch.zeros(len(items), length, dtype=torch.long, device=first.device)
    for b, (e, lab, ids) in enumerate(items):
        n = len(e)
        embeds[b, :n], labels[b, :n], token_ids[b, :n], mask[b, :n] = e, lab, ids, 1
    return embeds, labels, token_ids, mask


def seg_positions(token_ids: Tensor, seg_id: int) -> Tensor:
    """token_ids [T'] -> [n] long: the positions of ``<SEG>`` in order."""
    return torch.nonzero(token_ids == seg_id).flatten()


def _spans(token_ids: Tensor, p_id: int, end_p_id: int, strict: bool) -> list[tuple[int, int]]:
    opens = torch.nonzero(token_ids == p_id).flatten().tolist()
    closes = torch.nonzero(token_ids == end_p_id).flatten().tolist()
    if strict:
        pairs = list(zip(opens, closes))
        balanced = len(opens) == len(closes) and all(s < e for s, e in pairs) and all(
            e < s_next for (_, e), (s_next, _) in itertools.pairwise(pairs))
        if not balanced:
            raise ValueError(f"unbalanced or nested <p> ... </p> tags at {opens} / {closes}")
        return pairs
    events = sorted([(s, 0) for s in opens] + [(e, 1) for e in closes])
    pairs, open_at = [], None
    for pos, kind in events:
        if kind == 0:
            open_at = pos  # a second <p> restarts the span
        elif open_at is not None:
            pairs.append((open_at, pos))
            open_at = None
    return pairs


def span_average(hidden: Tensor, token_ids: Tensor, p_id: int, end_p_id: int, strict: bool = True) -> Tensor:
    """hidden [T', D], token_ids [T'] -> [n_spans, D]: the mean of hidden over each ``<p> ... </p>``
    span, both tags included, in sequence order. `strict` raises on unbalanced / nested tags; with
    strict=False (free generation) an unclosed ``<p>`` or a stray ``</p>`` is skipped."""
    pairs = _spans(token_ids, p_id, end_p_id, strict)
    if not pairs:
        return hidden.new_zeros(0, hidden.shape[-1])
    pos = torch.arange(hidden.shape[0], device=hidden.device)
    start = torch.tensor([s for s, _ in pairs], device=hidden.device)
    end = torch.tensor([e for _, e in pairs], device=hidden.device)
    weights = ((pos[None] >= start[:, None]) & (pos[None] <= end[:, None])).float()  # [n, T']
    weights = weights / weights.sum(1, keepdim=True)
    return (weights @ hidden.float()).to(hidden.dtype)


# --------------------------------------------------------------------------- the model
def phi3_config(cfg: LLMConfig):
    """A transformers Phi3Config from the LLMConfig sizes (random init; no pad / bos / eos ids, which
    belong to the tokenizer)."""
    from transformers import Phi3Config

    return Phi3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                      max_position_embeddings=cfg.max_position_embeddings,
                      original_max_position_embeddings=cfg.max_position_embeddings,
                      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                      pad_token_id=None, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)


def llm_config_from_hf(config) -> LLMConfig:
    """The LLMConfig of a loaded Phi3Config (vocab_size as stored, i.e. before any resize)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return LLMConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                     num_attention_heads=config.num_attention_heads,
                     num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
                     max_position_embeddings=config.max_position_embeddings,
                     rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))


@dataclass
class LLMLoadReport:
    """What `XSamLLM.from_pretrained` did: the HF loading info and the embedding resize."""

    folder: str
    vocab_before: int
    vocab_after: int
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)

    @property
    def added_rows(self) -> int:
        """Embedding / LM-head rows initialised fresh (negative: rows dropped by a shrink)."""
        return self.vocab_after - self.vocab_before

    def summary(self) -> str:
        return (f"LLM {self.folder}: embeddings {self.vocab_before} -> {self.vocab_after} rows "
                f"({self.added_rows:+d}); missing {len(self.missing_keys)}, unexpected {len(self.unexpected_keys)}, "
                f"mismatched {len(self.mismatched_keys)}")


class XSamLLM(nn.Module):
    """Phi3ForCausalLM (attribute `.model`) with X-SAM's vocabulary and a loss over labelled tokens.

    Parameter names are those of transformers (``model.model.embed_tokens.weight``,
    ``model.lm_head.weight``, ``model.model.layers.N.*``) so HF checkpoints load by key.
    """

    def __init__(self, cfg: LLMConfig, vocab_size_with_special: int, model: nn.Module | None = None):
        super().__init__()
        if model is None:
            from transformers import Phi3ForCausalLM

            model = Phi3ForCausalLM(phi3_config(cfg))
        self.cfg = cfg
        self.model = model
        self.load_report: LLMLoadReport | None = None
        if vocab_size_with_special != self.vocab_size:
            self.resize_token_embeddings(vocab_size_with_special)

    @classmethod
    def from_pretrained(cls, folder: str | Path, vocab_size_with_special: int | None = None,
                        dtype: torch.dtype | None = None) -> XSamLLM:
        """Load real Phi-3 weights from a local HF folder and resize the embeddings to
        `vocab_size_with_special` (= len(tokenizer) after `add_special_tokens`); the summary is kept
        in `.load_report` and logged."""
        from transformers import Phi3ForCausalLM

        if not Path(folder).is_dir():
            raise FileNotFoundError(f"no LLM folder at {folder} (only local folders are loaded)")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = Phi3ForCausalLM.from_pretrained(str(folder), output_loading_info=True,
                                                      local_files_only=True, **kwargs)
        before = model.config.vocab_size
        llm = cls(llm_config_from_hf(model.config), vocab_size_with_special or before, model=model)
        llm.load_report = LLMLoadReport(str(folder), before, llm.vocab_size,
                                        sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", [])),
                                        sorted(str(k) for k in info.get("mismatched_keys", [])))
        log.info(llm.load_report.summary())
        return llm

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(str(folder))

    # -- vocabulary / parameters ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def resize_token_embeddings(self, num_tokens: int) -> None:
        """Embedding and LM head to `num_tokens` rows (new rows: transformers' mean resizing)."""
        self.model.resize_token_embeddings(num_tokens)

    def trainable_when_frozen(self) -> list[str]:
        """Names (relative to this module) of the parameters that train even when the LLM is frozen:
        the input embedding and the LM head, which hold the new special tokens."""
        keep = {id(self.model.get_input_embeddings().weight), id(self.model.get_output_embeddings().weight)}
        return [name for name, p in self.named_parameters() if id(p) in keep]

    def freeze(self) -> None:
        """Freeze everything except `trainable_when_frozen()`."""
        keep = set(self.trainable_when_frozen())
        for name, p in self.named_parameters():
            p.requires_grad_(name in keep)

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False

    # -- training ---------------------------------------------------------------------------------
    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        """inputs_embeds [B, T, D], attention_mask [B, T] (1 = token), labels [B, T] (IGNORE_INDEX = no loss)
        -> (lm_loss: next-token cross-entropy averaged over the labelled tokens, None when there are none
            or no labels; last_hidden_state [B, T, D] after the final norm).
        Logits are computed only at labelled positions."""
        out = self.model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        loss = None
        if labels is not None:
            target = labels[:, 1:]
            valid = target != IGNORE_INDEX
            if attention_mask is not None:
                valid = valid & attention_mask[:, 1:].bool()
            if bool(valid.any()):
                logits = self.model.lm_head(hidden[:, :-1][valid]).float()
                loss = F.cross_entropy(logits, target[valid])
        return loss, hidden

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., D] -> logits [..., V]."""
        return self.model.lm_head(hidden)

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_greedy(self, inputs_embeds: Tensor, attention_mask: Tensor | None, max_new_tokens: int,
                        eos_id: int) -> list[list[int]]:
        """Greedy decoding with a KV cache from prompts given as embeddings (visual tokens inside).

        inputs_embeds [B, T, D], attention_mask [B, T] (any padding side; None = all tokens)
        -> per sample the generated ids, ending with `eos_id` when it was produced within
        `max_new_tokens` (then generation of that sample stops)."""
        emb, mask = _left_align(inputs_embeds, attention_mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(self.model.config)
        out = self.model(inputs_embeds=emb, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{_cache_kwarg(): cache})
        next_pos = positions[:, -1:] + 1
        results: list[list[int]] = [[] for _ in range(emb.shape[0])]
        done = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
        embed = self.model.get_input_embeddings()
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)  # [B]
            for b in torch.nonzero(~done).flatten().tolist():
                results[b].append(int(token[b]))
            done |= token == eos_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = self.model(inputs_embeds=embed(token)[:, None], attention_mask=mask, position_ids=next_pos,
                             use_cache=True, logits_to_keep=1, **{_cache_kwarg(): cache})
            next_pos = next_pos + 1
        return results


def _left_align(embeds: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the right end (left padding), as generation needs."""
    if mask is None:
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    mask = mask.long()
    out = embeds.new_zeros(embeds.shape)
    new_mask = torch.zeros_like(mask)
    length = embeds.shape[1]
    for b in range(embeds.shape[0]):
        keep = mask[b].bool()
        n = int(keep.sum())
        if n == 0:
            raise ValueError(f"prompt {b} has no tokens")
        out[b, length - n:] = embeds[b, keep]
        new_mask[b, length - n:] = 1
    return out, new_mask


@functools.lru_cache(maxsize=1)
def _cache_kwarg() -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`, older versions `past_key_values`."""
    from transformers import Phi3ForCausalLM

    params = inspect.signature(Phi3ForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()

