"""Train one X-SAM stage with Ray Train + DeepSpeed ZeRO.

    python pipelines/train.py --stage s1 --profile local [key=value ...] [stages.s1.key=value ...]
    python pipelines/train.py --stage s3 --profile local      # after full_run.py: from its S1 + S2 exports
    ray job submit -- python pipelines/train.py --stage s3 --profile paper init_from=[s3://b/s1/export,s3://b/s2/export]

`init_from` names earlier stages' exports: a location, or a stage name (`[s1, s2]`) meaning the export
the workflow (pipelines/full_run.py) recorded for that stage in --workdir (<workdir>/steps/<stage>.json).

The resolved config is printed and logged. Every worker runs xsam.train.recipe.StageRecipe; Ray
Train restarts the worker group from the last checkpoint when a worker dies (FailureConfig), and
rerunning with the same run name resumes the run. Rank 0 logs to one MLflow run created here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from xsam import logs
from xsam.train.config import STAGES, SettingsError, TrainConfig, load_profile, profile_path, settings_help

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages when installed)


# The non-secret S3 settings handed to the training workers (see run()); credentials are not among them.
WORKER_S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class RaySession:
    """The recipe's view of Ray Train: rank, metrics + checkpoint reporting, the last checkpoint."""

    def __init__(self, cfg: TrainConfig):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.mlflow = None
        if self.rank == 0 and cfg.mlflow_uri and cfg.mlflow_run_id:
            from mlflow import MlflowClient

            self.mlflow, self.run_id = MlflowClient(cfg.mlflow_uri), cfg.mlflow_run_id

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        import ray.train

        if self.mlflow is not None:
            from mlflow.entities import Metric

            from xsam.tracking import normalise_metrics

            step, now = int(metrics.get("step", 0)), int(__import__("time").time() * 1000)
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                        for k, v in normalise_metrics(metrics).items()])
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder


def train_loop_per_worker(config: dict) -> None:
    from xsam.train.recipe import StageRecipe

    cfg = TrainConfig(**config)
    recipe = StageRecipe(cfg, RaySession(cfg))
    recipe.setup()
    recipe.train()
    recipe.export()
    recipe.cleanup()


def code_version() -> str:
    """A hash of the project's source (the xsam package and its profiles): the same in a git checkout and in
    the copy `ray job submit --working-dir` ships, and it changes with any edit; plus the git commit
    when there is one, for people."""
    h = hashlib.sha256()
    for path in sorted([*ROOT.glob("xsam/**/*.py"), *ROOT.glob("xsam/profiles/*.yaml")]):
        h.update(path.relative_to(ROOT).as_posix().encode())
        h.update(path.read_bytes())
    version = f"src-{h.hexdigest()[:16]}"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version} (git {sha})" if sha else version


