"""Tiny X-SAM models and synthetic examples for the model tests."""

from __future__ import annotations

import numpy as np
import torch

from xsam.model.batching import Example
from xsam.model.builder import build_model
from xsam.model.config import tiny
from xsam.model.stages import STAGES, apply_policy
from xsam.model.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer


def tiny_tokenizer(folder):
    return build_tiny_tokenizer(folder)


def tiny_model(tokenizer, stage: str = "s3", seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny()
    policy = STAGES[stage]
    model = build_model(cfg, policy.parts, len(tokenizer) if tokenizer is not None else None)
    if tokenizer is not None:
        model.special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    apply_policy(model, policy, unused=model.unused_prefixes())
    return cfg, model


def boxes_image(seed: int, h: int = 48, w: int = 64, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """An image with n coloured rectangles on a dark background and their masks [n, h, w]."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 20, np.uint8)
    masks = np.zeros((n, h, w), bool)
    for k in range(n):
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + int(rng.integers(h // 4, h // 2)), x0 + int(rng.integers(w // 4, w // 2))
        masks[k, y0:y1, x0:x1] = True
        masks[:k, y0:y1, x0:x1] = False  # later boxes occlude earlier ones
        image[y0:y1, x0:x1] = rng.integers(60, 255, size=3)
    return image, masks


def generic_example(seed: int) -> Example:
    image, masks = boxes_image(seed)
    q = "<image>\nCan you segment the image based on the following categories: <p>red box</p>, <p>blue box</p>? " \
        "Please output the segmentation masks."
    return Example(image=image, turns=[(q, "Sure, <SEG>.")], masks=masks, labels=[0, 1])


def referring_example(seed: int) -> Example:
    image, masks = boxes_image(seed, n=1)
    return Example(image=image, turns=[("<image>\nPlease segment <p>the box</p> in this image.", "<SEG>.")],
                   masks=masks, labels=[0])


def gcg_example(seed: int) -> Example:
    image, masks = boxes_image(seed)
    q = "<image>\nCan you provide a brief description of this image? Please output interleaved segmentation masks."
    a = "A <p>red box</p> beside a <p>blue box</p>. And <SEG>."
    return Example(image=image, turns=[(q, a)], masks=masks, labels=[0, 1])


def vgd_example(seed: int) -> Example:
    image, masks = boxes_image(seed)
    q = "<image>\nCan you segment the image based on the following regions: <p><region></p>, <p><region></p>? " \
        "Please output the corresponding segmentation mask."
    return Example(image=image, turns=[(q, "<SEG>.")], masks=masks, labels=[0, 1], region_masks=masks)


def chat_example(seed: int) -> Example:
    image, _ = boxes_image(seed)
    return Example(image=image, turns=[("<image>\nWhat is in the image?", "Two boxes on a dark background.")])
