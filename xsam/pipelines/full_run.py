"""The workflow: registry -> convert -> S1 -> S2 -> S3 -> evaluate -> select, one command.

    python pipelines/full_run.py                                   # embedded default (local profile)
    python pipelines/full_run.py --profile paper --dry-run         # the plan and predicted wall times
    ray job submit --address http://HEAD:8265 --working-dir . -- python pipelines/full_run.py --profile paper

With no arguments: local Ray, the `local` profile (tiny preset, 2 CPU workers), the fixture
datasets (generated if missing) and a sqlite MLflow store under .cache/xsam. Steps run as Ray tasks
chained by their results. Each step is content-addressed (its config, the data fingerprint, the
upstream steps' keys, the code version): a step whose recorded key matches is skipped, so a rerun
does nothing and a run killed mid-way picks up after its last complete step - inside a training
stage from its last checkpoint, since the stage's Ray Train run name carries the step key.

It converts only the datasets its stages train on and the profile's `benchmarks` score (or
`--datasets`); a split whose source is missing fails alone (its error names the file or folder), the
others convert, and the run stops before the first step that needs a failed split, naming it. Keys,
the datasets needed and that stop are decided in xsam.pipelines.workflow. A stage name in a profile's
`init_from` ([s1, s2]) is that stage's export from this run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from xsam import logs
from xsam.pipelines.workflow import key as _key

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages when installed)
STAGES = ("s1", "s2", "s3")


class StepBook:
    """<workdir>/steps/<step>.json records each completed step's key and outputs."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, step: str, key: str) -> dict | None:
        path = self.dir / f"{step}.json"
        if path.exists():
            record = json.loads(path.read_text())
            if record["key"] == key:
                return record["outputs"]
        return None

    def record(self, step: str, key: str, outputs: dict) -> None:
        tmp = self.dir / f"{step}.json.tmp"
        tmp.write_text(json.dumps({"key": key, "outputs": outputs, "finished": time.time()}, indent=1))
        tmp.replace(self.dir / f"{step}.json")


# ---------------------------------------------------------------------------------------- steps
def convert_step(registry: str, data_root: str, shards: str, datasets: list[str]) -> dict:
    """Convert the named datasets of the registry. A split that fails (a missing source: its error names
    the file or folder) is listed under "failed"; the others still convert."""
    from xsam.pipelines.convert import build_parser, run

    argv = ["--registry", registry, "--data-root", data_root, "--output", shards, "--datasets", ",".join(datasets)]
    # per-split lines at DEBUG: the workflow reports the total itself (one line)
    code, outcomes = run(build_parser().parse_args(argv), report=logging.getLogger("xsam.data.convert").debug)
    if code not in (0, 1):  # 2: an invalid registry (its problems are printed above)
        raise RuntimeError(f"conversion refused (exit {code}); see the log above")
    done = [o for o in outcomes if o.status != "failed"]
    fingerprint = _key(sorted((o.dataset, o.split, o.manifest.source_fingerprint) for o in done))
    return {"shards": shards, "fingerprint": fingerprint,
            "samples": {f"{o.dataset}/{o.split}": o.manifest.num_samples for o in done},
            "failed": {f"{o.dataset}/{o.split}": o.error for o in outcomes if o.status == "failed"}}


def train_step(cfg_dict: dict, *upstream: dict) -> dict:
    from xsam.pipelines.train import run
    from xsam.train.config import TrainConfig

    cfg = TrainConfig(**cfg_dict)
    result = run(cfg)
    return {"export": cfg.export_dir, "mlflow_run": cfg.mlflow_run_id, "step": result.metrics.get("step"),
            "loss": result.metrics.get("loss/total")}


def sweep_step(cfg_dict: dict, sweep: dict, storage: str, *upstream: dict) -> dict:
    """The profile's S3 sweep (pipelines/tune.py run_sweep): one trained S3 run per grid point."""
    from xsam.pipelines.tune import run_sweep

    trials = run_sweep(cfg_dict, sweep["grid"], storage, sweep["max_concurrent_trials"])
    best = min(trials, key=lambda t: t["loss"])
    return {"export": best["export"], "step": best["step"], "loss": best["loss"], "trials": trials}


