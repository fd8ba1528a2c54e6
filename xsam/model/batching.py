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


@dataclass
class Example:
    """One image's training example.

    image: [H, W, 3] uint8 RGB.
    turns: [(user, assistant)], the first user text holding "<image>" once (and "<region>" per prompt).
    masks: [N, H, W] bool targets; labels: [N] the condition (<p> span) index of each mask, in
      span order of this example (per_sample) - for per_phrase batches masks[j] is phrase j's target.
    region_masks: [R, H, W] bool visual prompts, one per "<region>" in order.
    """

    image: np.ndarray
    turns: list[tuple[str, str]]
    masks: np.ndarray | None = None
    labels: list[int] | None = None
    region_masks: np.ndarray | None = None


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


def collate_raw(examples: list[Example], mode: DecodeMode, tokenizer, cfg: XSAMConfig) -> XSAMBatch:
    """-> a RAW XSAMBatch: images B x [3, H_b, W_b] uint8, masks bool at the original size."""
    input_ids, labels, regions, targets = [], [], [], []
    budget = text_budget(cfg)
    phrase = 0
    for b, ex in enumerate(examples):
        if ex.image.ndim != 3 or ex.image.shape[2] != 3 or ex.image.dtype != np.uint8:
            raise ValueError(f"example {b}: image must be [H, W, 3] uint8, got {ex.image.shape} {ex.image.dtype}")
        size = ex.image.shape[:2]
        ids, lab = encode_chat(ex.turns, tokenizer, budget)
        input_ids.append(torch.tensor(ids, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
        for name, m in (("region_masks", ex.region_masks), ("masks", ex.masks)):
            if m is not None and m.shape[1:] != size:
                raise ValueError(f"example {b}: {name} {m.shape[1:]} do not match the image {size}")
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
                     labels=labels, region_masks=regions, targets=targets)


def collate(examples: list[Example], mode: DecodeMode, tokenizer, cfg: XSAMConfig) -> XSAMBatch:
    """-> a PREPARED XSAMBatch on the CPU: SigLIP [B, 3, S, S] and SAM [B, 3, I, I] views, masks bool
    [., I, I] in the padded SAM frame (the CPU fallback of the device transform)."""
    return collate_raw(examples, mode, tokenizer, cfg).prepared(cfg.siglip.image_size, cfg.sam.image_size)
