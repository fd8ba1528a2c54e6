"""The training loader: a rank's batches from a Schedule over a ShardIndex, resumable at any step.

    loader = Loader(index, schedule, rank, format_fn, collate_fn, seed, start=(epoch, step))
    for (epoch, step), dataset, batch in loader:
        ...
        checkpoint["loader"] = loader.state()      # the next (epoch, step) to run

Iteration crosses epochs (forever, or until `num_epochs`). Each sample's randomness (category
negatives, templates, sentence choice, ...) comes from

    rng = np.random.default_rng([seed, epoch, global position of the sample in the epoch])

with global position = step * G + rank * batch_per_rank + slot, so the content of a step depends
only on (seed, epoch, step, rank): a resumed run reproduces exactly what an uninterrupted run
would have produced, and the same position never gets the same draw twice.

format_fn(sample, image_bytes, rng) -> list of formatted items (a sample may give several, e.g.
referring chunks); collate_fn(items) -> batch.

Replacement. A sample that formats to nothing (e.g. only crowd regions), or whose stored image does
not decode (`UndecodableImage`: corrupt data behind a valid header, in shards converted without a
full decode), is replaced by the next sample of its dataset in index order (i + 1, i + 2, ...), read
with the rng of its slot plus the attempt number. The replacement depends only on (seed, epoch,
position, index): every run and every resume picks the same one, and each rank still fills its whole
batch, so no rank raises while the others wait at the next collective. An undecodable image is
logged once per loader (a WARNING naming the sample key and its shard).

Prefetch: with `prefetch > 0` a pool of `threads` background threads builds up to `prefetch`
whole batches ahead (one batch per thread at a time: give prefetch >= threads); batches are handed
out in schedule order regardless of which finishes first, so the output is identical with or without
prefetch and for any number of threads. An exception in a worker is re-raised at the batch it belongs
to. `state()` always names the batch after the last one YIELDED (not the last one prefetched).

Threads, not processes. The loader ships raw batches (uint8 images, bool masks at the original size;
the model builds views and targets on its device), ~5-6 ms of CPU per sample: ONE thread feeds ~170-200
samples/s from local shards, several times what an H100 consumes (benchmarks/input_pipeline.py). More
threads overlap what releases the GIL: object-store reads (tens of ms of latency per ranged GET: the
main reason for `threads`), PIL's JPEG decode, numpy copies; not the rest (pycocotools' RLE decode, the
formatter's Python, tokenisation): on local shards 2 threads gave ~1.2x on 2 cores. Processes would scale with
cores but need picklable format / collate functions and fork-safe storage clients (batches also stay
in-process here: no pickling of image-sized arrays). Each loader thread runs torch single-threaded
(`torch_threads`): T threads each spawning an intra-op team of all cores would oversubscribe the
worker's CPUs. (torch's intra-op thread count is per thread: a thread whose first torch call comes
later inherits the last value set; threads that already ran torch, such as the training loop's, keep
theirs.)
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from xsam.data.images import UndecodableImage
from xsam.train.sampling import Schedule
from xsam.train.shard_index import ShardIndex

log = logging.getLogger(__name__)

Position = tuple[int, int]  # (epoch, step)


class Loader:
    def __init__(self, index: ShardIndex, schedule: Schedule, rank: int,
                 format_fn: Callable[[Any, bytes, np.random.Generator], list],
                 collate_fn: Callable[[list], Any], seed: int, start: Position = (0, 0), *,
                 num_epochs: int | None = None, prefetch: int = 0, threads: int = 1, torch_threads: int = 1):
        missing = set(schedule.counts) - set(index.refs)
        if missing:
            raise ValueError(f"schedule datasets not in the index: {sorted(missing)}")
        for d, n in schedule.counts.items():
            if len(index.refs[d]) != n:
                raise ValueError(f"{d}: schedule counts {n} samples, the index {len(index.refs[d])}")
        if not 0 <= rank < schedule.world_size:
            raise ValueError(f"rank {rank} not in [0, {schedule.world_size})")
        self.index = index
        self.schedule = schedule
        self.rank = rank
        self.format_fn = format_fn
        self.collate_fn = collate_fn
        self.seed = seed
        self.num_epochs = num_epochs
        self.prefetch = max(0, prefetch)
        self.threads = max(1, threads)
        self.torch_threads = max(1, torch_threads)
        self._next = self._normalise(tuple(start))
        self._undecodable: set[str] = set()  # keys already logged (build runs in several threads)
        self._undecodable_lock = threading.Lock()

    # ------------------------------------------------------------ positions

    def _normalise(self, pos: Position) -> Position:
        epoch, step = pos
        if epoch < 0 or step < 0:
            raise ValueError(f"bad position {pos}")
        while step >= self.schedule.steps_per_epoch(epoch):
            step -= self.schedule.steps_per_epoch(epoch)
            epoch += 1
        return epoch, step

    def state(self) -> Position:
        """The (epoch, step) the next batch will have: pass it as `start` to resume."""
        return self._next

    def positions(self, start: Position) -> Iterator[Position]:
        epoch, step = self._normalise(start)
        while self.num_epochs is None or epoch < self.num_epochs:
            steps = self.schedule.steps_per_epoch(epoch)
            for s in range(step, steps):
                yield epoch, s
            epoch, step = epoch + 1, 0

    # ------------------------------------------------------------ one batch

    def build(self, pos: Position) -> tuple[str, Any]:
        """(dataset, collated batch) of this rank at `pos`: a pure function of the position."""
        epoch, step = pos
        gb = self.schedule.epoch(epoch)[step]
        b = self.schedule.batch_per_rank
        first = step * self.schedule.global_batch + self.rank * b
        refs = self.index.refs[gb.dataset]
        items: list = []
        for slot, i in enumerate(gb.indices[self.rank * b:(self.rank + 1) * b]):
            # a sample with nothing to learn from (e.g. only crowd regions) formats to [], one whose image
            # does not decode raises: take the next sample of the same dataset instead, deterministically,
            # so every rank still fills its batch (module docstring: Replacement)
            for attempt in range(len(refs)):
                ref = refs[(i + attempt) % len(refs)]
                sample, image = self.index.read(ref)
                rng = np.random.default_rng([self.seed, epoch, first + slot] + ([attempt] if attempt else []))
                try:
                    formatted = self.format_fn(sample, image, rng)
                except UndecodableImage as e:
                    self._log_undecodable(ref, e)
                    continue
                if formatted:
                    items.extend(formatted)
                    break
            else:
                raise ValueError(f"{gb.dataset}: no sample of the dataset gives a training example")
        return gb.dataset, self.collate_fn(items)

    def _log_undecodable(self, ref, error: UndecodableImage) -> None:
        with self._undecodable_lock:
            if ref.key in self._undecodable:
                return
            self._undecodable.add(ref.key)
        log.warning("rank %d: sample %s (shard %s) has an image that does not decode, replaced by the next "
                    "sample of %s wherever it is drawn: %s", self.rank, ref.key, ref.shard, ref.dataset, error)

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[Position, str, Any]]:
        positions = self.positions(self._next)
        if self.prefetch == 0:
            for pos in positions:
                dataset, batch = self.build(pos)
                self._advance(pos)
                yield pos, dataset, batch
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"loader-r{self.rank}",
                                  initializer=torch.set_num_threads, initargs=(self.torch_threads,))
        pending: deque[tuple[Position, Future]] = deque()
        try:
            for pos in positions:
                pending.append((pos, pool.submit(self.build, pos)))
                if len(pending) > self.prefetch:
                    yield self._pop(pending)
            while pending:
                yield self._pop(pending)
        finally:  # also on early exit (break / close): drop what is queued, wait for what runs
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _pop(self, pending: deque) -> tuple[Position, str, Any]:
        pos, fut = pending.popleft()
        dataset, batch = fut.result()
        self._advance(pos)
        return pos, dataset, batch

    def _advance(self, pos: Position) -> None:
        epoch, step = pos
        self._next = self._normalise((epoch, step + 1))

    def __len__(self) -> int:
        """Steps left until `num_epochs` (only when it is set)."""
        if self.num_epochs is None:
            raise TypeError("an endless loader has no length: set num_epochs")
        epoch, step = self._next
        return sum(self.schedule.steps_per_epoch(e) for e in range(epoch, self.num_epochs)) - step