def candidates_step(trained: list[dict]) -> dict:
    """Every kept checkpoint of every S3 run (the run, or each sweep trial), exported on demand
    (xsam.train.candidates), plus each run's final export."""
    from xsam.train.candidates import candidates

    found = []
    for t in trained:
        found += [{**c.to_dict(), "run_dir": t["run_dir"], "config": t.get("config")}
                  for c in candidates(t["run_dir"], t["export"], t["step"])]
    return {"candidates": found}


def storage_join(base: str, *parts: str) -> str:
    from xsam.data import storage

    return storage.join(base, *parts)


def comparison(client, model_name: str, found: list[dict], workflow_run: str) -> dict:
    """Tag each candidate's registered version with its lineage and build the candidates x benchmarks table
    (primary metrics) from the registry: the same table whether the evaluate step ran or was skipped."""
    from xsam.eval.selection import metric_key
    from xsam.logs import redact
    from xsam.tracking import filter_value

    by_export = {redact(c["export"]): c for c in found}  # the versions' xsam.checkpoint tags are redacted
    rows, benchmarks = [], set()
    for v in client.search_model_versions(f"name = {filter_value(model_name)}"):
        cand = by_export.get((v.tags or {}).get("xsam.checkpoint"))
        if cand is None:
            continue
        lineage = {"xsam.candidate.step": str(cand["step"]), "xsam.training_run": cand["run_dir"],
                   "xsam.workflow_run": workflow_run,
                   "xsam.candidate.source": cand["checkpoint"] or "final export",
                   **({"xsam.candidate.config": json.dumps(cand["config"], sort_keys=True)} if cand.get("config")
                      else {})}
        for k, val in lineage.items():
            if (v.tags or {}).get(k) != val:
                client.set_model_version_tag(model_name, v.version, k, val)
        run = client.get_run(v.run_id)
        primary = {t[len("xsam.primary."):]: m for t, m in run.data.tags.items() if t.startswith("xsam.primary.")}
        scores = {b: run.data.metrics.get(metric_key(b, m)) for b, m in primary.items()}
        benchmarks |= set(scores)
        rows.append({"version": v.version, "step": cand["step"], "export": cand["export"],
                     "partial": (v.tags or {}).get("xsam.partial") == "true", "scores": scores})
    rows.sort(key=lambda r: int(r["version"]))
    return {"benchmarks": sorted(benchmarks), "rows": rows}


def format_comparison(table: dict) -> list[str]:
    """One line per benchmark, one column per candidate version (step in the header), then the mean."""
    rows = table["rows"]
    width = max([len(b) for b in table["benchmarks"]] + [9])
    head = "".join(f"  v{r['version']} @{r['step']}".rjust(12) for r in rows)
    out = [f"{'benchmark':{width}s}{head}"]
    for b in table["benchmarks"]:
        out.append(f"{b:{width}s}" + "".join(f"{r['scores'].get(b, float('nan')):12.2f}" for r in rows))
    means = []
    for r in rows:
        vals = [v for v in r["scores"].values() if v is not None and not math.isnan(v)]
        means.append(sum(vals) / len(vals) if vals else float("nan"))
    out.append(f"{'mean':{width}s}" + "".join(f"{m:12.2f}" for m in means)
               + ("   partial: " + ", ".join(f"v{r['version']}" for r in rows if r["partial"])
                  if any(r["partial"] for r in rows) else ""))
    return out


def evaluate_step(argv: list[str], upstream: dict) -> dict:
    from xsam.pipelines.evaluate import run

    decision = run(argv)
    if decision is None:  # every version partial: the alias did not move
        return {"version": None, "score": None, "metrics": {}}
    return {"version": decision.version, "score": decision.score, "metrics": decision.metrics}


