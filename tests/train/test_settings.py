"""The settings schema (xsam.train.settings) through profiles and overrides (xsam.train.config): bad values
refused before anything starts with the key, the value and what is allowed; per-stage overrides; YAML 1.1
numbers; --help generated from the schema; the shipped profiles valid for every stage."""

import subprocess
import sys
from pathlib import Path

import pytest

from xsam.train.config import (STAGES, SettingsError, load_benchmarks, load_profile, load_profiles, load_sweep,
                               profile_path)

ROOT = Path(__file__).resolve().parents[2]


def _refused(*overrides: str, stage: str = "s3") -> list[str]:
    with pytest.raises(SettingsError) as e:
        load_profile(profile_path("local"), stage, list(overrides))
    return e.value.problems


@pytest.mark.parametrize("override, line", [
    ("lr=abc", "command line: lr: 'abc' is not a number > 0"),
    ("lr=0", "command line: lr: 0 is not a number > 0"),
    ("num_workers=two", "command line: num_workers: 'two' is not a positive integer"),
    ("zero_stage=7", "command line: zero_stage: 7 is not an integer from 0 to 3"),
    ("batch_per_rank=0", "command line: batch_per_rank: 0 is not a positive integer"),
    ("datasets=x/train", "command line: datasets: 'x/train' is not a list[dataset/split] (Input should be a valid list)"),
    ("datasets=[Bad Name]", "command line: datasets: ['Bad Name'] is not a list[dataset/split]"),
    ("schedule=linear", "command line: schedule: 'linear' is not one of cosine, multistep"),
    ("warmup_ratio=1", "command line: warmup_ratio: 1 is not a number >= 0 and < 1"),
    ("epochs=0", "command line: epochs: 0 is not a number > 0"),
    ("ds_comm_dtype=float32", "command line: ds_comm_dtype: 'float32' is not one of fp32, bf16, fp16 (or null)"),
    ("preset=huge", "command line: preset: 'huge' is not one of paper, tiny"),
    ("learning_rate=1", "command line: learning_rate: unknown setting"),
    ("model_overrides={lm: {}}", "command line: model_overrides: {'lm': {}}: model_overrides: unknown section 'lm'"),
    ("init_from=[s3]", "command line: init_from: ['s3']: s3 can start only from an earlier stage's export, not s3"),
    ("stages.s9.lr=1", "command line: stages.s9.lr: per-stage settings are stages.<s1|s2|s3>.<key>"),
    ("lr=[1", "command line: lr: '[1' is not a YAML value"),
])
def test_a_bad_value_is_refused_naming_key_value_and_what_is_allowed(override, line):
    problems = _refused(override)
    assert any(p.startswith(line) for p in problems), problems


def test_every_problem_is_listed_once_with_where_it_came_from(tmp_path):
    problems = _refused("lr=abc", "zero_stage=7", "stages.s2.batch_per_rank=0")
    assert len(problems) == 3, problems  # the top-level ones once, not once per stage
    assert "command line: stages.s2.batch_per_rank: 0 is not a positive integer" in "\n".join(problems)
    bad = tmp_path / "bad.yaml"
    bad.write_text(profile_path("local").read_text().replace("    schedule: multistep", "    schedule: linear")
                   .replace("num_workers: 2", "num_workers: two"))
    with pytest.raises(SettingsError) as e:
        load_profiles(bad)
    assert f"{bad}: num_workers: 'two' is not a positive integer" in str(e.value)
    assert f"{bad}: stages.s1.schedule: 'linear' is not one of cosine, multistep" in str(e.value)


def test_per_stage_overrides_apply_to_that_stage_only():
    cfgs = load_profiles(profile_path("local"), ["lr=2e-4", "stages.s3.lr=1e-5", "stages.s3.max_steps=2"])
    assert cfgs["s3"].lr == 1e-5 and cfgs["s3"].max_steps == 2
    assert cfgs["s1"].lr == cfgs["s2"].lr == 2e-4 and cfgs["s1"].max_steps is None
    # the per-stage override wins over the global one whatever their order
    assert load_profile(profile_path("local"), "s3", ["stages.s3.lr=1e-5", "lr=2e-4"]).lr == 1e-5


def test_yaml_11_number_strings_are_numbers():
    import yaml

    assert yaml.safe_load("2e-4") == "2e-4"  # the gotcha: PyYAML reads this as a string
    cfg = load_profile(profile_path("local"), "s3", ["lr=2e-4", "milestones=[1e0, 2]", "epochs=5e-1"])
    assert isinstance(cfg.lr, float) and cfg.lr == 2e-4
    assert cfg.milestones == [1.0, 2.0] and cfg.epochs == 0.5


@pytest.mark.parametrize("entry", ["pipelines/train.py", "pipelines/full_run.py", "pipelines/tune.py"])
def test_help_lists_the_settings_with_types_and_defaults(entry):
    out = subprocess.run([sys.executable, entry, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lr (float > 0, default 0.0001): peak learning rate" in out.stdout
    assert "zero_stage (int >= 0 and <= 3, default 2)" in out.stdout
    assert "schedule (cosine|multistep, default cosine)" in out.stdout
    assert "max_steps (int >= 1 | null, default null)" in out.stdout


def test_a_bad_value_stops_the_entry_point_before_ray_starts():
    out = subprocess.run([sys.executable, "pipelines/train.py", "--stage", "s3", "num_workers=two"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "command line: num_workers: 'two' is not a positive integer" in out.stderr
    assert "ray" not in out.stdout.lower() + out.stderr.lower().replace("[train]", "")


@pytest.mark.parametrize("profile", ["local", "paper", "single-node-8gpu"])
def test_shipped_profiles_validate_for_every_stage(profile):
    cfgs = load_profiles(profile_path(profile))
    assert set(cfgs) == set(STAGES)
    assert cfgs["s2"].init_from == ["s1"] and cfgs["s3"].init_from == ["s1", "s2"]
    bench = load_benchmarks(profile_path(profile))
    assert bench and all("/" in b for b in bench)


def test_sweep_grid_values_are_checked_by_the_schema(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(profile_path("local").read_text() + "sweep:\n  grid: {lr: [2e-5, abc], zero_stage: [2, 5]}\n")
    with pytest.raises(SettingsError) as e:
        load_sweep(path)
    assert "sweep: grid.lr: 'abc' is not a number > 0" in str(e.value)
    assert "sweep: grid.zero_stage: 5 is not an integer from 0 to 3" in str(e.value)
    path.write_text(profile_path("local").read_text() + "sweep:\n  grid: {lr: [2e-5]}\n")
    assert load_sweep(path)["grid"] == {"lr": [2e-5]}  # the YAML string came back a float
