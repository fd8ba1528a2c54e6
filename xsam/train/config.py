"""Profiles and overrides -> TrainConfig, validated against the settings schema (xsam.train.settings).

A profile (xsam/profiles/<name>.yaml) has top-level defaults, a `stages:` section with one mapping per
stage, and the workflow's own keys (`benchmarks:` the evaluation splits, `sweep:` an S3 grid). A run's
config = defaults <- stages.<stage> <- MLFLOW_TRACKING_URI <- command-line `key=value` (every stage) <-
command-line `stages.<stage>.key=value` (that stage only). Values are parsed as YAML (`lr=2e-4`,
`datasets=[a/train,b/train]`, `bf16=true`). Every problem - an unknown key, a value of the wrong type or
out of range - is collected and raised at once as a SettingsError, one line each naming where it came
from (the profile file or "command line"), the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from xsam.logs import UserError
from xsam.train.settings import (
    FIELDS,
    RESULT_NEUTRAL,
    SIGLIP_PAD_SQUARE,
    STAGES,
    DatasetSplit,
    TrainConfig,
    allowed_text,
    settings_help,
)

__all__ = ["RESULT_NEUTRAL", "SIGLIP_PAD_SQUARE", "STAGES", "SettingsError", "TrainConfig", "load_benchmarks",
           "load_profile", "load_profiles", "load_sweep", "profile_path", "settings_help"]

WORKFLOW_KEYS = ("benchmarks", "sweep")  # profile keys of the workflow (pipelines/full_run.py), not of a stage


class SettingsError(UserError):
    """Invalid settings: `problems` has one line per problem (where: key: value is not <allowed>)."""

    def __init__(self, problems: list[str]):
        self.problems = list(dict.fromkeys(problems))  # a top-level value is checked once per stage
        super().__init__("invalid settings:\n  " + "\n  ".join(self.problems))


def _unknown(where: str, key: str) -> str:
    close = difflib.get_close_matches(key, [k for k in FIELDS if k != "stage"], n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{where}: {key}: unknown setting ({hint}--help lists them)"


def _known(mapping: Any, where: str, problems: list[str]) -> dict:
    """The mapping's settings; unknown keys (and `stage`, chosen by --stage) become problems."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        problems.append(f"{where}: expected a mapping of settings, got {mapping!r}")
        return {}
    for key in mapping:
        if key == "stage":
            problems.append(f"{where}: stage: chosen by --stage (or the stages section), not a setting")
        elif key not in FIELDS:
            problems.append(_unknown(where, str(key)))
    return {k: v for k, v in mapping.items() if k in FIELDS and k != "stage"}


def parse_overrides(items: list[str], problems: list[str]) -> tuple[dict, dict[str, dict]]:
    """Command-line `key=value` / `stages.<stage>.key=value` -> (every stage's, {stage: its own})."""
    common: dict[str, Any] = {}
    per_stage: dict[str, dict] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"command line: {item!r} is not key=value (or stages.<stage>.key=value)")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problems.append(f"command line: {key}: {text!r} is not a YAML value ({str(e).splitlines()[0]})")
            continue
        parts = key.split(".")
        if parts[0] == "stages":
            if len(parts) != 3 or parts[1] not in STAGES:
                problems.append(f"command line: {key}: per-stage settings are stages.<{'|'.join(STAGES)}>.<key>")
                continue
            per_stage.setdefault(parts[1], {}).update(_known({parts[2]: value}, "command line", problems))
        else:
            common.update(_known({key: value}, "command line", problems))
    return common, per_stage