# ---------------------------------------------------------------------------------------- plan
def stage_configs(profile: str, shards: str | None, overrides: list[str]) -> dict:
    """Every stage's validated config (a SettingsError lists every bad value, before anything starts)."""
    from xsam.train.config import load_profiles, profile_path

    extra = [f"shards={shards}"] if shards else []
    cfgs = load_profiles(profile_path(profile), extra + overrides)
    missing = [s for s in STAGES if s not in cfgs]
    if missing:
        from xsam.train.config import SettingsError

        raise SettingsError([f"{profile_path(profile)}: stages: the workflow trains {', '.join(STAGES)}; "
                             f"missing {', '.join(missing)}"])
    return {stage: cfg.with_absolute_paths(os.getcwd()) for stage, cfg in cfgs.items()}


def plan_datasets(args, cfgs: dict, registry: str, benchmarks: list[str] | None) -> list[str]:
    """The datasets this run converts: --datasets, else those its stages and benchmarks use (each must
    be a registry entry: an unknown one is an error naming the steps that want it)."""
    from xsam.data.registry import load_registry
    from xsam.pipelines.workflow import needed_datasets

    entries, _ = load_registry(registry)
    if args.datasets:
        wanted = {d.strip(): ["--datasets"] for d in args.datasets.split(",") if d.strip()}
    else:
        wanted = needed_datasets(cfgs, benchmarks)
    unknown = {d: steps for d, steps in wanted.items() if d not in entries}
    if unknown:
        raise ValueError(f"registry {registry} has no entry for: " + "; ".join(
            f"{d} (used by {', '.join(steps)})" for d, steps in unknown.items()))
    return sorted(wanted)