def data_fingerprint(cfg: TrainConfig) -> str:
    from xsam.train.shard_index import ShardIndex

    manifests = ShardIndex.read_manifests(cfg.shards, [tuple(d.split("/", 1)) for d in cfg.datasets])
    payload = {f"{d}/{s}": [sh.sha256 for sh in m.shards] for (d, s), m in sorted(manifests.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def mixture_params(manifests: dict, t: float) -> dict[str, str]:
    """MLflow params of the stage's balanced mixture (xsam.train.mixture), per dataset as the Schedule
    balances it (its splits together): mix.<dataset>.samples, .records (after expansion), .repeat (r_d) and
    .share (percent of the draws per epoch). Dataset names are [a-z0-9_] (the registry's rule), so the keys
    meet MLflow's (letters, digits, _ - . / space). Records come from the manifests; a manifest written
    before they were counted (num_records None) is reported as such and counted 1 record per sample here
    (training counts its records from the samples: ShardIndex.records)."""
    from xsam.train.mixture import mixture

    samples: dict[str, int] = {}
    records: dict[str, int] = {}
    uncounted: set[str] = set()
    for (dataset, _), m in manifests.items():
        samples[dataset] = samples.get(dataset, 0) + m.num_samples
        records[dataset] = records.get(dataset, 0) + (m.num_samples if m.num_records is None else m.num_records)
        if m.num_records is None:
            uncounted.add(dataset)
    out = {}
    for dataset, mix in mixture(samples, records, t).items():
        out[f"mix.{dataset}.samples"] = str(mix.samples)
        out[f"mix.{dataset}.records"] = (f"unknown: manifest without num_records, {mix.records} (1 per sample) "
                                         f"assumed here" if dataset in uncounted else str(mix.records))
        out[f"mix.{dataset}.repeat"] = f"{mix.repeat:.4f}"
        out[f"mix.{dataset}.share"] = f"{mix.share:.2f}"
    return out


def start_mlflow_run(cfg: TrainConfig, fingerprint: str) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from xsam.tracking import PARENT_TAG, experiment_id, filter_value, redacted_params
    from xsam.train.shard_index import ShardIndex

    client = MlflowClient(cfg.mlflow_uri)
    exp_id = experiment_id(client, cfg.mlflow_experiment, cfg.mlflow_uri)
    existing = client.search_runs(
        [exp_id], f"tags.`xsam.run_name` = {filter_value(cfg.name)} and attributes.status != 'FINISHED'", max_results=1)
    if existing:  # a resumed run keeps logging to its MLflow run
        return existing[0].info.run_id
    tags = {"xsam.kind": "training", "xsam.run_name": cfg.name, "xsam.stage": cfg.stage,
            "xsam.code_version": code_version(),
            "xsam.data_fingerprint": fingerprint, "xsam.seed": str(cfg.seed)}
    if cfg.mlflow_parent_run_id:
        tags[PARENT_TAG] = cfg.mlflow_parent_run_id  # flat runs; the workflow run named in a tag
    run = client.create_run(exp_id, run_name=cfg.name, tags=tags)
    for key, value in redacted_params(cfg.to_dict()).items():  # the tracking URI's credentials masked
        client.log_param(run.info.run_id, key, value)
    manifests = ShardIndex.read_manifests(cfg.shards, [tuple(d.split("/", 1)) for d in cfg.datasets])
    mix = [Param(k, v) for k, v in mixture_params(manifests, cfg.balance_t).items()]
    for i in range(0, len(mix), 100):  # log_batch takes at most 100 params
        client.log_batch(run.info.run_id, params=mix[i:i + 100])
    return run.info.run_id


class RunConflict(ValueError):
    """A run name that exists with other settings: resuming it would train 0 steps (or a mix of two
    configs) and rewrite its export under the new config."""


def claim_run(cfg: TrainConfig, fingerprint: str) -> bool:
    """Record the run's identity beside its checkpoints (<output>/<run name>/xsam-run.json), or check it
    against the record of an existing run of that name. -> True when the run exists (it resumes).

    Raises RunConflict naming every differing setting. Settings in config.RESULT_NEUTRAL (logging,
    checkpoint cadence, storage, tracking) may change between a run and its resumption."""
    from xsam.data import storage

    record = storage.join(cfg.output, cfg.name, "xsam-run.json")
    mine = {**cfg.identity(), "data_fingerprint": fingerprint}
    if storage.exists(record):
        theirs = json.loads(storage.read_bytes(record))
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            lines = "\n".join(f"  {k}: {json.dumps(theirs.get(k))} (run) vs {json.dumps(mine.get(k))} (now)"
                              for k in diff)
            raise RunConflict(f"run {cfg.name!r} exists at {storage.join(cfg.output, cfg.name)} with other "
                              f"settings:\n{lines}\nResuming it would not train what you asked for: pass "
                              f"run_name=<a new name>, or delete that folder to start it again.")
        return True
    with storage.open_output(record) as f:
        f.write(json.dumps(mine, indent=1, sort_keys=True).encode())
    return False


def run(cfg: TrainConfig):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from xsam.data import storage

    tok = cfg.weights.get("tokenizer")
    if cfg.preset == "tiny" and tok and not Path(tok).exists():
        from xsam.model.tokenizer import build_tiny_tokenizer

        log.info(f"[train] no tokenizer at {tok}: writing the tiny test tokenizer there (tiny preset only)")
        build_tiny_tokenizer(tok)
    fingerprint = data_fingerprint(cfg)
    claim_run(cfg, fingerprint)
    if cfg.mlflow_uri and not cfg.mlflow_run_id:
        cfg.mlflow_run_id = start_mlflow_run(cfg, fingerprint)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False,
                 **logs.ray_init_kwargs(logs.current(), local_cluster=address is None))
    fs, path = storage.resolve(cfg.output)
    env = {"HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))}
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    else:  # the CUDA caching allocator grows segments instead of fragmenting on variable-size batches
        env["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # Where S3 is, never who may read it: a runtime_env's env_vars are written in clear to Ray's session
    # logs (runtime_env_agent.log). Credentials reach workers from their node: a local Ray's workers
    # inherit this process's environment (and ~/.aws), a cluster node has its instance role
    # (ray_cluster.yaml) or the Kubernetes Secret in its pod spec (infra/kuberay).
    env.update({key: os.environ[key] for key in WORKER_S3_SETTINGS if key in os.environ})
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=path if storage.is_uri(cfg.output) else path,
                             storage_filesystem=fs if storage.is_uri(cfg.output) else None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env},
                             logging_config=logs.train_logging_config(logs.current())))
    result = trainer.fit()
    if cfg.mlflow_uri:
        from mlflow import MlflowClient

        client = MlflowClient(cfg.mlflow_uri)
        client.set_tag(cfg.mlflow_run_id, "xsam.export", logs.redact(cfg.export_dir))
        client.set_terminated(cfg.mlflow_run_id, "FINISHED")
    return result


