"""Score checkpoints on benchmarks with Ray, log everything to MLflow, register and select the model.

    python pipelines/evaluate.py --checkpoints runs/xsam-s3/export,runs:/<mlflow run id> \\
        --benchmarks fixture_coco_panoptic/val,fixture_refcoco/val --shards .cache/xsam/shards \\
        --tracking-uri http://127.0.0.1:5000 --model-name xsam

The checkpoints are scored concurrently where resources allow (the model copies split over them). Per
checkpoint: a pool of Ray actors (one model copy each; with --gpus-per-worker 1 one per GPU, the
model on it, bf16 by default: --device, --dtype) scores the benchmarks' samples with the batched engine
(xsam.eval.engine), chunk by chunk, with a progress line per benchmark; the accumulators are summed in
sample order. One MLflow evaluation run per checkpoint, created (RUNNING) before its scoring starts
and ended after, flat (a workflow that started it is named in the `xsam.parent_run` tag), in an
experiment made by xsam.tracking (UI kind tag, artifacts beside a local store) gets: every benchmark's
metrics (`<dataset>/<split>/<metric>`, the one naming rule of xsam.tracking.metric_name, with the counts
`n_images`, `n_queries`, `n_prompts`), the primary metric of each as a tag, the lineage (checkpoint,
training config, data fingerprints, seed, code version), per benchmark under
`benchmarks/<dataset>/<split>/` its per-category table (xsam.eval.per_category, an MLflow table) and the
overlays of its first --overlays samples in shard order (xsam.eval.overlay: the same samples for every
checkpoint), and the checkpoint as a pyfunc model "model" (xsam.model.pyfunc). That model becomes a
version of the registered model and the alias (default `champion`) moves to the best one by the
selection rule (xsam.eval.selection): `mlflow.pyfunc.load_model("models:/xsam@champion")` loads it.
Benchmarks default to every evaluation split (role: eval) converted under --shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xsam import logs
from xsam.data import storage
from xsam.data.schema import Task
from xsam.data.shards import split_manifest

log = logging.getLogger(__name__)


class EvalWorker:
    """One model copy on its device; scores chunks of a benchmark with the batched engine
    (xsam.eval.engine: encoders once per image, queries batched, reads prefetched). A Ray actor in
    `evaluate_checkpoint`: one per GPU with --gpus-per-worker 1, else one per CPU."""

    def __init__(self, checkpoint: str, shards: str, device: str = "auto", dtype: str = "auto",
                 engine: dict | None = None):
        import torch

        from xsam.eval.engine import Engine
        from xsam.model.predict import load_for_inference

        if device == "auto":  # the actor's own GPU when Ray gave it one
            import ray

            device = "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        torch.set_num_threads(1)  # one CPU per actor (on a GPU the host side is reads, decoding and scoring)
        # local folder or s3:// prefix, read directly; the export's own tokenizer
        self.model, self.tokenizer = load_for_inference(checkpoint, device=device, dtype=dtype)
        self.engine = Engine(self.model, self.tokenizer, **(engine or {}))
        self.shards = shards
        self.indexes = {}

    def describe(self) -> str:
        p = next(self.model.parameters())
        return f"{p.device} {str(p.dtype).replace('torch.', '')}"

    def score(self, bench, indices: list[int], overlays: int):
        """-> (accumulators, [(key, overlay PNG)]) of the samples `indices` of the benchmark."""
        from xsam.train.shard_index import ShardIndex

        if bench.name not in self.indexes:
            self.indexes[bench.name] = ShardIndex.build(self.shards, [(bench.dataset, bench.split)])
        index = self.indexes[bench.name]
        refs = index.refs[bench.dataset]
        return self.engine.score_shards(bench, index, [refs[i] for i in indices], overlays)


def resolve_checkpoint(spec: str, client) -> str:
    """A path / URI, or `runs:/<run id>` of a training run (its xsam.export tag)."""
    if spec.startswith("runs:/"):
        run = client.get_run(spec[len("runs:/"):].strip("/"))
        if "xsam.export" not in run.data.tags:
            raise ValueError(f"MLflow run {run.info.run_id} has no xsam.export tag (not a training run?)")
        return run.data.tags["xsam.export"]
    return spec


def discover_benchmarks(shards: str, names: list[str] | None, seed: int):
    from xsam.eval.benchmark import Benchmark

    wanted = names
    if not wanted:  # every converted evaluation split
        wanted = []
        for loc in storage.list_files(shards, suffix="manifest.json", recursive=True):
            parts = loc.replace("\\", "/").rstrip("/").split("/")
            wanted.append(f"{parts[-3]}/{parts[-2]}")
    out = []
    for name in sorted(wanted):
        dataset, split = name.split("/", 1)
        m = split_manifest(shards, dataset, split)
        if m is None:
            raise logs.UserError(f"benchmark {name}: no manifest under {shards} (convert it first)")
        if m.num_samples == 0 and (names or m.role == "eval"):
            raise logs.UserError(f"benchmark {name}: the converted split has no sample (its manifest lists 0): "
                             f"nothing to evaluate; drop it from --benchmarks or reconvert it")
        if names or m.role == "eval":
            if Task(m.task) is Task.chat:
                continue
            out.append(Benchmark(dataset, split, Task(m.task), m.categories, seed=seed))
    return out


def evaluate_checkpoint(checkpoint: str, benches, shards: str, workers: int, max_samples: int | None,
                        overlays: int, gpus: float = 0, device: str = "auto", dtype: str = "auto",
                        engine: dict | None = None, chunk: int = 64, progress_every: float | None = 30.0):
    """-> {benchmark name: (metrics, accumulators, overlays)} computed on a pool of Ray actors (one per
    GPU when gpus > 0). A benchmark is cut into consecutive chunks of `chunk` samples, handed to the
    actors as they free up and merged in sample order (the numbers do not depend on the worker count);
    a progress line per benchmark as chunks come back."""
    import ray
    from ray.util import ActorPool

    from xsam.eval.engine_io import Progress
    from xsam.train.shard_index import ShardIndex

    actor = ray.remote(num_cpus=1, num_gpus=gpus)(EvalWorker)
    pool_actors = [actor.remote(checkpoint, shards, device, dtype, engine) for _ in range(workers)]
    where = sorted(set(ray.get([a.describe.remote() for a in pool_actors])))
    log.debug(f"[evaluate] {checkpoint}: {workers} actor(s) on {', '.join(where)}")
    pool = ActorPool(pool_actors)
    results = {}
    for bench in benches:
        n = ShardIndex.read_manifests(shards, [(bench.dataset, bench.split)])[(bench.dataset, bench.split)].num_samples
        n = min(n, max_samples) if max_samples else n
        chunks = [list(range(k, min(k + chunk, n))) for k in range(0, n, max(1, chunk))]
        progress = Progress(bench.name, n, progress_every)
        acc, pngs = bench.new(), []
        # the overlays: the first `overlays` samples in shard order (the same for every checkpoint)
        work = pool.map(lambda a, idx, b=bench: a.score.remote(b, idx, max(0, overlays - idx[0])), chunks)
        for idx, (part, part_pngs) in zip(chunks, work):
            acc = {k: acc[k] + part[k] for k in acc}
            pngs += part_pngs[:max(0, overlays - len(pngs))]
            progress.update(len(idx), part["counts"].queries)
        progress.close()
        results[bench.name] = (bench.result(acc), acc, pngs)
    for a in pool_actors:
        ray.kill(a)
    return results


def start_run(client, experiment_id: str, checkpoint: str, benches, seed: int, fingerprints,
              parent_run: str | None = None, extra_tags: dict[str, str] | None = None) -> str:
    """The checkpoint's evaluation run, created (RUNNING) BEFORE scoring so its duration is the scoring's:
    tags (kind, checkpoint, lineage, each benchmark's primary metric), params, the training config.
    Flat: a workflow that started the evaluation is named in the `xsam.parent_run` tag."""
    from xsam.model.export import read_manifest as read_export_manifest
    from xsam.pipelines.train import code_version
    from xsam.tracking import PARENT_TAG

    manifest = read_export_manifest(checkpoint)
    run = client.create_run(experiment_id, run_name=f"eval {Path(checkpoint.rstrip('/')).parent.name}", tags={
        "xsam.kind": "evaluation", "xsam.checkpoint": logs.redact(checkpoint), "xsam.code_version": code_version(),
        "xsam.seed": str(seed), "xsam.train_data_fingerprint": str(manifest.get("data_fingerprint")),
        **{f"xsam.primary.{b.name}": b.primary for b in benches},
        **{f"xsam.eval_data.{name}": fp for name, fp in fingerprints.items()},
        **({PARENT_TAG: parent_run} if parent_run else {}), **(extra_tags or {})})
    rid = run.info.run_id
    client.log_param(rid, "checkpoint", logs.redact(checkpoint))
    client.log_param(rid, "benchmarks", ",".join(b.name for b in benches))
    if manifest.get("train_config"):
        client.log_dict(rid, manifest["train_config"], "lineage/train_config.json")
    return rid


def benchmark_folder(bench) -> str:
    """The run's artifact folder of one benchmark: benchmarks/<dataset>/<split>."""
    return f"benchmarks/{bench.dataset}/{bench.split}"


def log_results(client, run_id: str, benches, results) -> None:
    """Every benchmark's metrics (`<dataset>/<split>/<metric>`, xsam.tracking.metric_name), its
    per-category table (an MLflow table: valid JSON, NaN as null) and its overlays, in the run `run_id`."""
    import pandas as pd
    from mlflow.entities import Metric

    from xsam.eval.per_category import per_category
    from xsam.eval.selection import metric_key

    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(b.name, k), float(v), now, 0)
               for b in benches for k, v in results[b.name][0].items()
               if not math.isnan(v)]  # NaN: not scored, not logged
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for bench in benches:
        _, acc, pngs = results[bench.name]
        folder = benchmark_folder(bench)
        rows = per_category(bench, acc)
        if rows:
            client.log_table(run_id, pd.DataFrame(rows), f"{folder}/per_category.json")
        with tempfile.TemporaryDirectory() as tmp:
            for key, png in pngs:
                Path(tmp, re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png").write_bytes(png)
            if pngs:
                client.log_artifacts(run_id, tmp, f"{folder}/overlays")


def log_model(run_id: str, checkpoint: str) -> tuple[str, str]:
    """The checkpoint as an MLflow pyfunc model ("model") of the run (xsam.model.pyfunc): a local export is
    copied in as the artifact "export"; a remote one (s3://) is referenced (read directly at load time).
    Ends the run (FINISHED). -> (model URI, model id)."""
    import mlflow

    from xsam.model.pyfunc import log_xsam_model

    with mlflow.start_run(run_id=run_id):
        info = log_xsam_model(checkpoint)
    return info.model_uri, info.model_id


def run(argv: list[str] | None = None):
    """Score, log, register and select; -> the selection decision (None when the alias did not move)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", required=True, help="comma-separated export folders / URIs / runs:/<id>")
    p.add_argument("--benchmarks", help="comma-separated dataset/split (default: every converted eval split)")
    p.add_argument("--shards", default=".cache/xsam/shards")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///.cache/xsam/mlflow.db"))
    p.add_argument("--experiment", default="xsam-eval")
    p.add_argument("--model-name", default="xsam")
    p.add_argument("--alias", default="champion")
    p.add_argument("--workers", type=int, help="model copies (Ray actors); default: one per GPU of the cluster "
                   "with --gpus-per-worker, else 2")
    p.add_argument("--gpus-per-worker", type=float, default=0,
                   help="GPUs per actor: 1 on GPU clusters, one model copy per GPU, run on it (--device auto)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where each actor runs the model: auto = cuda when the actor has a GPU, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="model dtype: auto = bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--image-batch", type=int, default=8, help="images encoded together per actor")
    p.add_argument("--max-sequences", type=int, default=32, help="sequences per LLM / decoder batch")
    p.add_argument("--chunk", type=int, default=64, help="samples per work item handed to an actor")
    p.add_argument("--max-samples", type=int, help="cap per benchmark (quick runs)")
    p.add_argument("--overlays", type=int, default=3,
                   help="overlay pictures per benchmark: its first N samples in shard order (same for every checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent-run", help="MLflow run id that started this evaluation (the workflow's): "
                   "tagged xsam.parent_run on the evaluation runs")
    logs.add_arguments(p)
    args = p.parse_args(argv)
    verbosity = logs.verbosity_of(args)
    logs.setup(verbosity)

    import mlflow
    import ray
    from mlflow import MlflowClient

    from xsam.eval.selection import RULE, current_alias, register_checkpoint, select
    from xsam.tracking import experiment_id
    from xsam.train.shard_index import ShardIndex

    mlflow.set_tracking_uri(args.tracking_uri)  # the pyfunc model is logged with the fluent API
    client = MlflowClient(args.tracking_uri)
    exp_id = experiment_id(client, args.experiment, args.tracking_uri)
    benches = discover_benchmarks(args.shards, args.benchmarks.split(",") if args.benchmarks else None, args.seed)
    if not benches:
        raise SystemExit("[evaluate] no benchmark to score")
    fingerprints = {b.name: ShardIndex.build(args.shards, [(b.dataset, b.split)]).fingerprint() for b in benches}
    sizes = {b.name: ShardIndex.read_manifests(args.shards, [(b.dataset, b.split)])[(b.dataset, b.split)].num_samples
             for b in benches}
    # a run that leaves samples out (--max-samples below a benchmark's size) is PARTIAL: tagged, never selected
    truncated = sorted(n for n, size in sizes.items() if args.max_samples and args.max_samples < size)
    partial = {"xsam.partial": "true" if truncated else "false"}
    if args.device == "cuda" and not args.gpus_per_worker:
        raise SystemExit("[evaluate] --device cuda needs --gpus-per-worker > 0 (a GPU per actor)")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False,
                 **logs.ray_init_kwargs(verbosity, {"HF_HUB_OFFLINE": "1"}, local_cluster=address is None))
    workers = args.workers
    if workers is None:
        gpus = ray.cluster_resources().get("GPU", 0)
        workers = max(1, int(gpus // args.gpus_per_worker)) if args.gpus_per_worker and gpus else 2
    engine = {"image_batch": args.image_batch, "max_sequences": args.max_sequences}
    run_ids: list[str] = []
    checkpoints = [resolve_checkpoint(spec.strip(), client) for spec in args.checkpoints.split(",")]
    # (checkpoint x benchmark) work in parallel where resources allow: the model copies are split over the
    # checkpoints (C <= W: W // C each, all start at once; C > W: one each, a checkpoint's single actor waits
    # for a free slot - never a half-started pool, so no two pools wait on each other)
    per = max(1, workers // len(checkpoints))
    tags = {**partial, **({"xsam.truncated": ",".join(truncated)} if truncated else {})}
    # the runs exist (RUNNING) while their checkpoints are scored; a failure marks them FAILED
    pending = {c: start_run(client, exp_id, c, benches, args.seed, fingerprints, args.parent_run, tags)
               for c in checkpoints}
    try:
        with ThreadPoolExecutor(len(checkpoints)) as threads:
            futures = [threads.submit(evaluate_checkpoint, c, benches, args.shards, per, args.max_samples,
                                      args.overlays, args.gpus_per_worker, args.device, args.dtype, engine, args.chunk)
                       for c in checkpoints]
        for checkpoint, future in zip(checkpoints, futures):
            results = future.result()
            run_id = pending[checkpoint]
            log_results(client, run_id, benches, results)
            model_uri, model_id = log_model(run_id, checkpoint)  # ends the run
            del pending[checkpoint]
            run_ids.append(run_id)
            version = register_checkpoint(client, args.model_name, model_uri, run_id,
                                          {"xsam.checkpoint": logs.redact(checkpoint), **partial}, model_id=model_id)
            summary = {b.name: round(results[b.name][0].get(b.primary, float("nan")), 3) for b in benches}
            scored = [v for v in summary.values() if not math.isnan(v)]
            log.info(f"[evaluate] version {version} <- {checkpoint}: mean primary "
                     f"{sum(scored) / max(1, len(scored)):.2f} over {len(scored)} benchmarks (run {run_id})")
            log.debug(f"[evaluate] version {version} primary metrics {json.dumps(summary)}")
    finally:
        for run_id in pending.values():
            client.set_terminated(run_id, "FAILED")
    decision = select(client, args.model_name, args.alias)
    if decision is None:
        log.warning(f"[evaluate] alias {args.alias!r} not moved: every version is partial (--max-samples)")
    else:
        record = {"alias": args.alias, "version": decision.version, "rule": RULE, "score": decision.score,
                  "benchmarks": decision.metrics, "candidates": decision.candidates}
        for rid in run_ids + ([args.parent_run] if args.parent_run else []):
            client.log_dict(rid, record, "selection/decision.json")
    now = current_alias(client, args.model_name, args.alias)  # read back: what the registry says now
    print(f"[evaluate] registry: {args.model_name}@{args.alias} = version {now}"
          + (f" (mean primary {decision.score:.3f} over {len(decision.metrics)} benchmarks)" if decision else ""))
    return decision


def main(argv: list[str] | None = None) -> int:
    with logs.cli_errors("evaluate"):  # a bad checkpoint / export: one line naming it, exit 2
        run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
