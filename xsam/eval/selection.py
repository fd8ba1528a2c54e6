"""Model selection in the MLflow model registry: every evaluated checkpoint is a model version; an
alias (default `champion`) points at the best one by a rule, and the decision is recorded as tags.
Aliases and tags, never the deprecated stages.

The rule `mean_primary` (each benchmark's primary metric is read from the version's evaluation run:
metric `metric_key(<benchmark>, <metric>)` and the run's tag `xsam.primary.<benchmark>` naming it; a missing or NaN
primary counts as NOT SCORED):

1. versions whose evaluation was partial (`--max-samples`: tag `xsam.partial` = "true" on the version)
   are not candidates: a quick run never moves the alias;
2. the benchmark set is the union of what the candidates scored; versions scored on ALL of it rank
   first, by the mean of their primaries over it;
3. a version missing a benchmark ranks below every complete one (then by how many it scored, then by
   its own mean), so dropping a hard benchmark can never win;
4. ties go to the newest version.
The decision (candidates, their coverage and scores, the rule) is returned and recorded as tags.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from xsam.tracking import filter_value, metric_name


@dataclass
class Decision:
    version: str
    score: float
    rule: str
    metrics: dict[str, float]  # the primary metric of each benchmark that decided it
    candidates: dict[str, float]  # version -> its own mean primary, best first


def metric_key(benchmark: str, metric: str) -> str:
    """The MLflow metric name of a benchmark's metric: `<dataset>/<split>/<metric>` by the one rule
    (xsam.tracking.metric_name: lowercase, "/" groups)."""
    return metric_name(benchmark, metric)


def register_checkpoint(client: MlflowClient, model_name: str, source: str, run_id: str,
                        tags: dict[str, str] | None = None, model_id: str | None = None) -> str:
    """A new version of `model_name` whose source is the checkpoint's logged pyfunc model (`models:/<model
    id>`, xsam.model.pyfunc; or any model / artifact URI); returns its number."""
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    version = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags or {},
                                          model_id=model_id)
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


RULE = ("mean_primary: candidates = versions not tagged partial; complete versions (every benchmark any "
        "candidate scored) first, by mean primary over that set; then incomplete ones by benchmarks scored, "
        "then own mean; ties to the newest")


def _is_partial(version) -> bool:
    return str((version.tags or {}).get("xsam.partial", "false")).lower() == "true"


def rank(per_version: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, dict]]:
    """Versions best first by the rule, and per version {"scored", "missing", "score"}. NaN = not scored."""
    finite = {v: {b: x for b, x in m.items() if math.isfinite(x)} for v, m in per_version.items()}
    union = set().union(*finite.values()) if finite else set()
    info = {}
    for v, m in finite.items():
        own = sum(m.values()) / len(m) if m else float("-inf")
        info[v] = {"scored": len(m), "missing": sorted(union - set(m)), "score": own}
    order = sorted(info, key=lambda v: (not info[v]["missing"], info[v]["scored"], info[v]["score"], int(v)),
                   reverse=True)
    return order, info


def select(client: MlflowClient, model_name: str, alias: str = "champion", rule: str = "mean_primary"
           ) -> Decision | None:
    """Point `alias` at the best version by `rule` and record why (registered-model and version tags).
    None (alias untouched) when no version is a candidate (all partial)."""
    if rule != "mean_primary":
        raise ValueError(f"unknown selection rule {rule!r} (known: mean_primary)")
    versions = client.search_model_versions(f"name = {filter_value(model_name)}")
    if not versions:
        raise ValueError(f"registered model {model_name!r} has no versions")
    candidates = [v for v in versions if v.run_id and not _is_partial(v)]
    if not candidates:
        return None
    per_version = {v.version: _primary_metrics(client, v.run_id) for v in candidates}
    order, info = rank(per_version)
    best = order[0]
    if not per_version[best]:
        raise ValueError(f"{model_name}: no candidate version has a scored benchmark")
    decision = Decision(version=best, score=info[best]["score"], rule=rule,
                        metrics=dict(sorted(per_version[best].items())),
                        candidates={v: info[v]["score"] for v in order})
    client.set_registered_model_alias(model_name, alias, best)
    record = json.dumps({"alias": alias, "version": best, "rule": RULE, "score": decision.score,
                         "benchmarks": decision.metrics, "ranking": [{"version": v, **info[v]} for v in order],
                         "excluded_partial": sorted((v.version for v in versions if _is_partial(v)), key=int)},
                        sort_keys=True)
    client.set_registered_model_tag(model_name, f"{alias}.decision", record)
    client.set_model_version_tag(model_name, best, f"{alias}.decision", record)
    return decision


def current_alias(client: MlflowClient, model_name: str, alias: str = "champion") -> str | None:
    """The version `alias` points at in the registry now (None if unset): what a run prints at its end."""
    try:
        return client.get_model_version_by_alias(model_name, alias).version
    except MlflowException:
        return None
