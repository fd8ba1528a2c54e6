"""The training settings schema: TrainConfig, one stage run's settings, as a pydantic dataclass.

Every field has its type, its range or allowed values and a one-line description here, and nowhere
else: profiles and command-line overrides are validated against it (xsam.train.config), the sweep
grid too, and every entry point's `--help` lists the settings from it (settings_help). Numeric
strings are coerced for number fields (PyYAML 1.1 reads `2e-4` as a string), numbers for text fields.
TrainConfig stays a real dataclass (dataclasses.replace / asdict work); constructing one validates it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import ConfigDict, Field, StringConstraints, field_validator
from pydantic.dataclasses import dataclass

from xsam.model.config import PRESETS, with_overrides

STAGES = ("s1", "s2", "s3")
Stage = Literal["s1", "s2", "s3"]
PresetName = Literal[tuple(PRESETS)]  # xsam.model.config's presets
DsDtype = Literal["fp32", "bf16", "fp16"]
WeightName = Literal["sam", "siglip", "llm", "tokenizer"]
Schedule = Literal["cosine", "multistep"]
# "dataset/split": a registry name ([a-z0-9_], xsam.data.registry) and one of its splits
DatasetSplit = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_]*/[^/\s]+$")]
Beta = Annotated[float, Field(ge=0, lt=1)]

# Per-stage default of TrainConfig.siglip_pad_square (the paper's configs: pad_image_to_square True in
# S2, False for S3's training datasets; every evaluation pads, xsam.model.predict)
SIGLIP_PAD_SQUARE = {"s1": False, "s2": True, "s3": False}


def _f(default: Any, description: str, **kw) -> Any:
    """A field with its default (lists and dicts: a fresh copy each time), description and constraints."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=description, **kw)
    return Field(default, description=description, **kw)


