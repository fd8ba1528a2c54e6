"""Training configuration: one flat dataclass per stage run, resolved from a profile YAML.

A profile (xsam/profiles/<name>.yaml) has top-level defaults and a `stages:` section with one
mapping per stage; a run's config = defaults <- stages.<stage> <- command-line `key=value`
overrides (values parsed as YAML, so `lr=2e-4`, `datasets=[a/train,b/train]`, `bf16=true` work).
An unknown key is an error that names it. MLFLOW_TRACKING_URI, when set, overrides the profile's
mlflow_uri (a cluster knows its tracking server; the command line still wins).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Per-stage default of TrainConfig.siglip_pad_square (the paper's configs: pad_image_to_square True in
# S2, False for S3's training datasets; every evaluation pads, xsam.model.predict)
SIGLIP_PAD_SQUARE = {"s1": False, "s2": True, "s3": False}


@dataclass
class TrainConfig:
    stage: str  # s1 | s2 | s3
    preset: str = "tiny"  # xsam.model.config preset
    model_overrides: dict[str, Any] = field(default_factory=dict)  # nested preset fields, e.g. {llm: {num_hidden_layers: 4}}
    shards: str = ".cache/xsam/shards"  # converted shards root (local or s3://)
    data_registry: str | None = None  # registry the workflow converts (None: the generated fixtures)
    data_root: str | None = None  # where that registry's relative source paths start (local or s3://)
    datasets: list[str] = field(default_factory=list)  # "dataset/split" entries of the stage's mix
    weights: dict[str, str] = field(default_factory=dict)  # sam / siglip / llm / tokenizer locations
    init_from: list[str] = field(default_factory=list)  # exported checkpoints of earlier stages
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1
    batch_per_rank: int = 1
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # cap on optimizer steps (None: the epochs decide)
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine (with linear warmup) | multistep
    warmup_ratio: float = 0.03
    # multistep: linear warmup from lr * this over warmup_ratio of the steps (None: no warmup)
    warmup_start_factor: float | None = None
    milestones: list[float] = field(default_factory=list)  # multistep: epochs at which lr *= gamma
    gamma: float = 0.1
    zero_stage: int = 2
    offload_optimizer: bool = False
    # DeepSpeed communication (recipe.deepspeed_config); every default is DeepSpeed's own. Sizes in elements.
    ds_overlap_comm: bool | None = None  # reduce during backward (None: DeepSpeed's: ZeRO-2 off, ZeRO-3 on)
    ds_contiguous_gradients: bool = True  # gradients copied into one buffer as produced: less fragmentation
    ds_reduce_bucket_size: int = 500_000_000  # elements per gradient reduce; overlap_comm holds ~4.5x
    ds_allgather_bucket_size: int = 500_000_000  # elements per all-gather of updated parameters (ZeRO-1/2)
    ds_comm_dtype: str | None = None  # fp32 | bf16 | fp16: gradient reduction dtype (communication_data_type)
    ds_grad_accum_dtype: str | None = None  # fp32 | bf16 | fp16: accumulation dtype when grad_accum > 1
    bf16: bool = False
    activation_checkpointing: bool = False
    balance_t: float = 0.1  # dataset balancing temperature t of r_d = max(1, sqrt(t / f_d))
    # SigLIP view padded to a square (expand2square) before its resize; None: the stage's default
    # (SIGLIP_PAD_SQUARE: on in S2 as the paper's align config, off in S3's training mix; S1 has no view)
    siglip_pad_square: bool | None = None
    seed: int = 1024
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker-group restarts (from the last checkpoint) before the run fails
    log_every: int = 1
    output: str = ".cache/xsam/runs"  # Ray Train storage path (local or s3://bucket/prefix)
    run_name: str | None = None  # default: xsam-<stage>; the same name resumes the same run
    export: str | None = None  # consolidated checkpoint folder (default <output>/<run_name>/export)
    export_shard_size: int = 2 * 10**9  # max bytes per export safetensors file (a larger single tensor: own shard)
    mlflow_uri: str | None = None
    mlflow_experiment: str = "xsam"
    mlflow_run_id: str | None = None  # set by the driver so restarted workers log to the same run
    mlflow_parent_run_id: str | None = None  # the workflow's run (pipelines/full_run.py), if any
    fail_at_step: int | None = None  # fault injection (tests): the last rank raises once at this step
    trace: str | None = None  # folder for per-rank JSONL traces of the consumed sample keys (tests)

    def __post_init__(self) -> None:
        if self.siglip_pad_square is None:
            self.siglip_pad_square = SIGLIP_PAD_SQUARE.get(self.stage, False)

    @property
    def name(self) -> str:
        return self.run_name or f"xsam-{self.stage}"

    @property
    def export_dir(self) -> str:
        return self.export or f"{self.output.rstrip('/')}/{self.name}/export"

    def with_absolute_paths(self, base: str | Path) -> "TrainConfig":
        """Local paths made absolute against `base` (workers do not run in the driver's folder)."""
        def fix(p: str | None) -> str | None:
            if p is None or "://" in p or Path(p).is_absolute():
                return p
            return str((Path(base) / p).resolve())

        uri = self.mlflow_uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + fix(uri[len("sqlite:///"):])
        return dataclasses.replace(
            self, shards=fix(self.shards), output=fix(self.output), export=fix(self.export), trace=fix(self.trace),
            weights={k: fix(v) for k, v in self.weights.items()}, init_from=[fix(p) for p in self.init_from],
            mlflow_uri=uri)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that decide what a run computes (everything but RESULT_NEUTRAL): a run name that
        exists with another identity is refused (pipelines/train.py), never silently resumed."""
        return {k: v for k, v in json.loads(json.dumps(self.to_dict())).items() if k not in RESULT_NEUTRAL}


# Settings that change how a run is watched, stored or resourced, not the weights it ends with: changing
# them between a run and its resumption is allowed (the loader and the RNG states make the result
# independent of them).
RESULT_NEUTRAL = frozenset({
    "run_name", "output", "export", "mlflow_uri", "mlflow_experiment", "mlflow_run_id", "mlflow_parent_run_id",
    "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "fail_at_step", "trace",
    "cpus_per_worker", "data_registry", "data_root", "export_shard_size",
})


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _check_keys(mapping: dict, where: str) -> None:
    unknown = sorted(set(mapping) - _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown training setting(s) {', '.join(unknown)}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    _check_keys(out, "command line")
    return out


def load_profile(path: str | Path, stage: str, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    stages = doc.pop("stages", {}) or {}
    doc.pop("sweep", None)  # the workflow's S3 sweep (load_sweep), not a training setting
    if stage not in stages:
        raise ValueError(f"{path}: no stages.{stage} section (has: {', '.join(sorted(stages)) or 'none'})")
    _check_keys(doc, str(path))
    _check_keys(stages[stage] or {}, f"{path}: stages.{stage}")
    env = {"mlflow_uri": os.environ["MLFLOW_TRACKING_URI"]} if os.environ.get("MLFLOW_TRACKING_URI") else {}
    merged = {**doc, **(stages[stage] or {}), **env, **parse_overrides(overrides or []), "stage": stage}
    if "betas" in merged:
        merged["betas"] = tuple(merged["betas"])
    return TrainConfig(**merged)


def load_sweep(path: str | Path) -> dict | None:
    """The profile's optional `sweep:` section: a grid of S3 settings the workflow trains one Ray Tune trial
    per point of (each trial a Ray Train run) and scores as selection candidates.

        sweep:
          grid: {lr: [2.0e-5, 4.0e-5], balance_t: [0.1]}   # TrainConfig fields -> values
          max_concurrent_trials: 1

    -> {"grid": {field: [values]}, "max_concurrent_trials": int}, or None without the section."""
    path = Path(path)
    sweep = (yaml.safe_load(path.read_text()) or {}).get("sweep")
    if not sweep:
        return None
    unknown = sorted(set(sweep) - {"grid", "max_concurrent_trials"})
    grid = sweep.get("grid") or {}
    if unknown or not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: sweep needs a non-empty `grid` mapping (and optionally max_concurrent_trials)"
                         + (f"; unknown keys {unknown}" if unknown else ""))
    _check_keys(grid, f"{path}: sweep.grid")
    bad = sorted(k for k, v in grid.items() if not isinstance(v, list) or not v)
    if bad:
        raise ValueError(f"{path}: sweep.grid values must be non-empty lists: {bad}")
    return {"grid": grid, "max_concurrent_trials": int(sweep.get("max_concurrent_trials", 1))}


def profile_path(name_or_path: str) -> Path:
    """A profile name (xsam/profiles/<name>.yaml) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = Path(__file__).resolve().parents[1] / "profiles" / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise FileNotFoundError(f"no profile {name_or_path!r} (looked for {candidate})")
    return candidate
