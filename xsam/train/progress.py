"""The training progress line of a stage, and when to write it.

    [train s3] step 120/400 (30%)  loss 2.314  12.5 samples/s  elapsed 9m36s  ETA 22m24s

One format on CPU and GPU. Rank 0 writes it through `logging` (xsam.train.progress, INFO):
- to a log file or through Ray (no terminal; Ray workers never have one): a line each time the stage
  passes another `every_frac` of its steps, at most one per `min_gap_s`, and the last step always -
  at most 1/every_frac + 1 lines per stage, whatever its length;
- to a terminal: the same line rewritten in place (at most every `tty_gap_s`), ended by the last one.

Throughput and ETA count only the steps done in this process (a resumed run does not credit the
steps before the resume), so the ETA is honest after a restart.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 2h07m, 3d04h."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class StageProgress:
    """Progress of one training stage of `total` optimizer steps, starting at `start` (a resume)."""

    def __init__(self, stage: str, total: int, start: int = 0, *, every_frac: float = 0.1,
                 min_gap_s: float = 30.0, tty: bool | None = None, tty_gap_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, stream=None):
        if total < 1:
            raise ValueError(f"total steps: {total!r} (a stage has at least one step)")
        if not 0 < every_frac <= 1:
            raise ValueError(f"every_frac: {every_frac!r} is not in (0, 1]")
        self.stage, self.total, self.start = stage, total, start
        self.every, self.min_gap_s, self.tty_gap_s = every_frac, min_gap_s, tty_gap_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.t0 = self.last_t = clock()
        self.next_mark = self._mark_after(start)
        self.lines = 0  # lines written (or in-place rewrites on a terminal)

    def _mark_after(self, step: int) -> int:
        """The first step past `step` that completes another `every_frac` of the total."""
        k = math.floor(step / (self.total * self.every) + 1e-9) + 1
        return min(self.total, math.ceil(k * self.total * self.every - 1e-9))

    def due(self, step: int, now: float) -> bool:
        """Whether the line for `step` is written now (see the module docstring)."""
        if step >= self.total:
            return True
        if self.tty:
            return now - self.last_t >= self.tty_gap_s
        return step >= self.next_mark and now - self.last_t >= self.min_gap_s

    def line(self, step: int, loss: float | None, samples_per_s: float | None, now: float) -> str:
        """The progress line at `step` (loss None: not known at this step; rate None: not measured)."""
        elapsed = now - self.t0
        pct = 100.0 * step / self.total
        parts = [f"[train {self.stage}] step {step}/{self.total} ({pct:.0f}%)"]
        parts.append(f"loss {loss:.4g}" if loss is not None and math.isfinite(loss) else "loss -")
        parts.append(f"{samples_per_s:.3g} samples/s" if samples_per_s else "- samples/s")
        parts.append(f"elapsed {duration(elapsed)}")
        done_here = step - self.start
        if step >= self.total:
            parts.append("done")
        elif done_here > 0 and elapsed > 0:
            parts.append(f"ETA {duration(elapsed / done_here * (self.total - step))}")
        else:
            parts.append("ETA -")
        return "  ".join(parts)

    def update(self, step: int, loss: float | Callable[[], float | None] | None,
               samples_per_s: float | None) -> str | None:
        """Record that `step` steps are done; write the line if it is due. -> the line written, or None.
        `loss` may be a callable, called only when the line is due (a device -> host sync in training)."""
        now = self.clock()
        if not self.due(step, now) or not log.isEnabledFor(logging.INFO):
            return None
        text = self.line(step, loss() if callable(loss) else loss, samples_per_s, now)
        self.last_t = now
        self.next_mark = self._mark_after(step)
        self.lines += 1
        if self.tty:  # rewritten in place; the last step ends the line
            end = "\n" if step >= self.total else ""
            self.stream.write(f"\r\x1b[2K{text}{end}")
            self.stream.flush()
        else:
            log.info(text)
        return text
