"""Dataset balancing and single-task global batches (reference section 2).

Per epoch, for each dataset d with n_d samples (raw count c_d times an optional per-dataset
expansion `repeats[d]`, default 1):

    f_d = n_d / sum(n)                 share after expansion
    r_d = max(1, sqrt(t / f_d))        balancing repeat factor (t = 0.1 in the paper)
    m_d = r_d * repeats[d]             draws per raw sample, E_d = m_d * c_d = r_d * n_d per epoch

Dataset d contributes floor(E_d) + Bernoulli(frac(E_d)) draws: every raw sample floor(m_d)
times, plus the remaining draws as DISTINCT samples picked uniformly at random (the original
X-SAM repeats the leading items instead). So within an epoch every sample appears floor(m_d) or
floor(m_d) + 1 times.

The draws of each dataset are shuffled and cut into GLOBAL batches of G = world_size *
batch_per_rank samples of that one dataset (every rank of a step works on the same task: the
segmentation loss all-reduces, a rank with a chat-only batch would hang). The order of the global
batches over all datasets is shuffled; rank r takes slots [r*b, (r+1)*b) of every global batch.

Tail decision: a dataset's last global batch is PADDED to G, not dropped. Dropping would make a
dataset with fewer than G draws vanish from the epoch (a small source, or the fixture sets with
G = 64), and would leave up to G-1 samples unseen in a one-epoch S3 run. The padding (< G draws,
recorded as `GlobalBatch.pad`, the trailing entries of that batch) is drawn without replacement
from the samples that got no extra repeat, so the floor / floor + 1 bound above still holds
whenever pad <= c_d - extras (always at realistic sizes); only a dataset smaller than the padding
needs to repeat further. Steps per epoch = sum_d ceil(draws_d / G).

Everything is a pure function of (seed, epoch): each dataset's draws use a generator seeded with
(seed, epoch, crc32(name)), the batch order one seeded with (seed, epoch); dataset order in the
`counts` dict does not matter.
"""

from __future__ import annotations

import math
import threading
import zlib
from dataclasses import dataclass

import numpy as np

_ORDER_SALT = 0x0BA7C4


@dataclass(frozen=True)
class GlobalBatch:
    dataset: str
    indices: list[int]  # G sample indices into the dataset (ShardIndex.refs[dataset])
    pad: int = 0  # the last `pad` indices are tail padding, not balancing draws


def _name_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


class Schedule:
    def __init__(self, counts: dict[str, int], t: float = 0.1, batch_per_rank: int = 1, world_size: int = 1,
                 seed: int = 0, repeats: dict[str, float] | None = None):
        if batch_per_rank < 1 or world_size < 1:
            raise ValueError("batch_per_rank and world_size must be >= 1")
        repeats = dict(repeats or {})
        unknown = set(repeats) - set(counts)
        if unknown:
            raise ValueError(f"repeats for unknown datasets: {sorted(unknown)}")
        if any(v <= 0 for v in repeats.values()):
            raise ValueError(f"repeats must be > 0: {repeats}")
        self.counts = {d: int(n) for d, n in counts.items() if n > 0}  # an empty dataset contributes nothing
        if not self.counts:
            raise ValueError("no samples in any dataset")
        self.t = float(t)
        self.batch_per_rank = batch_per_rank
        self.world_size = world_size
        self.global_batch = batch_per_rank * world_size
        self.seed = seed
        self.repeats = {d: float(repeats.get(d, 1.0)) for d in self.counts}
        expanded = {d: n * self.repeats[d] for d, n in self.counts.items()}
        total = sum(expanded.values())
        self._r = {d: max(1.0, math.sqrt(self.t / (expanded[d] / total))) if self.t > 0 else 1.0
                   for d in self.counts}
        self._cache: dict[int, list[GlobalBatch]] = {}
        self._lock = threading.Lock()  # the loader's prefetch threads share the epoch cache

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ factors, for logging

    def repeat_factors(self) -> dict[str, float]:
        """r_d: the balancing factor of each dataset."""
        return dict(self._r)

    def multipliers(self) -> dict[str, float]:
        """m_d = r_d * repeats[d]: expected draws per raw sample per epoch."""
        return {d: self._r[d] * self.repeats[d] for d in self.counts}

    def expected_draws(self) -> dict[str, float]:
        return {d: m * self.counts[d] for d, m in self.multipliers().items()}

    # ------------------------------------------------------------ one epoch

    def draws(self, epoch: int, dataset: str) -> np.ndarray:
        """The balancing draws of one dataset in one epoch, shuffled (before cutting and padding)."""
        return self._draws(epoch, dataset)[0]

    def _draws(self, epoch: int, dataset: str) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        n = self.counts[dataset]
        m = self._r[dataset] * self.repeats[dataset]
        rng = np.random.default_rng([self.seed, epoch, _name_seed(dataset)])
        whole = math.floor(m + 1e-9)
        rest = max(0.0, m * n - whole * n)  # expected extra draws, in [0, n)
        k = math.floor(rest + 1e-9)
        if rest - k > 1e-9 and rng.random() < rest - k:
            k += 1
        k = min(k, n)
        extras = rng.choice(n, size=k, replace=False) if k else np.zeros(0, np.int64)
        draws = np.concatenate([np.tile(np.arange(n, dtype=np.int64), whole), extras.astype(np.int64)])
        rng.shuffle(draws)
        return draws, extras, rng

    def epoch(self, epoch: int) -> list[GlobalBatch]:
        """The global batches of `epoch`, in training order."""
        with self._lock:
            cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        g = self.global_batch
        batches: list[GlobalBatch] = []
        for dataset in sorted(self.counts):
            draws, extras, rng = self._draws(epoch, dataset)
            pad = (-len(draws)) % g
            if pad:
                draws = np.concatenate([draws, self._padding(dataset, extras, pad, rng)])
            for i in range(0, len(draws), g):
                chunk = draws[i:i + g].tolist()
                batches.append(GlobalBatch(dataset, chunk, pad if i + g >= len(draws) else 0))
        order = np.random.default_rng([self.seed, epoch, _ORDER_SALT]).permutation(len(batches))
        out = [batches[i] for i in order]
        with self._lock:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = out
        return out

    def _padding(self, dataset: str, extras: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
        """`pad` indices: first samples without an extra repeat (no replacement), then any, cycling."""
        n = self.counts[dataset]
        low = np.setdiff1d(np.arange(n, dtype=np.int64), extras)
        take = rng.choice(low, size=min(pad, len(low)), replace=False) if len(low) else np.zeros(0, np.int64)
        parts = [take.astype(np.int64)]
        left = pad - len(take)
        while left > 0:  # only when the dataset is smaller than the padding
            more = rng.choice(n, size=min(left, n), replace=False)
            parts.append(more.astype(np.int64))
            left -= len(more)
        return np.concatenate(parts)

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.epoch(epoch))

    def rank_batches(self, epoch: int, rank: int) -> list[tuple[str, list[int]]]:
        """This rank's (dataset, indices) per step of `epoch`: slots [rank*b, (rank+1)*b) of each global batch."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} not in [0, {self.world_size})")
        b = self.batch_per_rank
        return [(gb.dataset, gb.indices[rank * b:(rank + 1) * b]) for gb in self.epoch(epoch)]
