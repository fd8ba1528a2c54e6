"""From formatted examples (image, chat turns, target masks) to an `XSAMBatch`.

The training loader (per-read templates, negatives, sentence choice) produces `Example`s; this
module only does the deterministic part: image views, tokenisation with the chat template, mask
targets in the padded SAM frame, and the per-sample / per-phrase target layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xsam.model.config import XSAMConfig
from xsam.model.preprocess import image_views, mask_targets
from xsam.model.tokenizer import encode_chat
from xsam.model.xsam import DecodeMode, XSAMBatch


@dataclass
class Example:
    """One image's training example.

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


def collate(examples: list[Example], mode: DecodeMode, tokenizer, cfg: XSAMConfig) -> XSAMBatch:
    views = [image_views(ex.image, cfg.siglip.image_size, cfg.sam.image_size) for ex in examples]
    input_ids, labels, regions, targets = [], [], [], []
    budget = text_budget(cfg)
    phrase = 0
    for ex in examples:
        ids, lab = encode_chat(ex.turns, tokenizer, budget)
        input_ids.append(torch.tensor(ids, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
        regions.append(mask_targets(ex.region_masks, cfg.sam.image_size).bool()
                       if ex.region_masks is not None else None)
        if mode is DecodeMode.none:
            continue
        masks = mask_targets(ex.masks, cfg.sam.image_size)
        if mode is DecodeMode.per_sample:
            targets.append({"labels": torch.tensor(ex.labels, dtype=torch.long), "masks": masks})
        else:  # one decoder item per phrase, labelled with its index among all phrases of the batch
            for j in range(len(masks)):
                targets.append({"labels": torch.tensor([phrase], dtype=torch.long), "masks": masks[j:j + 1]})
                phrase += 1
    return XSAMBatch(mode=mode, sam_pixels=torch.stack([v.sam for v in views]),
                     siglip_pixels=torch.stack([v.siglip for v in views]), input_ids=input_ids, labels=labels,
                     region_masks=regions, targets=targets)
