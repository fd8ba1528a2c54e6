"""From formatted examples (image, chat turns, target masks) to an `XSAMBatch`.

The training loader (per-read templates, negatives, sentence choice) produces `Example`s; this
module only does the deterministic part: tokenisation with the chat template and the per-sample /
per-phrase target layout. `collate_raw` ships the images and masks as they are (uint8 [3, H, W], bool
[N, H, W] at the original size: the loader's compact form; the model builds the views and the
SAM-frame targets on its device, `XSAM.prepare`). `collate` is the same batch prepared on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xsam.model.config import XSAMConfig
from xsam.model.preprocess import image_tensor
from xsam.model.tokenizer import encode_chat
from xsam.model.xsam import DecodeMode, XSAMBatch

NO_PROMPT = -1  # a region source meaning "no prompt": the model feeds a zero region token


@dataclass
class Example:
    """One image's training example.

    image: [H, W, 3] uint8 RGB.
    turns: [(user, assistant)], the first user text holding "<image>" once (and "<region>" per prompt).
    masks: [N, H, W] bool targets; labels: [N] the condition (<p> span) index of each mask, in
      span order of this example (per_sample) - for per_phrase batches masks[j] is phrase j's target.
    region_masks: [R, Hc, Wc] bool visual prompts, one per "<region>" in order. Without region_sources
      (or where region r's source is this image): the image's own frame. A prompt taken from image s of
      the batch stays in s's frame: it is the top-left [H_s, W_s] window of the canvas, the rest False
      (Hc, Wc >= every source's and this image's size; all own: Hc, Wc = H, W).
    region_sources: [R] or None (every prompt from this image). Per region: None = this image; j >= 0 =
      image j OF THE BATCH being collated (a batch-level step sets it, e.g.
      `xsam.train.format_regions.assign_region_sources`, for exactly that list of examples); NO_PROMPT =
      no prompt: the region token is a zero vector (X-SAM's fallback when no image offers one).
    """

    image: np.ndarray
    turns: list[tuple[str, str]]
    masks: np.ndarray | None = None
    labels: list[int] | None = None
    region_masks: np.ndarray | None = None
    region_sources: list[int | None] | None = None


def text_budget(cfg: XSAMConfig) -> int:
    """Text tokens left beside the visual ones: int(4096 - (384/14)^2 - 1024) = 2319 for the paper."""
    return int(cfg.llm.max_position_embeddings - (cfg.siglip.image_size / cfg.siglip.patch_size) ** 2
               - cfg.sam.num_tokens)


def bool_tensor(masks: np.ndarray, where: str) -> torch.Tensor:
    """[N, H, W] bool / 0-1 uint8 array -> bool tensor sharing its memory (any strides: a stack of
    column-major RLE decodes is not transposed here)."""
    if masks.ndim != 3:
        raise ValueError(f"{where}: masks must be [N, H, W], got shape {masks.shape}")
    if masks.dtype == np.uint8:
        masks = masks.view(bool)
    elif masks.dtype != bool:
        raise ValueError(f"{where}: masks must be bool or uint8, got {masks.dtype}")
    return torch.from_numpy(masks)


def region_sources(examples: list[Example], b: int) -> torch.Tensor | None:
    """Example b's region sources -> [R_b] long, image indices within `examples` (own image: b;
    NO_PROMPT stays -1), or None when it has none; checks the indices and that the region canvas
    covers every source's frame (`Example.region_masks`)."""
    ex = examples[b]
    size = ex.image.shape[:2]
    if ex.region_sources is None:
        if ex.region_masks is not None and ex.region_masks.shape[1:] != size:
            raise ValueError(f"example {b}: region_masks {ex.region_masks.shape[1:]} do not match "
                             f"the image {size}")
        return None
    if ex.region_masks is None or len(ex.region_sources) != len(ex.region_masks):
        raise ValueError(f"example {b}: {len(ex.region_sources)} region sources for "
                         f"{0 if ex.region_masks is None else len(ex.region_masks)} region masks")
    out = [b if s is None else int(s) for s in ex.region_sources]
    canvas = ex.region_masks.shape[1:]
    for s in out:
        if not NO_PROMPT <= s < len(examples):
            raise ValueError(f"example {b}: region source {s} is not an image of the batch "
                             f"of {len(examples)}")
        h, w = examples[b if s == NO_PROMPT else s].image.shape[:2]
        if h > canvas[0] or w > canvas[1]:
            raise ValueError(f"example {b}: region canvas {canvas} does not hold image {s}'s frame {(h, w)}")
    return torch.tensor(out, dtype=torch.long)


def collate_raw(examples: list[Example], mode: DecodeMode, tokenizer, cfg: XSAMConfig) -> XSAMBatch:
    """-> a RAW XSAMBatch: images B x [3, H_b, W_b] uint8, masks bool at the original size; regions
    [R_b, Hc, Wc] bool as `Example.region_masks` and, when any example has region sources,
    `region_sources` B x ([R_b] long image index within the batch, -1 = NO_PROMPT; or None = own image)."""
    input_ids, labels, regions, sources, targets = [], [], [], [], []
    budget = text_budget(cfg)
    phrase = 0
    for b, ex in enumerate(examples):
        if ex.image.ndim != 3 or ex.image.shape[2] != 3 or ex.image.dtype != np.uint8:
            raise ValueError(f"example {b}: image must be [H, W, 3] uint8, got {ex.image.shape} {ex.image.dtype}")
        size = ex.image.shape[:2]
        ids, lab = encode_chat(ex.turns, tokenizer, budget)
        input_ids.append(torch.tensor(ids, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
        if ex.masks is not None and ex.masks.shape[1:] != size:
            raise ValueError(f"example {b}: masks {ex.masks.shape[1:]} do not match the image {size}")
        sources.append(region_sources(examples, b))
        regions.append(bool_tensor(ex.region_masks, f"example {b} region_masks")
                       if ex.region_masks is not None else None)
        if mode is DecodeMode.none:
            continue
        masks = bool_tensor(ex.masks, f"example {b} masks")
        if mode is DecodeMode.per_sample:
            targets.append({"labels": torch.tensor(ex.labels, dtype=torch.long), "masks": masks})
        else:  # one decoder item per phrase, labelled with its index among all phrases of the batch
            for j in range(len(masks)):
                targets.append({"labels": torch.tensor([phrase], dtype=torch.long), "masks": masks[j:j + 1]})
                phrase += 1
    return XSAMBatch(mode=mode, images=[image_tensor(ex.image) for ex in examples], input_ids=input_ids,
                     labels=labels, region_masks=regions,
                     region_sources=sources if any(t is not None for t in sources) else [], targets=targets)


def collate(examples: list[Example], mode: DecodeMode, tokenizer, cfg: XSAMConfig) -> XSAMBatch:
    """-> a PREPARED XSAMBatch on the CPU: SigLIP [B, 3, S, S] and SAM [B, 3, I, I] views, masks bool
    [., I, I] in the padded SAM frame (the CPU fallback of the device transform)."""
    return collate_raw(examples, mode, tokenizer, cfg).prepared(cfg.siglip.image_size, cfg.sam.image_size)
