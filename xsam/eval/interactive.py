"""Interactive segmentation metrics per visual-prompt type, as a mergeable accumulator.

One sample = one visual prompt (point / scribble / box / mask) with its predicted and ground-truth
masks. Per prompt type the numbers are those of `xsam.eval.referring`: mIoU is the mean per-sample
IoU (= gIoU, empty union counts 1.0) and cIoU pools intersections and unions. Result keys are
``"<type>/miou"`` and ``"<type>/ciou"`` for every type that has samples (types come from the fixed
`PromptType` enum, never from data), plus ``"miou"`` / ``"ciou"`` over all samples of all types.
The paper reports the per-type mIoU (point 65.4, box 70.0); the primary metric is the pooled mIoU.

The original's protocol upstream of this accumulator: the prediction of one prompt is
`xsam.model.postprocess.interactive` (score = class probability x mean in-mask probability, keep
score >= 0.5 or the best, pick by BOX IoU with the prompt's box; intseg_process_fn.py), and the point
/ scribble prompts are dilated into discs of radius 10 / 5 when PSALM's file is read (the
`psalm_interactive` reader, as X-SAM's IntSegDataset does), so the shards hold the prompts X-SAM uses.
"""

from __future__ import annotations

from typing import Any

from xsam.data.schema import PromptType
from xsam.eval.referring import ReferringAccumulator

PRIMARY_METRIC = "miou"
PROMPT_TYPES = tuple(t.value for t in PromptType)


def _key(prompt_type: str, metric: str) -> str:
    return f"{prompt_type}/{metric}"


class InteractiveAccumulator:
    """One `ReferringAccumulator` per prompt type."""

    primary_metric = PRIMARY_METRIC
    metric_names = ("miou", "ciou") + tuple(_key(t, m) for t in PROMPT_TYPES for m in ("miou", "ciou"))

    def __init__(self):
        self.per_type: dict[str, ReferringAccumulator] = {t: ReferringAccumulator() for t in PROMPT_TYPES}

    def __len__(self) -> int:
        return sum(len(a) for a in self.per_type.values())

    def add(self, pred: Any, gt: Any, prompt_type: str | PromptType) -> float:
        """Add one sample ((H, W) bool masks) of the given prompt type; returns its IoU (0..1)."""
        ptype = PromptType(prompt_type).value  # raises ValueError on an unknown type
        return self.per_type[ptype].add(pred, gt)

    def __add__(self, other: InteractiveAccumulator) -> InteractiveAccumulator:
        if not isinstance(other, InteractiveAccumulator):
            raise TypeError(f"cannot merge InteractiveAccumulator with {type(other).__name__}")
        out = InteractiveAccumulator()
        out.per_type = {t: self.per_type[t] + other.per_type[t] for t in PROMPT_TYPES}
        return out

    def __radd__(self, other: Any) -> InteractiveAccumulator:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    def result(self) -> dict[str, float]:
        """{"miou", "ciou", "<type>/miou", "<type>/ciou" for types with samples} in percent."""
        pooled = sum(self.per_type.values(), ReferringAccumulator()).result()
        out = {"miou": pooled["giou"], "ciou": pooled["ciou"]}
        for ptype in PROMPT_TYPES:
            acc = self.per_type[ptype]
            if len(acc):
                r = acc.result()
                out[_key(ptype, "miou")] = r["giou"]
                out[_key(ptype, "ciou")] = r["ciou"]
        return out