def _problem(where: str, key: str, value: Any, err: dict) -> str:
    """One line: where: key: value is not <what the field allows> (pydantic's reason)."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # a field validator's own sentence
        return f"{where}: {key}: {value!r}: {msg}"
    name = key.rsplit(".", 1)[-1]
    return f"{where}: {key}: {value!r} is not {allowed_text(name)} ({msg})"


def _build(stage: str, layers: list[tuple[str, str, dict]], problems: list[str]) -> TrainConfig | None:
    """TrainConfig from (where, key prefix, settings) layers, later ones winning; problems name their layer."""
    merged: dict[str, Any] = {}
    origin: dict[str, tuple[str, str]] = {}
    for where, prefix, mapping in layers:
        for key, value in mapping.items():
            merged[key], origin[key] = value, (where, prefix)
    try:
        return TrainConfig(stage=stage, **merged)
    except ValidationError as e:
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else "settings"
            where, prefix = origin.get(key, (f"stage {stage}", ""))
            problems.append(_problem(where, prefix + key, merged.get(key, err["input"]), err))
        return None


def _read(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SettingsError([f"{path}: a profile is a mapping of settings, got {type(doc).__name__}"])
    return doc


def load_profiles(path: str | Path, overrides: list[str] | None = None) -> dict[str, TrainConfig]:
    """Every stage of the profile with the overrides applied, all validated: -> {stage: TrainConfig}.
    Raises SettingsError listing every problem of every stage."""
    path = Path(path)
    doc = _read(path)
    problems: list[str] = []
    stages = doc.pop("stages", None) or {}
    if not isinstance(stages, dict):
        problems.append(f"{path}: stages: expected a mapping of {', '.join(STAGES)}, got {stages!r}")
        stages = {}
    for name in stages:
        if name not in STAGES:
            problems.append(f"{path}: stages.{name}: no such stage (stages: {', '.join(STAGES)})")
    benchmarks = doc.pop("benchmarks", None)
    if benchmarks is not None:
        try:
            TypeAdapter(list[DatasetSplit]).validate_python(benchmarks)
        except ValidationError:
            problems.append(f"{path}: benchmarks: {benchmarks!r} is not a list of dataset/split")
    doc.pop("sweep", None)  # the workflow's S3 grid: load_sweep
    top = _known(doc, str(path), problems)
    env = {"mlflow_uri": os.environ["MLFLOW_TRACKING_URI"]} if os.environ.get("MLFLOW_TRACKING_URI") else {}
    common, per_stage = parse_overrides(overrides or [], problems)
    for name in per_stage:
        if name not in stages:
            problems.append(f"command line: stages.{name}: the profile {path} has no stage {name}")
    out = {}
    for stage in (s for s in STAGES if s in stages):
        own = _known(stages[stage], f"{path}: stages.{stage}", problems)
        layers = [(str(path), "", top), (str(path), f"stages.{stage}.", own),
                  ("environment MLFLOW_TRACKING_URI", "", env), ("command line", "", common),
                  ("command line", f"stages.{stage}.", per_stage.get(stage, {}))]
        cfg = _build(stage, layers, problems)
        if cfg is not None:
            out[stage] = cfg
    if problems:
        raise SettingsError(problems)
    return out


def load_profile(path: str | Path, stage: str, overrides: list[str] | None = None) -> TrainConfig:
    """One stage's config (the whole profile and every override are validated)."""
    path = Path(path)
    stages = _read(path).get("stages") or {}
    if stage not in stages:
        raise SettingsError([f"{path}: no stages.{stage} section (has: {', '.join(sorted(stages)) or 'none'})"])
    return load_profiles(path, overrides)[stage]


def load_benchmarks(path: str | Path) -> list[str] | None:
    """The profile's `benchmarks:` (the evaluation splits the workflow converts and scores), or None."""
    path = Path(path)
    value = _read(path).get("benchmarks")
    if value is None:
        return None
    try:
        return TypeAdapter(list[DatasetSplit]).validate_python(value)
    except ValidationError:
        raise SettingsError([f"{path}: benchmarks: {value!r} is not a list of dataset/split"]) from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> dict | None:
    """The profile's optional `sweep:` section: a grid of S3 settings the workflow trains one Ray Tune trial
    per point of (each trial a Ray Train run) and scores as selection candidates.

        sweep:
          grid: {lr: [2.0e-5, 4.0e-5], balance_t: [0.1]}   # TrainConfig fields -> values
          max_concurrent_trials: 1

    -> {"grid": {field: [values]}, "max_concurrent_trials": int}, or None without the section. Every grid
    value is validated as that setting of the S3 config (and comes back coerced: "2e-5" -> 2e-05)."""
    path = Path(path)
    sweep = _read(path).get("sweep")
    if not sweep:
        return None
    where = f"{path}: sweep"
    if not isinstance(sweep, dict):
        raise SettingsError([f"{where}: expected a mapping with `grid` (and optionally max_concurrent_trials)"])
    problems = [f"{where}.{k}: unknown key (allowed: grid, max_concurrent_trials)"
                for k in sorted(set(sweep) - {"grid", "max_concurrent_trials"})]
    grid = sweep.get("grid")
    if not isinstance(grid, dict) or not grid:
        problems.append(f"{where}.grid: {grid!r} is not a non-empty mapping of setting -> list of values")
        grid = {}
    trials = sweep.get("max_concurrent_trials", 1)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        problems.append(f"{where}.max_concurrent_trials: {trials!r} is not a positive integer")
    base = load_profiles(path, overrides).get("s3")
    if base is None:
        problems.append(f"{where}: the grid trains S3 but the profile has no stages.s3")
    checked: dict[str, list] = {}
    for key, values in grid.items():
        known = _known({key: values}, f"{where}.grid", problems)
        if not known:
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.grid.{key}: {values!r} is not a non-empty list of values")
            continue
        checked[key] = []
        for value in values:
            try:
                checked[key].append(getattr(dataclasses.replace(base, **{key: value}), key) if base else value)
            except ValidationError as e:
                problems.append(_problem(where, f"grid.{key}", value, e.errors()[0]))
    if problems:
        raise SettingsError(problems)
    return {"grid": checked, "max_concurrent_trials": trials}


def profile_path(name_or_path: str) -> Path:
    """A profile name (xsam/profiles/<name>.yaml) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = Path(__file__).resolve().parents[1] / "profiles" / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise SettingsError([f"--profile: no profile {name_or_path!r} (neither a YAML file nor {candidate})"])
    return candidate
