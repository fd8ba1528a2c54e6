"""Selection you can trust: one metric-naming rule (every primary exists), a version missing a
benchmark ranks below complete ones, NaN is not a score, partial evaluations never move the alias, the
alias is read back from the registry. Against a real MLflow server on 127.0.0.1 (tests/eval/conftest.py)."""

import math
import uuid

import numpy as np
import pytest

from xsam.data import masks as rle
from xsam.data.schema import PromptType, Task
from xsam.eval.benchmark import PRIMARY, Benchmark
from xsam.eval.selection import current_alias, rank, register_checkpoint, select


def test_rank_complete_versions_first_nan_is_missing_ties_newest():
    order, info = rank({
        "1": {"a": 50.0, "b": 50.0},
        "2": {"a": 90.0},                      # higher mean, but misses b: below every complete version
        "3": {"a": 40.0, "b": float("nan")},   # NaN = not scored
        "4": {"a": 60.0, "b": 40.0},           # ties version 1 on the mean: the newest wins
    })
    assert order == ["4", "1", "2", "3"]
    assert info["2"]["missing"] == ["b"] and info["3"]["missing"] == ["b"] and info["1"]["missing"] == []
    assert info["4"]["score"] == pytest.approx(50.0)


def test_every_task_reports_its_primary_in_lowercase():
    cats = [{"id": 1, "name": "box", "isthing": 1}]
    for task in PRIMARY:
        bench = Benchmark("d", "val", task, cats)
        if task is Task.gcg:  # needs no java for the mask metrics; skip the caption scorer here
            continue
        out = bench.result(bench.new())
        assert bench.primary in out and all(k == k.lower() for k in out), task
    # VGD: the per-type AP is "point/ap" (was "point/AP") and the primary "ap" averages them: finite
    bench = Benchmark("d", "val", Task.vgd, cats)
    acc = bench.new()
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 1
    enc = rle.encode(m)
    acc[PromptType.point.value].add([{"mask": enc, "category_id": 1}], [{"mask": enc, "category_id": 1, "score": 1.0}])
    out = bench.result(acc)
    assert "point/ap" in out and math.isfinite(out["ap"]) and out["ap"] == pytest.approx(out["point/ap"])


def _version(client, model: str, metrics: dict[str, float], partial: bool = False) -> str:
    exp = client.get_experiment_by_name("sel") or client.get_experiment(client.create_experiment("sel"))
    run = client.create_run(exp.experiment_id, tags={f"xsam.primary.{b}": "ap" for b in metrics})
    for b, v in metrics.items():
        client.log_metric(run.info.run_id, f"{b}/ap", v)
    client.set_terminated(run.info.run_id)
    return register_checkpoint(client, model, f"s3://bucket/{uuid.uuid4().hex}/export", run.info.run_id,
                               {"xsam.partial": "true" if partial else "false"})


def test_select_against_a_real_registry(mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    model = f"sel-{uuid.uuid4().hex[:8]}"
    v1 = _version(client, model, {"a/val": 30.0, "b/val": 30.0, "vgd/val": 30.0})
    v2 = _version(client, model, {"a/val": 99.0, "b/val": 99.0, "vgd/val": float("nan")})  # NaN on one benchmark
    v3 = _version(client, model, {"a/val": 99.0, "b/val": 99.0})                          # benchmark left out
    v4 = _version(client, model, {"a/val": 95.0, "b/val": 95.0, "vgd/val": 95.0}, partial=True)
    decision = select(client, model)
    assert decision.version == v1  # the only complete, non-partial candidate
    assert list(decision.candidates)[:1] == [v1] and v4 not in decision.candidates
    assert current_alias(client, model) == v1
    tags = client.get_registered_model(model).tags["champion.decision"]
    assert '"excluded_partial": ["' + v4 + '"]' in tags

    # a better complete version takes it; a partial one never does, even when best
    v5 = _version(client, model, {"a/val": 40.0, "b/val": 40.0, "vgd/val": 40.0})
    assert select(client, model).version == v5 and {v2, v3} <= set(select(client, model).candidates)

    only_partial = f"sel-{uuid.uuid4().hex[:8]}"
    _version(client, only_partial, {"a/val": 10.0}, partial=True)
    assert select(client, only_partial) is None and current_alias(client, only_partial) is None
