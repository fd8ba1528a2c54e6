"""The mixture one balanced epoch draws: per dataset its samples, records after expansion, balancing repeat
factor r_d, draws per epoch and share of all draws.

A view of `xsam.train.sampling.Schedule`, not a second formula: the figures are the Schedule's own
`repeat_factors()` and `expected_draws()` for `Schedule(samples, t, repeats=records / samples)`, which is
how training balances (`xsam.train.recipe`: repeats = `ShardIndex.expansions()`). Used by the dry-run plan
(pipelines/plan.py) and the training run's MLflow params (pipelines/train.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from xsam.train.sampling import Schedule


@dataclass(frozen=True)
class SourceMix:
    samples: int  # stored samples (one per image)
    records: int  # training records after the recipe's expansion (xsam.data.expansion)
    repeat: float  # r_d = max(1, sqrt(t / f_d)), f_d the dataset's share of all records
    draws: float  # expected draws per epoch: r_d * records
    share: float  # percent of all draws of the epoch

    @property
    def expansion(self) -> float:
        """Records per stored sample."""
        return self.records / self.samples


def mixture(samples: dict[str, int], records: dict[str, int], t: float) -> dict[str, SourceMix]:
    """Per dataset with samples (an empty one draws nothing and is left out; none at all -> {}).

    records: per dataset; a dataset missing from it, or with 0 records, is balanced as one record per
    sample, as training does (`ShardIndex.expansions()` leaves it out of the Schedule's repeats)."""
    counts = {d: int(n) for d, n in samples.items() if n and n > 0}
    if not counts:
        return {}
    schedule = Schedule(counts, t, repeats={d: records[d] / n for d, n in counts.items() if records.get(d)})
    repeat, draws = schedule.repeat_factors(), schedule.expected_draws()
    total = sum(draws.values())
    return {d: SourceMix(n, int(records.get(d, n)), repeat[d], draws[d], 100.0 * draws[d] / total)
            for d, n in counts.items()}