@logs.entry_point("full_run")  # a user's mistake: one line on stderr, exit 2; a bug keeps its traceback
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    from xsam.train.config import SettingsError, load_benchmarks, load_sweep, profile_path, settings_help

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=settings_help() + "\n\nworkflow keys of a profile: benchmarks "
                                "(list[dataset/split], the splits it scores), sweep (an S3 grid)")
    p.add_argument("--profile", default="local")
    p.add_argument("--workdir", default=".cache/xsam", help="workflow state: generated fixtures and step records")
    p.add_argument("--registry", help="registry folder (default: the generated fixture registry)")
    p.add_argument("--data-root", help="data root of --registry")
    p.add_argument("--shards", help="shard output (default: the profile's shards)")
    p.add_argument("--benchmarks", help="comma-separated eval splits (default: the profile's `benchmarks`, else "
                                         "every converted eval split)")
    p.add_argument("--datasets", help="comma-separated registry entries to convert (default: those the stages "
                                       "and benchmarks use)")
    p.add_argument("--eval-max-samples", type=int, help="cap samples per benchmark")
    p.add_argument("--model-name", default="xsam")
    p.add_argument("--dry-run", action="store_true", help="print the plan and predicted wall times, run nothing")
    p.add_argument("overrides", nargs="*", help="key=value settings for every stage, stages.<stage>.key=value "
                                                  "for one (listed below)")
    logs.add_arguments(p)
    args = p.parse_args(argv)
    verbosity = logs.verbosity_of(args)
    logs.setup(verbosity)
    work = Path(args.workdir).resolve()
    t_start = time.perf_counter()

    try:  # every setting checked before anything starts
        cfgs = stage_configs(args.profile, args.shards, args.overrides)
        sweep = load_sweep(profile_path(args.profile), ([f"shards={args.shards}"] if args.shards else [])
                           + args.overrides)
        benchmarks = args.benchmarks.split(",") if args.benchmarks else load_benchmarks(profile_path(args.profile))
    except SettingsError as e:
        print(f"[full_run] {e}", file=sys.stderr)
        return 2
    registry = args.registry or cfgs["s1"].data_registry
    if registry is None:  # the embedded default: fixture datasets in every source format
        from xsam.data.fixtures import generate

        fixtures = work / "fixtures"
        if not (fixtures / "registry").is_dir() and not args.dry_run:
            made = generate(fixtures)
            log.info(f"[full_run] generated {len(made)} fixture datasets under {fixtures}")
        registry, data_root = str(fixtures / "registry"), str(fixtures / "data")
    else:
        data_root = args.data_root or cfgs["s1"].data_root or os.environ.get("XSAM_DATA_ROOT", "data")
        # a relative registry: from the current folder, else from the checkout (`--registry datasets_registry`)
        registry = str(Path(registry).resolve()) if Path(registry).exists() or not (ROOT / registry).exists() \
            else str(ROOT / registry)
    shards = cfgs["s1"].shards

    if args.dry_run:
        from xsam.pipelines.plan import print_plan

        print_plan(args.profile, cfgs, shards)
        return 0
    from xsam.pipelines import workflow as wplan  # (`workflow` below is the workflow's MLflow run)

    try:
        datasets = plan_datasets(args, cfgs, registry, benchmarks)
    except ValueError as e:
        print(f"[full_run] {e}", file=sys.stderr)
        return 2

    import ray
    from mlflow import MlflowClient

    from xsam.pipelines.train import code_version
    from xsam.tracking import PARENT_TAG, experiment_id

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, **logs.ray_init_kwargs(
            verbosity, {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": "1"},
            local_cluster=address is None))
    s1 = cfgs["s1"]
    client = MlflowClient(s1.mlflow_uri)
    exp_id = experiment_id(client, s1.mlflow_experiment, s1.mlflow_uri)
    version = code_version().split(" ")[0]  # the source hash decides; the git commit is for people
    workflow = client.create_run(exp_id, run_name=f"full_run {args.profile}", tags={
        "xsam.kind": "workflow", "xsam.profile": args.profile, "xsam.code_version": version})
    wid = workflow.info.run_id
    book = StepBook(work)
    env = {"runtime_env": {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": "1"}}}
    summary: dict[str, dict] = {}

    def run_step(name: str, key: str, fn, *fn_args) -> dict:
        t0 = time.perf_counter()
        outputs = book.done(name, key)
        status = "skipped (up to date)"
        if outputs is None:
            ref = ray.remote(num_cpus=0, **env)(fn).remote(*fn_args)  # a Ray task; its args chain the steps
            outputs = ray.get(ref)
            book.record(name, key, outputs)
            status = "ran"
        child = client.create_run(exp_id, run_name=f"step {name}", tags={
            PARENT_TAG: wid, "xsam.kind": "step", "xsam.step": name, "xsam.step_key": key, "xsam.step_status": status})
        client.log_dict(child.info.run_id, outputs, "outputs.json")
        client.set_terminated(child.info.run_id)
        summary[name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), **outputs}
        log.info(f"[full_run] {name}: {status} in {time.perf_counter() - t0:.0f}s")
        return outputs

    def stop(blocked: tuple[str, dict]) -> int:
        print(f"[full_run] {wplan.blocked_message(*blocked)}", file=sys.stderr)
        client.set_tag(wid, "xsam.blocked", f"{blocked[0]}: {', '.join(blocked[1])}")
        client.set_terminated(wid, "FAILED")
        return 1

    conv_key = wplan.convert_key(registry, data_root, shards, datasets, version)
    converted = run_step("convert", conv_key, convert_step, registry, data_root, shards, datasets)
    for item, why in converted.get("failed", {}).items():
        print(f"[full_run] convert: {item} FAILED: {why}", file=sys.stderr)
    blocked = wplan.first_blocked([(s, cfgs[s].datasets) for s in STAGES] + [("evaluate", benchmarks or [])],
                                  converted.get("failed", {}))
    upstream_keys: list[str] = [conv_key, converted["fingerprint"]]
    exports: dict[str, str] = {}
    for stage in STAGES:
        cfg = cfgs[stage]
        if blocked and blocked[0] == stage:
            return stop(blocked)
        # the key: what decides the stage's weights (wplan.stage_key), init_from as the profile names it
        # (a stage name: the upstream keys stand for its export), the upstream steps' keys
        key = wplan.stage_key(cfg, upstream_keys, version)
        cfg.run_name = f"xsam-{stage}-{key[:8]}"  # a restarted step resumes its own Ray Train run
        cfg.init_from = wplan.resolve_stage_exports(cfg.init_from, exports)
        cfg.mlflow_parent_run_id = wid
        if stage == "s3" and sweep:  # one Ray Tune trial (a Ray Train run) per grid point: all candidates
            key = _key(key, sweep)
            outputs = run_step(stage, key, sweep_step, cfg.to_dict(), sweep, str(work / "tune"), converted)
        else:
            outputs = run_step(stage, key, train_step, cfg.to_dict(), converted)
        exports[stage] = outputs["export"]
        upstream_keys.append(key)
    s3 = cfgs["s3"]
    trained = summary["s3"].get("trials") or [{"run_dir": storage_join(s3.output, s3.name), "export": exports["s3"],
                                                "step": summary["s3"].get("step")}]
    cand_key = _key("candidates", upstream_keys[-1], version)
    found = run_step("candidates", cand_key, candidates_step, trained)
    candidate_exports = [c["export"] for c in found["candidates"]]
    eval_argv = ["--checkpoints", ",".join(candidate_exports), "--shards", shards, "--tracking-uri", s1.mlflow_uri,
                 "--experiment", s1.mlflow_experiment, "--model-name", args.model_name, "--parent-run", wid,
                 "--workers", str(s1.num_workers if s1.use_gpu else max(1, int(ray.cluster_resources().get("CPU", 2))))]
    eval_argv += ["--gpus-per-worker", "1"] if s1.use_gpu else []
    eval_argv += ["--benchmarks", ",".join(benchmarks)] if benchmarks else []
    eval_argv += ["--max-samples", str(args.eval_max_samples)] if args.eval_max_samples else []
    if blocked:
        return stop(blocked)
    eval_key = _key("evaluate", candidate_exports, shards, benchmarks, args.eval_max_samples, args.model_name,
                    s1.mlflow_uri, s1.mlflow_experiment, upstream_keys, version)
    selected = run_step("evaluate", eval_key, evaluate_step, eval_argv, exports)
    table = comparison(client, args.model_name, found["candidates"], wid)
    client.log_dict(wid, table, "comparison.json")
    client.log_dict(wid, summary, "summary.json")
    client.set_terminated(wid)

    logs.drain_ray()  # the workers' last lines before the summary, never after it
    wall = time.perf_counter() - t_start
    print(f"\n[full_run] done in {wall:.0f}s")
    print(f"  data:        {shards} ({sum(converted['samples'].values())} samples in {len(converted['samples'])} splits)")
    for stage in STAGES:
        print(f"  {stage}:          {exports[stage]} ({summary[stage]['status']})")
    print(f"  candidates:  {len(table['rows'])} scored ({'sweep trials' if sweep else 'S3'} kept checkpoints); "
          "primary metric per benchmark:")
    for line in format_comparison(table):
        print(f"    {line}")
    print(f"  MLflow:      {logs.redact(s1.mlflow_uri)} experiment {s1.mlflow_experiment!r}, workflow run {wid}")
    # read back from the registry (also when the evaluate step was skipped: no stale champion)
    from xsam.eval.selection import current_alias

    champion = current_alias(client, args.model_name, "champion")
    how = (f"selected this run, mean primary {selected['score']:.2f}" if selected.get("version") == champion
           and selected.get("score") is not None else "from the registry")
    print(f"  model:       {args.model_name}@champion = version {champion} ({how})")
    if s1.mlflow_uri.startswith("sqlite:"):
        print(f"  open the UI: mlflow ui --backend-store-uri {s1.mlflow_uri}   (then http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