@dataclass(config=ConfigDict(extra="forbid", coerce_numbers_to_str=True))
class TrainConfig:
    stage: Stage = Field(description="the stage this run trains (set by --stage / the stages section)")
    preset: PresetName = _f("tiny", "model size preset (xsam.model.config)")
    model_overrides: dict[str, Any] = _f({}, "nested preset fields replaced, e.g. {llm: {num_hidden_layers: 4}}")
    shards: str = _f(".cache/xsam/shards", "converted shards root (local or s3://)")
    data_registry: str | None = _f(None, "registry the workflow converts (null: the generated fixtures)")
    data_root: str | None = _f(None, "where the registry's relative source paths start (local or s3://)")
    datasets: list[DatasetSplit] = _f([], "dataset/split entries of the stage's mix")
    weights: dict[WeightName, str] = _f({}, "sam / siglip / llm / tokenizer locations")
    init_from: list[str] = _f([], "earlier stages' exports: a stage name (s1, s2: its export in the workdir) "
                                  "or an export location")
    num_workers: int = _f(2, "Ray Train workers (one per GPU with use_gpu)", ge=1)
    use_gpu: bool = _f(False, "one GPU per worker")
    cpus_per_worker: float = _f(1, "CPUs per worker (also the loader's threads)", gt=0)
    batch_per_rank: int = _f(1, "samples per worker per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    epochs: float = _f(1.0, "epochs of the stage's balanced mix", gt=0)
    max_steps: int | None = _f(None, "cap on optimizer steps (null: the epochs decide)", ge=1)
    lr: float = _f(1e-4, "peak learning rate", gt=0)
    weight_decay: float = _f(0.05, "AdamW weight decay", ge=0)
    betas: tuple[Beta, Beta] = _f((0.9, 0.999), "AdamW betas")
    grad_clip: float = _f(1.0, "gradient norm clip", ge=0)
    schedule: Schedule = _f("cosine", "lr schedule: cosine (with linear warmup) or multistep")
    warmup_ratio: float = _f(0.03, "fraction of the steps with linear warmup", ge=0, lt=1)
    warmup_start_factor: float | None = _f(None, "multistep: warmup from lr * this (null: no warmup)", gt=0, le=1)
    milestones: list[Annotated[float, Field(ge=0)]] = _f([], "multistep: epochs at which lr *= gamma")
    gamma: float = _f(0.1, "multistep: lr factor at each milestone", gt=0)
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage", ge=0, le=3)
    offload_optimizer: bool = _f(False, "ZeRO optimizer states offloaded to CPU")
    ds_overlap_comm: bool | None = _f(None, "reduce during backward (null: DeepSpeed's: ZeRO-2 off, ZeRO-3 on)")
    ds_contiguous_gradients: bool = _f(True, "gradients copied into one buffer as produced")
    ds_reduce_bucket_size: int = _f(500_000_000, "elements per gradient reduce", gt=0)
    ds_allgather_bucket_size: int = _f(500_000_000, "elements per parameter all-gather (ZeRO-1/2)", gt=0)
    ds_comm_dtype: DsDtype | None = _f(None, "gradient reduction dtype (null: DeepSpeed's)")
    ds_grad_accum_dtype: DsDtype | None = _f(None, "accumulation dtype when grad_accum > 1 (null: DeepSpeed's)")
    bf16: bool = _f(False, "bf16 parameters with fp32 master weights")
    activation_checkpointing: bool = _f(False, "recompute activations in backward")
    balance_t: float = _f(0.1, "dataset balancing temperature t of r_d = max(1, sqrt(t / f_d))", gt=0)
    siglip_pad_square: bool | None = _f(None, "SigLIP view padded to a square (null: the stage's default)")
    seed: int = _f(1024, "seed of every random draw", ge=0)
    checkpoint_every: int = _f(50, "optimizer steps between checkpoints", ge=1)
    keep_checkpoints: int = _f(2, "checkpoints kept (the workflow scores each as a candidate)", ge=1)
    max_failures: int = _f(1, "worker-group restarts before the run fails (-1: unlimited)", ge=-1)
    log_every: int = _f(1, "optimizer steps between metric reports", ge=1)
    output: str = _f(".cache/xsam/runs", "Ray Train storage path (local or s3://bucket/prefix)")
    run_name: str | None = _f(None, "run name (null: xsam-<stage>); the same name resumes the same run")
    export: str | None = _f(None, "consolidated export folder (null: <output>/<run_name>/export)")
    export_shard_size: int = _f(2 * 10**9, "max bytes per export safetensors file", gt=0)
    mlflow_uri: str | None = _f(None, "MLflow tracking URI (env MLFLOW_TRACKING_URI wins over the profile)")
    mlflow_experiment: str = _f("xsam", "MLflow experiment", min_length=1)
    mlflow_run_id: str | None = _f(None, "set by the driver: restarted workers log to the same run")
    mlflow_parent_run_id: str | None = _f(None, "the workflow's MLflow run, if any")
    fail_at_step: int | None = _f(None, "fault injection (tests): the last rank raises once at this step")
    trace: str | None = _f(None, "folder for per-rank JSONL traces of the consumed sample keys (tests)")

    @field_validator("model_overrides")
    @classmethod
    def _known_model_fields(cls, value: dict, info) -> dict:
        with_overrides(PRESETS[info.data.get("preset") or "tiny"](), value)  # names an unknown section/field
        return value

    @field_validator("init_from")
    @classmethod
    def _earlier_stages(cls, value: list[str], info) -> list[str]:
        stage = info.data.get("stage")
        later = [s for s in value if s in STAGES and stage in STAGES and STAGES.index(s) >= STAGES.index(stage)]
        if later:
            raise ValueError(f"{stage} can start only from an earlier stage's export, not {', '.join(later)}")
        return value

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
        """Local paths made absolute against `base` (workers do not run in the driver's folder); a stage
        name in init_from stays a name (pipelines/train.py resolves it)."""
        def fix(p: str | None) -> str | None:
            if p is None or "://" in p or Path(p).is_absolute():
                return p
            return str((Path(base) / p).resolve())

        uri = self.mlflow_uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + fix(uri[len("sqlite:///"):])
        return dataclasses.replace(
            self, shards=fix(self.shards), output=fix(self.output), export=fix(self.export), trace=fix(self.trace),
            weights={k: fix(v) for k, v in self.weights.items()},
            init_from=[p if p in STAGES else fix(p) for p in self.init_from], mlflow_uri=uri)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that decide what a run computes (everything but RESULT_NEUTRAL): a run name that
        exists with another identity is refused (pipelines/train.py), never silently resumed."""
        return {k: v for k, v in json.loads(json.dumps(self.to_dict())).items() if k not in RESULT_NEUTRAL}


# Settings that change how a run is watched, stored or resourced, not the weights it ends with: changing
# them between a run and its resumption is allowed (the loader and the RNG states make the result
# independent of them), and the workflow's stage keys leave them out.
RESULT_NEUTRAL = frozenset({
    "run_name", "output", "export", "mlflow_uri", "mlflow_experiment", "mlflow_run_id", "mlflow_parent_run_id",
    "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "fail_at_step", "trace",
    "cpus_per_worker", "data_registry", "data_root", "export_shard_size",
})

FIELDS = TrainConfig.__pydantic_fields__  # name -> pydantic FieldInfo (annotation, default, constraints)


# ------------------------------------------------------------------------------- descriptions
def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return "dataset/split" if tp is DatasetSplit else _type_name(args[0])
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in _UNIONS:
        inner = [a for a in args if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + (" | null" if len(inner) < len(args) else "")
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


_UNIONS = (typing.Union, types.UnionType)
_BOUNDS = {at.Gt: (">", "gt"), at.Ge: (">=", "ge"), at.Lt: ("<", "lt"), at.Le: ("<=", "le")}


def _limits(metadata: list) -> dict:
    """{annotated_types class: bound} of a field's constraints."""
    return {type(m): getattr(m, _BOUNDS[type(m)][1]) for m in metadata if type(m) in _BOUNDS}


def _bounds(metadata: list) -> str:
    return " and ".join(f"{_BOUNDS[k][0]} {v}" for k, v in _limits(metadata).items())


def type_text(name: str) -> str:
    """The field's type for people: `float > 0`, `cosine|multistep`, `int >= 1 | null`, `list[dataset/split]`."""
    info = FIELDS[name]
    tp, args = info.annotation, typing.get_args(info.annotation)
    optional = typing.get_origin(tp) in _UNIONS and type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    bounds = _bounds(info.metadata)
    return _type_name(tp) + (f" {bounds}" if bounds else "") + (" | null" if optional else "")


def allowed_text(name: str) -> str:
    """What a field accepts, as a phrase for an error: `a positive integer`, `one of fp32, bf16, fp16`."""
    info = FIELDS[name]
    tp, optional = info.annotation, False
    if typing.get_origin(tp) in _UNIONS:
        optional = type(None) in typing.get_args(tp)
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    bounds = _limits(info.metadata)
    if typing.get_origin(tp) is Literal:
        text = "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    elif tp is int and (bounds.get(at.Gt) == 0 or bounds.get(at.Ge) == 1) and len(bounds) == 1:
        text = "a positive integer"
    elif tp is int and at.Ge in bounds and at.Le in bounds:
        text = f"an integer from {bounds[at.Ge]} to {bounds[at.Le]}"
    elif tp in (int, float):
        text = ("an integer" if tp is int else "a number") + (f" {_bounds(info.metadata)}" if bounds else "")
    elif tp is bool:
        text = "true or false"
    else:
        text = f"a {_type_name(tp)}"
    return text + (" (or null)" if optional else "")


def _default_text(info) -> str:
    if info.default_factory is not None:
        return json.dumps(info.default_factory())
    value = info.default
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(list(value)) if isinstance(value, tuple) else str(value)


def settings_help() -> str:
    """The argparse epilog of every entry point that takes settings: one line per field."""
    lines = ["settings (key=value on the command line over the profile; stages.<s1|s2|s3>.key=value for one stage;",
             "values are YAML: lr=2e-4, datasets=[a/train,b/train], bf16=true, max_steps=null):"]
    for name, info in FIELDS.items():
        if name == "stage":
            continue
        lines.append(f"  {name} ({type_text(name)}, default {_default_text(info)}): {info.description}")
    return "\n".join(lines)
