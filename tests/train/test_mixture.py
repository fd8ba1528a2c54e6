"""The mixture the plan prints and the training run logs is the Schedule's own: the same r_d and expected
draws as `Schedule(samples, t, repeats=records / samples)`, shares of the draws summing to 100; the MLflow
params of a training run hold it per dataset, as training balances the converted manifests."""

from __future__ import annotations

import json

import pytest

from tests.helpers import convert_fixtures
from xsam.train.mixture import mixture
from xsam.train.sampling import Schedule

CASES = [
    # one big chat set, referring sets expanded ~7x and ~3.5x, tiny sets balanced up
    ({"chat": 600_000, "ref": 17_000, "refg": 22_000, "tiny": 239, "gcg": 31_000},
     {"chat": 600_000, "ref": 114_000, "refg": 76_000, "tiny": 239, "gcg": 31_000}, 0.1),
    ({"a": 10, "b": 3, "c": 1}, {"a": 10, "b": 17, "c": 5}, 0.3),
    ({"a": 5, "b": 5}, {"a": 5, "b": 5}, 0.0),  # t = 0: no balancing
]


@pytest.mark.parametrize("samples,records,t", CASES)
def test_mixture_is_what_the_schedule_draws(samples, records, t):
    schedule = Schedule(samples, t, repeats={d: records[d] / n for d, n in samples.items()})
    mix = mixture(samples, records, t)
    assert {d: m.repeat for d, m in mix.items()} == schedule.repeat_factors()
    assert {d: m.draws for d, m in mix.items()} == schedule.expected_draws()
    assert sum(m.share for m in mix.values()) == pytest.approx(100.0)
    for d, m in mix.items():
        assert (m.samples, m.records) == (samples[d], records[d])
        assert m.expansion == pytest.approx(records[d] / samples[d])
        assert m.draws == pytest.approx(m.repeat * m.records)
        assert m.repeat >= 1.0


def test_records_change_the_balance_not_only_the_counts():
    """Expanding the small set raises its share and lowers its repeat factor (f_d over records)."""
    samples = {"big": 1000, "ref": 100}
    raw, expanded = mixture(samples, samples, 0.5), mixture(samples, {"big": 1000, "ref": 400}, 0.5)
    assert expanded["ref"].share > raw["ref"].share
    assert expanded["ref"].repeat < raw["ref"].repeat


def test_missing_or_zero_records_are_one_per_sample_and_empty_sets_left_out():
    samples = {"a": 10, "b": 4, "empty": 0}
    mix = mixture(samples, {"a": 30}, 0.1)
    assert set(mix) == {"a", "b"}
    assert mix["b"].records == 4 and mix["b"].draws == Schedule({"a": 10, "b": 4}, 0.1, repeats={"a": 3.0}
                                                                ).expected_draws()["b"]
    zero = mixture({"a": 10, "b": 4}, {"a": 30, "b": 0}, 0.1)  # as ShardIndex.expansions: no repeat for b
    assert zero["b"].draws == mix["b"].draws
    assert mixture({"a": 0}, {}, 0.1) == {}


# --------------------------------------------------------------------------- the training run's MLflow params
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    _, out, outcomes = convert_fixtures(tmp, ["refer", "llava"], log=lambda _: None)
    assert all(o.status == "converted" for o in outcomes)
    return tmp, out


def test_mlflow_params_hold_the_mixture_training_balances(shards):
    """start_mlflow_run logs mix.<dataset>.* equal to the Schedule the recipe builds from the ShardIndex;
    a manifest without num_records says so and counts one record per sample."""
    from mlflow import MlflowClient

    from xsam.pipelines.train import mixture_params, start_mlflow_run
    from xsam.train.config import load_profile, profile_path
    from xsam.train.shard_index import ShardIndex

    tmp, out = shards
    datasets = ["fixture_refcoco/train", "fixture_llava_mix665k/train"]
    cfg = load_profile(profile_path("local"), "s3", [f"shards={out}", f"output={tmp / 'runs'}", "run_name=mix",
                                                     f"datasets={json.dumps(datasets)}",
                                                     f"mlflow_uri=sqlite:///{tmp / 'mlflow.db'}"])
    index = ShardIndex.build(out, [tuple(d.split("/", 1)) for d in datasets])
    schedule = Schedule(index.counts(), cfg.balance_t, repeats=index.expansions())
    assert index.expansions()["fixture_refcoco"] > 1  # the fixture's referring images do expand

    params = MlflowClient(cfg.mlflow_uri).get_run(start_mlflow_run(cfg, "fp")).data.params
    draws = schedule.expected_draws()
    for d, n in index.counts().items():
        assert params[f"mix.{d}.samples"] == str(n)
        assert params[f"mix.{d}.records"] == str(index.records()[d])
        assert float(params[f"mix.{d}.repeat"]) == pytest.approx(schedule.repeat_factors()[d], abs=1e-4)
        assert float(params[f"mix.{d}.share"]) == pytest.approx(100 * draws[d] / sum(draws.values()), abs=0.01)

    old = {k: m.model_copy(update={"num_records": None}) for k, m in index.manifests.items()}
    said = mixture_params(old, cfg.balance_t)
    assert said["mix.fixture_refcoco.records"].startswith("unknown")
    assert said["mix.fixture_refcoco.samples"] == str(index.counts()["fixture_refcoco"])
