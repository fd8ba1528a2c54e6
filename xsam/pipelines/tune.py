"""Ray Tune sweep over S3 settings: each trial trains S3 (Ray Train + DeepSpeed, as
pipelines/train.py does) and is scored on the evaluation benchmarks with the same metrics as
pipelines/evaluate.py; trials are logged to MLflow with MLflowLoggerCallback.

    python pipelines/tune.py --profile local --lr 2e-5,1e-4 --balance-t 0.05,0.2 \\
        --benchmarks fixture_refcoco/val --max-steps 6

The objective is the mean of the benchmarks' primary metrics (higher is better).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from xsam import logs


def trial(config: dict, base: dict | None = None, tracking_uri: str | None = None,
          overrides: tuple[str, ...] = ()) -> None:
    """One Tune trial: train S3 with the trial's settings, then score the export (standalone sweep), or,
    in the workflow (`base`: the S3 config the workflow built), train only and report the export: the
    workflow's evaluation DAG scores every trial as a selection candidate.

    `config` is the grid point and what Tune may show (it writes it to each trial's params.json and
    MLflowLoggerCallback logs it as params); `base`, `tracking_uri` and `overrides` may carry the tracking
    URI's credentials, so they reach the trial through tune.with_parameters (Ray's object store), not
    the config."""
    import ray.tune

    from xsam.pipelines.train import run as train_run
    from xsam.train.config import TrainConfig, load_profile, profile_path

    trial_id = ray.tune.get_context().get_trial_id()
    if base is not None:
        point = dict(config)
        cfg = TrainConfig(**{**base, **point, "run_name": f"{base['run_name']}-{trial_id}", "export": None})
        result = train_run(cfg)
        ray.tune.report({"loss": float(result.metrics.get("loss/total", float("nan"))),
                         "step": int(result.metrics.get("step") or 0), "export": cfg.export_dir,
                         "run_dir": f"{cfg.output.rstrip('/')}/{cfg.name}"})
        return
    from xsam.pipelines.evaluate import EvalWorker, discover_benchmarks

    name = f"tune-{trial_id}"
    settings = [f"lr={config['lr']}", f"balance_t={config['balance_t']}", f"run_name={name}",
                f"mlflow_uri={tracking_uri}", f"mlflow_experiment={config['experiment']}-trials"]
    settings = [*settings, f"max_steps={config['max_steps']}"] if config.get("max_steps") else settings
    cfg = load_profile(profile_path(config["profile"]), "s3", [*settings, *overrides]).with_absolute_paths(config["cwd"])
    train_run(cfg)
    benches = discover_benchmarks(cfg.shards, config["benchmarks"], config.get("seed", 0))
    worker = EvalWorker(cfg.export_dir, cfg.shards)
    metrics, primaries = {}, []
    for bench in benches:
        n = min(config.get("max_samples") or 10**9, _num_samples(cfg.shards, bench))
        acc, _ = worker.score(bench, list(range(n)), 0)
        result = bench.result(acc)
        metrics.update({f"{bench.name}/{k}": v for k, v in result.items() if v == v})
        if not math.isnan(result.get(bench.primary, float("nan"))):
            primaries.append(result[bench.primary])
    metrics["score"] = sum(primaries) / len(primaries) if primaries else 0.0
    ray.tune.report(metrics)


def run_sweep(base: dict, grid: dict[str, list], storage: str, max_concurrent_trials: int = 1) -> list[dict]:
    """Train one S3 run per grid point of `grid` over the S3 config `base` (a TrainConfig dict): Ray Tune
    trials, each a Ray Train run named `<base run_name>-<trial id>`. -> per trial {"config": point,
    "export", "run_dir", "step", "loss"}, in trial order. Scoring is the caller's (the workflow's DAG)."""
    from ray import tune

    space = {k: tune.grid_search(list(v)) for k, v in grid.items()}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, base=base), {"cpu": 0.01}), param_space=space,
        tune_config=tune.TuneConfig(metric="loss", mode="min", max_concurrent_trials=max_concurrent_trials),
        run_config=tune.RunConfig(name=f"{base['run_name']}-sweep", storage_path=storage,
                                  verbose=1 if logs.current() == logs.VERBOSE else 0))
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} sweep trial(s) failed; first: {results.errors[0]}")
    return [{"config": {k: r.config[k] for k in grid}, "export": r.metrics["export"], "run_dir": r.metrics["run_dir"],
             "step": r.metrics["step"], "loss": r.metrics["loss"]} for r in results]


def _num_samples(shards: str, bench) -> int:
    from xsam.train.shard_index import ShardIndex

    return ShardIndex.read_manifests(shards, [(bench.dataset, bench.split)])[(bench.dataset, bench.split)].num_samples


@logs.entry_point("tune")  # a user's mistake: one line on stderr, exit 2; a bug keeps its traceback
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    from xsam.train.config import SettingsError, load_profile, profile_path, settings_help

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=settings_help())
    p.add_argument("--profile", default="local")
    p.add_argument("--lr", default="2e-5,1e-4", help="comma-separated learning rates (grid)")
    p.add_argument("--balance-t", default="0.05,0.2", help="comma-separated balancing temperatures (grid)")
    p.add_argument("--num-samples", type=int, default=1, help="repeats of the grid")
    p.add_argument("--benchmarks", required=True, help="comma-separated dataset/split to score")
    p.add_argument("--max-steps", type=int, help="cap S3 steps per trial")
    p.add_argument("--max-samples", type=int, help="cap samples per benchmark")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///.cache/xsam/mlflow.db"))
    p.add_argument("--experiment", default="xsam-tune")
    p.add_argument("--storage", default=".cache/xsam/tune")
    p.add_argument("overrides", nargs="*", help="key=value settings over the profile's s3 stage (listed below)")
    logs.add_arguments(p)
    args = p.parse_args(argv)
    verbosity = logs.verbosity_of(args)
    logs.setup(verbosity)
    problems = []  # every grid point's S3 settings checked before anything starts
    for lr in args.lr.split(","):
        for t in args.balance_t.split(","):
            try:
                load_profile(profile_path(args.profile), "s3", [*args.overrides, f"lr={lr}", f"balance_t={t}"])
            except SettingsError as e:
                problems += e.problems
    if problems:
        print(f"[tune] {SettingsError(problems)}", file=sys.stderr)
        return 2

    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = args.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    from mlflow import MlflowClient

    from xsam.tracking import experiment_id

    # made here (kind tag, artifacts beside a local store): MLflowLoggerCallback then finds it by name
    experiment_id(MlflowClient(uri), args.experiment, uri)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # locally, one CPU of headroom for the (mostly idle) trial that orchestrates its trainer
        ray.init(address=address, include_dashboard=False,
                 num_cpus=None if address else (os.cpu_count() or 1) + 1,
                 **logs.ray_init_kwargs(verbosity, local_cluster=address is None))
    space = {"lr": tune.grid_search([float(x) for x in args.lr.split(",")]),
             "balance_t": tune.grid_search([float(x) for x in args.balance_t.split(",")]),
             "profile": args.profile, "benchmarks": args.benchmarks.split(","), "max_steps": args.max_steps,
             "max_samples": args.max_samples, "experiment": args.experiment, "cwd": os.getcwd()}
    # the URI and the overrides may hold credentials: passed beside the config, never in it (see trial)
    private = tune.with_parameters(trial, tracking_uri=uri, overrides=tuple(args.overrides))
    # the trial itself only orchestrates: its TorchTrainer asks for the training CPUs
    tuner = tune.Tuner(
        tune.with_resources(private, {"cpu": 0.01}), param_space=space,
        tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=args.num_samples,
                                    max_concurrent_trials=1),
        run_config=tune.RunConfig(name=args.experiment, storage_path=str(Path(args.storage).resolve()),
                                  callbacks=[MLflowLoggerCallback(tracking_uri=uri, experiment_name=args.experiment,
                                                                  save_artifact=False)],
                                  verbose=1 if verbosity == logs.VERBOSE else 0))
    results = tuner.fit()
    best = results.get_best_result()
    print(f"[tune] {len(results)} trials; best score {best.metrics['score']:.3f} with lr={best.config['lr']}, "
          f"balance_t={best.config['balance_t']}")
    return 0 if not results.errors else 1


if __name__ == "__main__":
    sys.exit(main())
