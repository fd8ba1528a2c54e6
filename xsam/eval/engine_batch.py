"""The evaluation engine's device side: a batch of images encoded ONCE, then every teacher-forced pass
of every query of those images decoded in batches over the cached features, and GCG prompts generated
in batches with one KV cache.

Shapes: B images of a batch; N passes (sequences), each of one image; I the SAM size, D the LLM width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xsam.model import preprocess
from xsam.model.batching import Example, collate_raw
from xsam.model.predict import EVAL_SIGLIP_PAD_SQUARE, gcg_prompt
from xsam.model.tokenizer import END_TOKEN, token_id
from xsam.model.xsam import XSAM, DecodeMode, ImageFeatures


@dataclass
class Pass:
    """One teacher-forced sequence: the index of its image in the batch, its example (chat turns,
    visual prompts at the image's size) and the generator of its prompt-point draws (None: global)."""

    image: int
    example: Example
    generator: torch.Generator | None = None


def model_device(model: XSAM) -> torch.device:
    return model.sam.pos_embed.device


def encode_images(model: XSAM, images: list[np.ndarray]) -> ImageFeatures:
    """B images [H_b, W_b, 3] uint8 -> their features (SAM, SigLIP + projector, seg projector, pixel
    decoder), the views built on the model's device exactly as `XSAM.prepare` builds them for evaluation."""
    dev = model_device(model)
    tensors = [preprocess.image_tensor(im).to(dev, non_blocking=True) for im in images]
    sig, sam = preprocess.views(tensors, model.siglip.cfg.image_size, model.cfg.sam.image_size,
                                siglip_processing=model.siglip.cfg.processing, siglip_pad_square=EVAL_SIGLIP_PAD_SQUARE)
    return model.encode(sam, sig)


def run_passes(model: XSAM, tokenizer, feats: ImageFeatures, passes: list[Pass], max_sequences: int = 32
               ) -> list[tuple[Tensor, Tensor]]:
    """Every pass decoded over the cached features, each its own decoder item with its own classes
    -> per pass (logits [Q, k + 1] (its k <p> spans, then the background), masks [Q, I/8, I/8]), in the
    order given, on the model's device.

    LLM batches: up to `max_sequences` sequences of EQUAL length (after the visual tokens are expanded),
    so no sequence is padded: a padded row takes another attention kernel path and would not give what
    one sequence alone gives. Each pass with visual prompts draws its points from its own generator, in
    the state its sample's generator has at that pass in query order (`_own_generators`). Decoder
    batches: `max_sequences` items in pass order (the decoder is batch-invariant)."""
    dev = model_device(model)
    step = max(1, max_sequences)
    size = model.cfg.sam.image_size
    batch = collate_raw([p.example for p in passes], DecodeMode.none, tokenizer, model.cfg)
    ids = [t.to(dev, non_blocking=True) for t in batch.input_ids]
    regions = [None if m is None else preprocess.frame_masks(m.to(dev, non_blocking=True), size)
               for m in batch.region_masks]
    generators = _own_generators(model, passes, regions)
    groups: dict[int, list[int]] = {}  # sequence length (every image has as many visual tokens) -> passes
    for n, t in enumerate(ids):
        groups.setdefault(len(t), []).append(n)
    conds: list[tuple[Tensor, Tensor] | None] = [None] * len(passes)
    for members in groups.values():
        for start in range(0, len(members), step):
            idx = members[start:start + step]
            image_of = torch.tensor([passes[n].image for n in idx], dtype=torch.long, device=dev)
            gens = [generators[n] for n in idx]
            qb, cond, mask = model.item_conditions(feats, image_of, [ids[n] for n in idx], [regions[n] for n in idx],
                                                   gens if any(g is not None for g in gens) else None)
            for j, n in enumerate(idx):
                conds[n] = (qb[j], cond[j, mask[j]])
    out: list[tuple[Tensor, Tensor]] = []
    for start in range(0, len(passes), step):
        idx = list(range(start, min(start + step, len(passes))))
        k = max(len(conds[n][1]) for n in idx)
        cond = feats.visual.new_zeros(len(idx), k, conds[idx[0]][1].shape[-1])
        mask = torch.zeros(len(idx), k, dtype=torch.bool, device=dev)
        for j, n in enumerate(idx):
            cond[j, :len(conds[n][1])] = conds[n][1]
            mask[j, :len(conds[n][1])] = True
        image_of = torch.tensor([passes[n].image for n in idx], dtype=torch.long, device=dev)
        res = model.decode_items(feats, image_of, torch.stack([conds[n][0] for n in idx]), cond, mask)
        for j, n in enumerate(idx):
            kn = len(conds[n][1])
            logits = res["pred_logits"][j]
            out.append((torch.cat([logits[:, :kn], logits[:, -1:]], dim=1), res["pred_masks"][j]))
    return out


def _own_generators(model: XSAM, passes: list[Pass], regions: list[Tensor | None]) -> list[torch.Generator | None]:
    """Per pass with visual prompts, a generator in the state its sample's generator has when the pass's
    turn comes (passes are listed in query order; each draw advances the sample's generator exactly as
    the model's draw for that pass will): batches in any order draw what sequential passes would."""
    out: list[torch.Generator | None] = [None] * len(passes)
    for n, (p, r) in enumerate(zip(passes, regions)):
        if p.generator is None or r is None or not len(r):
            continue
        own = torch.Generator(device=p.generator.device)
        own.set_state(p.generator.get_state())
        model.prompt_sampler.sample_points(r, p.generator)
        out[n] = own
    return out


def generate_gcg(model: XSAM, tokenizer, feats: ImageFeatures, images: list[int], max_new_tokens: int,
                 max_sequences: int = 32) -> list[str]:
    """The GCG answer of each listed image of the batch (indices into feats), greedy, generated
    `max_sequences` prompts at a time with one KV cache -> the decoded texts (special tokens kept)."""
    dev = model_device(model)
    _, ids = gcg_prompt(tokenizer)
    prompt = torch.tensor(ids, dtype=torch.long, device=dev)
    eos = token_id(tokenizer, END_TOKEN)
    texts: list[str] = []
    step = max(1, max_sequences)
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        image_of = torch.tensor(chunk, dtype=torch.long, device=dev)
        generated = model.generate_features(feats, image_of, [prompt] * len(chunk), max_new_tokens, eos)
        texts += [tokenizer.decode(g, skip_special_tokens=False) for g in generated]
    return texts
