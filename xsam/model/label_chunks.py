"""Any label space fits: category lists longer than the text budget are split into chunks that fit.

A generic prompt lists every category (``<p>name</p>, ...``); LVIS's 1,203 names are ~11k tokens against a
text budget of 2,319 (`batching.text_budget`), and truncation would cut `<SEG>` and the tail of the list.
So the names are cut into consecutive chunks whose whole chat (question + answer) fits, the model runs
one teacher-forced pass per chunk, and the passes are merged into ONE prediction over all categories:

    logits [sum_i Q, K + 1]: pass i's queries score only chunk i's categories (the other columns -inf)
                             and keep their own background column (last);
    masks  [sum_i Q, h, w]:  every pass's mask proposals.

Softmax over a merged row equals the pass's own softmax, so the post-processing (semantic / instance /
panoptic) sees each pass's proposals with their own class distribution. One chunk = the single pass,
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from xsam.model.tokenizer import encode_chat


def text_tokens(turns: Sequence[tuple[str, str]], tokenizer) -> int:
    """Text (non-placeholder) tokens of a chat, uncut."""
    ids, _ = encode_chat(turns, tokenizer, 1 << 30)
    return sum(1 for i in ids if i >= 0)


def chunk(names: Sequence[str], fits: Callable[[Sequence[str]], bool]) -> list[list[int]]:
    """Consecutive index chunks of `names`, each as long as `fits` allows (greedy, exact: every chunk is
    checked with `fits`). A single name that does not fit is an error naming it."""
    out: list[list[int]] = []
    start = 0
    while start < len(names):
        if fits(names[start:]):  # the usual case: the rest fits in one pass
            out.append(list(range(start, len(names))))
            break
        if not fits(names[start:start + 1]):
            raise ValueError(f"the category {names[start]!r} alone does not fit the text budget")
        lo, hi = start + 1, len(names)  # largest end with fits(names[start:end]): binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(names[start:mid]):
                lo = mid
            else:
                hi = mid - 1
        out.append(list(range(start, lo)))
        start = lo
    return out


def merge(parts: Sequence[tuple[Tensor, Tensor]], chunks: Sequence[Sequence[int]], num_classes: int
          ) -> tuple[Tensor, Tensor]:
    """Per-chunk (logits [Q, k_i + 1], masks [Q, h, w]) -> (logits [sum Q, K + 1], masks [sum Q, h, w])."""
    if len(parts) == 1 and len(chunks[0]) == num_classes:
        return parts[0]
    rows, masks = [], []
    for (logits, m), idx in zip(parts, chunks):
        full = torch.full((logits.shape[0], num_classes + 1), float("-inf"), dtype=torch.float32,
                          device=logits.device)
        full[:, list(idx)] = logits[:, :-1].float()
        full[:, -1] = logits[:, -1].float()
        rows.append(full)
        masks.append(m)
    return torch.cat(rows), torch.cat(masks)
