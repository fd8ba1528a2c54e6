"""MLflow conventions shared by training, evaluation, the workflow and the sweep.

- `experiment_id(client, name, tracking_uri)`: get or create an experiment. It is tagged
  `mlflow.experimentKind = custom_model_development` (the MLflow 3 UI then opens on the runs table, not
  the GenAI overview) and, when the tracking store is a local sqlite / file store, created with its
  artifacts under the store's own folder (`<store folder>/mlartifacts/<experiment>`), never under the
  `./mlruns` of whatever folder the command ran in. A tracking server keeps its own artifact root.
- `metric_name(*parts)`: ONE rule for every metric name: lowercase, groups joined by "/", anything but
  `[a-z0-9_-]` inside a group becomes "_" (`loss/total`, `fixture_refcoco/val/ciou`, `point/ap50`).
- `filter_value(text)`: a string quoted for an MLflow filter string (`name = {filter_value(name)}`), so a
  run or model name holding a `'` is looked up, not a broken filter.
- `redacted_params(cfg_dict)`: a config's values as MLflow params, credentials in any URI masked.
- `PARENT_TAG`: runs are flat (no `mlflow.parentRunId`: nested runs hide in the UI); a run started by
  another (a workflow's step, a workflow's evaluation) names it in this tag.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI (genai_development | custom_model_development)
EXPERIMENT_KIND = "custom_model_development"
PARENT_TAG = "xsam.parent_run"
ARTIFACTS_DIR = "mlartifacts"

_BAD = re.compile(r"[^a-z0-9_\-]+")


def filter_value(text: str) -> str:
    """`text` as a quoted value for an MLflow search filter. MLflow's parser strips the outer quotes
    without unescaping anything inside, so the quote that `text` does not contain is chosen: '...'
    normally, "..." when `text` holds a `'`. A text holding both quotes, or ending in a backslash (the
    parser reads it as escaping the closing quote), cannot be written: ValueError naming it."""
    text = str(text)
    if text.endswith("\\"):
        raise ValueError(f"{text!r}: a name ending in a backslash cannot be searched for in MLflow; rename it")
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"{text!r}: a name holding both ' and \" cannot be searched for in MLflow; rename it")


def redacted_params(values: dict) -> dict[str, str]:
    """`values` (a config dict) as MLflow param strings (JSON for non-strings) with URI credentials and
    AWS keys masked (xsam.logs.redact): the tracking URI may carry `user:password@`."""
    import json

    from xsam.logs import redact

    return {k: redact(v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()}


def metric_name(*parts: str) -> str:
    """The MLflow metric name of `parts` (each may already hold "/" groups) by the one rule above.
    An empty group (a leading, trailing or doubled "/") is refused, naming the input."""
    groups = "/".join(str(p) for p in parts).lower().split("/")
    if any(not g.strip() for g in groups):
        raise ValueError(f"metric name {'/'.join(map(str, parts))!r}: an empty '/' group")
    return "/".join(_BAD.sub("_", g.strip()).strip("_") or "_" for g in groups)


def normalise_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` with every name through `metric_name`; two names that collide are refused."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = metric_name(key)
        if name in out:
            raise ValueError(f"metrics {key!r} and another name both normalise to {name!r}")
        out[name] = value
    return out


def local_store_folder(tracking_uri: str | None) -> Path | None:
    """The folder of a local sqlite database or file store named by `tracking_uri`, None for a server."""
    if not tracking_uri:
        return None
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):]  # sqlite:///rel.db (from cwd) or sqlite:////abs.db
        return Path(unquote(path)).resolve().parent
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and tracking_uri[1:3] == ":\\"):  # a plain path
        return Path(tracking_uri).resolve()
    return None


def artifact_location(tracking_uri: str | None, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: `<store folder>/mlartifacts/<experiment>` (a file:// URI) for a
    local store; None (the server's own artifact root) otherwise."""
    folder = local_store_folder(tracking_uri)
    if folder is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.\-]+", "_", experiment)
    return (folder / ARTIFACTS_DIR / safe).as_uri()


def experiment_id(client, name: str, tracking_uri: str | None = None) -> str:
    """The id of experiment `name`, created if missing (artifacts under the store, see the module
    docstring); its kind tag is set when absent, also on an experiment made before this rule."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location(tracking_uri, name),
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by a concurrent process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
        else:
            return exp_id
    else:
        exp_id = exp.experiment_id
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp_id
