"""Score checkpoints on benchmarks with Ray, log everything to MLflow, register and select the model.

    python pipelines/evaluate.py --checkpoints runs/xsam-s3/export,runs:/<mlflow run id> \\
        --benchmarks fixture_coco_panoptic/val,fixture_refcoco/val --shards .cache/xsam/shards \\
        --tracking-uri http://127.0.0.1:5000 --model-name xsam

The checkpoints are scored concurrently where resources allow (the model copies split over them). Per
checkpoint: a pool of Ray actors (one model copy each; with --gpus-per-worker 1 one per GPU, the
model on it, bf16 by default: --device, --dtype) scores the benchmarks' samples with the batched engine
(xsam.eval.engine), chunk by chunk, with a progress line per benchmark; the accumulators are summed in
sample order; one parent MLflow run per checkpoint gets every benchmark's metrics
(`<benchmark>/<metric>`, with the counts `<benchmark>/n_images`, `n_queries`, `n_prompts`), the
primary metric of each as a tag, the lineage (checkpoint, training
config, data fingerprints, seed, code version) and a child run per benchmark with its per-category
table and a few prediction overlays. Each checkpoint becomes a version of the registered model and
the alias (default `champion`) moves to the best one by the selection rule (xsam.eval.selection).
Benchmarks default to every evaluation split (role: eval) converted under --shards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xsam.data import storage
from xsam.data.schema import Task
from xsam.data.shards import read_manifest



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
        m = read_manifest(storage.join(shards, dataset, split, "manifest.json"))
        if m is None:
            raise FileNotFoundError(f"benchmark {name}: no manifest under {shards} (convert it first)")
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
    print(f"[evaluate] {checkpoint}: {workers} actor(s) on {', '.join(where)}", flush=True)
    pool = ActorPool(pool_actors)
    results = {}
    for bench in benches:
        n = ShardIndex.read_manifests(shards, [(bench.dataset, bench.split)])[(bench.dataset, bench.split)].num_samples
        n = min(n, max_samples) if max_samples else n
        chunks = [list(range(k, min(k + chunk, n))) for k in range(0, n, max(1, chunk))]
        progress = Progress(bench.name, n, progress_every)
        acc, pngs = bench.new(), []
        work = pool.map(lambda a, idx, b=bench: a.score.remote(b, idx, overlays), chunks)
        for idx, (part, part_pngs) in zip(chunks, work):
            acc = {k: acc[k] + part[k] for k in acc}
            pngs += part_pngs[:max(0, overlays - len(pngs))]
            progress.update(len(idx), part["counts"].queries)
        progress.close()
        results[bench.name] = (bench.result(acc), acc, pngs)
    for a in pool_actors:
        ray.kill(a)
    return results


def log_checkpoint(client, experiment_id: str, checkpoint: str, benches, results, seed: int, fingerprints,
                   parent_run: str | None = None, extra_tags: dict[str, str] | None = None) -> str:
    from xsam.pipelines.train import code_version
    from xsam.model.export import read_manifest as read_export_manifest

    manifest = read_export_manifest(checkpoint)
    parent = client.create_run(experiment_id, run_name=f"eval {Path(checkpoint.rstrip('/')).parent.name}", tags={
        "xsam.kind": "evaluation", "xsam.checkpoint": checkpoint, "xsam.code_version": code_version(),
        "xsam.seed": str(seed), "xsam.train_data_fingerprint": str(manifest.get("data_fingerprint")),
        **{f"xsam.primary.{b.name}": b.primary for b in benches},
        **{f"xsam.eval_data.{name}": fp for name, fp in fingerprints.items()},
        **({"mlflow.parentRunId": parent_run} if parent_run else {}), **(extra_tags or {})})
    pid = parent.info.run_id
    client.log_param(pid, "checkpoint", checkpoint)
    client.log_param(pid, "benchmarks", ",".join(b.name for b in benches))
    if manifest.get("train_config"):
        client.log_dict(pid, manifest["train_config"], "lineage/train_config.json")
    for bench in benches:
        metrics, acc, pngs = results[bench.name]
        child = client.create_run(experiment_id, run_name=bench.name, tags={
            "mlflow.parentRunId": pid, "xsam.kind": "benchmark", "xsam.benchmark": bench.name})
        for key, value in metrics.items():
            if value == value:  # skip NaN
                client.log_metric(pid, f"{bench.name}/{key}", float(value))
                client.log_metric(child.info.run_id, key, float(value))
        table = _per_category(acc)
        if table:
            client.log_dict(child.info.run_id, table, "per_category.json")
        for key, png in pngs:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp, f"{key}.png")
                path.write_bytes(png)
                client.log_artifact(child.info.run_id, str(path), "overlays")
        client.set_terminated(child.info.run_id)
    client.set_terminated(pid)
    return pid


def _per_category(acc: dict) -> dict:
    table = {}
    for name, a in acc.items():
        for attr in ("per_class_iou", "per_class", "per_category"):
            fn = getattr(a, attr, None)
            if callable(fn):
                try:
                    table[name] = fn()
                except (ValueError, ZeroDivisionError):
                    pass
                break
    return table


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
    p.add_argument("--overlays", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent-run", help="MLflow run id to nest the evaluation runs under (the workflow's)")
    args = p.parse_args(argv)

    import ray
    from mlflow import MlflowClient

    from xsam.eval.selection import RULE, current_alias, register_checkpoint, select
    from xsam.train.shard_index import ShardIndex

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(args.experiment)
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
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
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
    with ThreadPoolExecutor(len(checkpoints)) as threads:
        futures = [threads.submit(evaluate_checkpoint, c, benches, args.shards, per, args.max_samples, args.overlays,
                                  args.gpus_per_worker, args.device, args.dtype, engine, args.chunk)
                   for c in checkpoints]
    for checkpoint, future in zip(checkpoints, futures):
        results = future.result()
        run_id = log_checkpoint(client, exp_id, checkpoint, benches, results, args.seed, fingerprints, args.parent_run,
                                extra_tags={**partial, **({"xsam.truncated": ",".join(truncated)} if truncated else {})})
        run_ids.append(run_id)
        source = checkpoint
        if not storage.is_uri(checkpoint):  # the registry keeps its own copy of a local checkpoint
            client.log_artifacts(run_id, checkpoint, "checkpoint")
            source = f"{client.get_run(run_id).info.artifact_uri}/checkpoint"
        version = register_checkpoint(client, args.model_name, source, run_id,
                                      {"xsam.checkpoint": checkpoint, **partial})
        summary = {b.name: round(results[b.name][0].get(b.primary, float("nan")), 3) for b in benches}
        print(f"[evaluate] {checkpoint}: version {version}, run {run_id}, primary {json.dumps(summary)}")
    decision = select(client, args.model_name, args.alias)
    if decision is None:
        print(f"[evaluate] alias {args.alias!r} not moved: every version is partial (--max-samples)")
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
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
