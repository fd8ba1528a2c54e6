"""The evaluation engine's host side: shard reads and image decoding prefetched on threads, and a
progress line per benchmark.

Threads, not processes (as the training loader, xsam/train/loader.py): a ranged read from an object
store waits on the network and PIL's JPEG decode releases the GIL, so a few threads keep the device
fed while the main thread runs the model; results come back in the order asked, whatever finishes first.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from xsam.data.schema import Sample
from xsam.train.format_common import decode_image

log = logging.getLogger(__name__)
K = TypeVar("K")
T = TypeVar("T")


def prefetched(keys: Iterable[K], load: Callable[[K], T], threads: int = 2, ahead: int = 16) -> Iterator[T]:
    """load(k) for every key, in order, computed up to `ahead` keys ahead on `threads` threads
    (threads 0: inline). An exception is raised at the item it belongs to."""
    if threads <= 0:
        yield from map(load, keys)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="eval-read")
    pending: deque[Future] = deque()
    try:
        for k in keys:
            pending.append(pool.submit(load, k))
            if len(pending) > max(1, ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also on early exit: drop what is queued, wait for what runs
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def shard_loader(index) -> Callable:
    """A `load` for `prefetched` over a ShardIndex: ref -> (key, Sample, image [H, W, 3] uint8 RGB)."""

    def load(ref) -> tuple[str, Sample, np.ndarray]:
        sample, image = index.read(ref)
        return ref.key, sample, decode_image(image, sample)

    return load


class Progress:
    """A plain progress line per benchmark, at most every `every_s` seconds and once at the end
    (None / 0: silent): images done of the total, queries, images/s and queries/s, time left.

    The lines go to the `xsam.eval.engine_io` logger (INFO), or to `stream` when one is given. The
    closing "(done)" line of a benchmark that took less than `every_s` and wrote no line before is
    DEBUG: a run over many small benchmarks logs one line per checkpoint (the caller's), not one per
    benchmark, while a long benchmark is never silent for more than `every_s`."""

    def __init__(self, name: str, total: int | None, every_s: float | None = 30.0, stream=None):
        self.name, self.total, self.every_s = name, total, every_s
        self.stream = stream
        self.images = self.queries = 0
        self.lines = 0
        self.start = self.last = time.monotonic()

    def update(self, images: int, queries: int) -> None:
        self.images += images
        self.queries += queries
        now = time.monotonic()
        if self.every_s and now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def close(self) -> None:
        if self.every_s:
            self._print(time.monotonic(), final=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.images / elapsed
        of = f"/{self.total}" if self.total else ""
        left = ""
        if self.total and rate > 0 and self.images < self.total:
            left = f", {(self.total - self.images) / rate:.0f} s left"
        return (f"[eval] {self.name}: {self.images}{of} images, {self.queries} queries, {rate:.2f} images/s, "
                f"{self.queries / elapsed:.2f} queries/s{left}")

    def _print(self, now: float, final: bool = False) -> None:
        text = self.line(now) + (" (done)" if final else "")
        if self.stream is not None:
            print(text, file=self.stream, flush=True)
        else:
            short = final and self.lines == 0 and now - self.start < (self.every_s or 0)
            log.log(logging.DEBUG if short else logging.INFO, text)
        self.lines += 1