class InitFromError(logs.UserError):
    """init_from names a stage with no recorded export in the workdir."""


def resolve_init_from(init_from: list[str], workdir: str | Path) -> list[str]:
    """init_from with each stage name replaced by the export the workflow recorded for that stage in
    `workdir` (<workdir>/steps/<stage>.json, outputs.export); locations pass unchanged."""
    out = []
    for item in init_from:
        if item not in STAGES:
            out.append(item)
            continue
        record = Path(workdir) / "steps" / f"{item}.json"
        export = json.loads(record.read_text()).get("outputs", {}).get("export") if record.exists() else None
        if not export:
            raise InitFromError(
                f"init_from: stage {item!r} has no recorded export in the workdir {Path(workdir).resolve()} "
                f"(no {record.name} under its steps/): run the workflow there first (pipelines/full_run.py "
                f"--workdir {workdir}), pass --workdir of the run that trained {item}, or give init_from locations")
        out.append(export)
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=settings_help())
    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--profile", default="local", help="profile name (xsam/profiles/) or YAML path")
    p.add_argument("--workdir", default=".cache/xsam",
                   help="the workflow's workdir: where a stage name in init_from finds that stage's export")
    p.add_argument("overrides", nargs="*", help="key=value settings over the profile (listed below)")
    logs.add_arguments(p)
    args = p.parse_args(argv)
    logs.setup(logs.verbosity_of(args))
    try:  # every setting checked before anything starts
        cfg = load_profile(profile_path(args.profile), args.stage, args.overrides).with_absolute_paths(os.getcwd())
        cfg.init_from = resolve_init_from(cfg.init_from, args.workdir)
    except (SettingsError, InitFromError) as e:
        print(f"[train] {e}", file=sys.stderr)
        return 2
    log.info(f"[train] {cfg.stage}: {cfg.num_workers} worker(s), {len(cfg.datasets)} dataset(s), run {cfg.name}, "
             f"output {cfg.output}")
    log.debug("[train] resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        with logs.cli_errors("train"):  # a UserError (a bad export in init_from, ...): one line, exit 2
            result = run(cfg)
    except RunConflict as e:
        print(f"[train] error: {e}", file=sys.stderr)
        return 2
    print(f"[train] {cfg.stage} finished: step {result.metrics.get('step')}, last metrics "
          f"{json.dumps({k: round(v, 4) for k, v in result.metrics.items() if k.startswith('loss/')})}; "
          f"export {cfg.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
