"""Model selection in the MLflow model registry: every evaluated checkpoint is a model version; an
alias (default `champion`) points at the best one by a rule, and the decision is recorded as tags.
Aliases and tags, never the deprecated stages.

The default rule is the mean, over the benchmarks every candidate was scored on, of each
benchmark's primary metric (read from the version's evaluation run: metric `<benchmark>/<metric>`
and the run's tag `xsam.primary.<benchmark>` naming the primary metric).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


@dataclass
class Decision:
    version: str
    score: float
    rule: str
    metrics: dict[str, float]  # the primary metric of each benchmark that decided it
    candidates: dict[str, float]  # version -> score


def metric_key(benchmark: str, metric: str) -> str:
    """The MLflow metric name of a benchmark's metric (MLflow allows '/' in metric names)."""
    return f"{benchmark}/{metric}"


def register_checkpoint(client: MlflowClient, model_name: str, source: str, run_id: str,
                        tags: dict[str, str] | None = None) -> str:
    """A new version of `model_name` whose source is the exported checkpoint; returns its number."""
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    version = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags or {})
    return version.version


def _primary_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    run = client.get_run(run_id)
    out = {}
    for tag, metric in run.data.tags.items():
        if tag.startswith("xsam.primary."):
            benchmark = tag[len("xsam.primary."):]
            key = metric_key(benchmark, metric)
            if key in run.data.metrics:
                out[benchmark] = run.data.metrics[key]
    return out


def select(client: MlflowClient, model_name: str, alias: str = "champion", rule: str = "mean_primary") -> Decision:
    """Point `alias` at the best version by `rule` and record why (registered-model and version tags)."""
    if rule != "mean_primary":
        raise ValueError(f"unknown selection rule {rule!r} (known: mean_primary)")
    versions = client.search_model_versions(f"name = '{model_name}'")
    if not versions:
        raise ValueError(f"registered model {model_name!r} has no versions")
    per_version = {v.version: _primary_metrics(client, v.run_id) for v in versions if v.run_id}
    common = set.intersection(*(set(m) for m in per_version.values())) if per_version else set()
    if not common:
        raise ValueError(f"{model_name}: the versions share no scored benchmark")
    scores = {v: sum(m[b] for b in common) / len(common) for v, m in per_version.items()}
    best = max(scores, key=lambda v: (scores[v], int(v)))  # ties: the newest version
    decision = Decision(version=best, score=scores[best], rule=rule,
                        metrics={b: per_version[best][b] for b in sorted(common)}, candidates=scores)
    client.set_registered_model_alias(model_name, alias, best)
    record = json.dumps({"alias": alias, "version": best, "rule": rule, "score": decision.score,
                         "benchmarks": decision.metrics, "candidates": scores}, sort_keys=True)
    client.set_registered_model_tag(model_name, f"{alias}.decision", record)
    client.set_model_version_tag(model_name, best, f"{alias}.decision", record)
    return decision
