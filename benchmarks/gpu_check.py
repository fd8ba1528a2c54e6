"""GPU check: the real training recipe at paper width on ONE GPU, in bf16, on generated shards.

    python benchmarks/gpu_check.py                          # cuda, paper widths, LLM depth 8, S1 + S3
    python benchmarks/gpu_check.py --llm-layers 32          # the full Phi-3 depth (fits one H200)
    python benchmarks/gpu_check.py --device cpu --preset tiny --steps 2 --images 8   # smoke run, any machine

What runs: COCO-panoptic-like data (640x480 JPEGs, 9-12 segments, 133 categories as in COCO panoptic) is
generated and converted to shards with the project's converter; then for each stage `StageRecipe` (the
same setup / train step / DeepSpeed engine / loader as `pipelines/train.py`, with the `paper` profile's
settings: ZeRO stage, DeepSpeed communication settings, bf16, activation checkpointing, batch per GPU)
runs `--warmup + --steps` optimizer steps in one process (world size 1, no Ray: a GPU box without a
cluster). Random weights (no checkpoint needed); the tokenizer is the tiny test tokenizer, so the LM
head is narrower than Phi-3's 32,064 rows (~2.6% of the LLM's parameters; said in the output).

Printed per stage, over the timed steps (after warm-up): step time (mean, min), samples/s, peak GPU
memory (torch.cuda.max_memory_allocated / reserved), the loader-wait share (time the train loop waited
for the next batch / wall time), and MFU = samples/s x training FLOPs per sample (the planner's count,
`xsam.train.planning.train_flops_per_sample`, for the model as built) / peak. --peak-tflops defaults to
790 (H200 dense bf16 as lent here; H100 SXM 989, A100 312).

A GPU machine may reach no package index: stage the wheels first (docs/gpu-check.md,
benchmarks/stage_wheels.sh), then on the GPU machine

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xsam.data.convert import convert, serial_executor  # noqa: E402
from xsam.data.fixtures.coco_panoptic import write_panoptic_split  # noqa: E402
from xsam.data.registry import load_registry  # noqa: E402
from xsam.model.tokenizer import build_tiny_tokenizer  # noqa: E402
from xsam.train.config import load_profile, profile_path  # noqa: E402
from xsam.train.recipe import StageRecipe  # noqa: E402

DATASET, SPLIT = "gpucheck_panoptic", "train"
CATEGORIES = [{"id": i, "name": f"category {i}", "isthing": int(i <= 80), "supercategory": "thing" if i <= 80
               else "stuff"} for i in range(1, 134)]


# --------------------------------------------------------------------------------------------- data
def make_shards(work: Path, images: int, categories: int) -> str:
    """COCO-like shards with `categories` classes (133 as COCO panoptic, capped by the S1 head's width)."""
    out = work / f"shards-{images}-{categories}"
    if (out / "_meta" / DATASET / SPLIT / "manifest.json").exists():  # xsam.data.shards.manifest_location
        return str(out)
    root = work / "src" / "coco_panoptic"
    cats = [c for c in CATEGORIES if c["id"] <= categories // 2] + \
        [c for c in CATEGORIES if c["id"] > 133 - (categories - categories // 2)]  # things and stuff
    write_panoptic_split(root, SPLIT, np.random.default_rng(0), images, size=(640, 480), segments=(9, 13),
                         categories=cats)
    registry = work / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    entry = {"name": DATASET, "task": "generic_seg", "format": "coco_panoptic", "root": "coco_panoptic",
             "splits": {SPLIT: {"annotations": f"annotations/panoptic_{SPLIT}.json", "images": f"images/{SPLIT}",
                                "masks": f"annotations/panoptic_{SPLIT}"}},
             "label_space": "gpucheck_coco", "license": "synthetic",
             "citation": "synthetic"}
    (registry / f"{DATASET}.yaml").write_text(yaml.safe_dump(entry))
    entries, problems = load_registry(registry)
    if problems:
        raise SystemExit(f"registry problems: {problems}")
    (outcome,) = convert(list(entries.values()), str(work / "src"), str(out), force=True, executor=serial_executor,
                         max_samples=max(1, images // 8), log=lambda _: None)
    if outcome.status not in ("converted", "up-to-date"):
        raise SystemExit(f"conversion failed: {outcome}")
    return str(out)


# ------------------------------------------------------------------------------------- the session
class LocalSession:
    """The recipe's Session for one process: metrics kept in memory, no checkpoint to resume."""

    rank, world_size = 0, 1

    def __init__(self):
        self.history: list[dict] = []

    def report(self, metrics, checkpoint_dir=None) -> None:
        self.history.append(dict(metrics))

    @contextmanager
    def latest_checkpoint(self):
        yield None


def init_process_group(device: str) -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------- one stage
def run_stage(stage: str, args, shards: str, work: Path) -> dict:
    overrides = [f"shards={shards}", f"output={work / 'runs'}", f"run_name=gpucheck-{stage}",
                 f"datasets=[{DATASET}/{SPLIT}]", "num_workers=1", "init_from=[]", "mlflow_uri=null",
                 f"max_steps={args.warmup + args.steps}", "checkpoint_every=1000000", "log_every=1000000",
                 f"use_gpu={'true' if args.device == 'cuda' else 'false'}", f"bf16={str(args.bf16).lower()}",
                 f"cpus_per_worker={args.loader_cpus}", f"weights={{tokenizer: {work / 'tokenizer'}}}",
                 f"preset={args.preset}"]
    if args.batch:
        overrides.append(f"batch_per_rank={args.batch}")
    if args.llm_layers:
        overrides.append(f"model_overrides={{llm: {{num_hidden_layers: {args.llm_layers}}}}}")
    cfg = load_profile(profile_path(args.profile), stage, overrides).with_absolute_paths(ROOT)
    # max_steps, not the epochs, ends the run: enough epochs to cover it
    need = (args.warmup + args.steps) * cfg.batch_per_rank * cfg.grad_accum
    cfg = dataclasses.replace(cfg, epochs=float(max(cfg.epochs, -(-need // args.images) + 1)))
    session = LocalSession()
    recipe = StageRecipe(cfg, session)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    recipe.setup()
    setup_s = time.perf_counter() - t0

    steps: list[float] = []
    waits: list[float] = []
    samples: list[int] = []
    last_end = [time.perf_counter()]
    inner = recipe.train_step

    def timed_step(batch):
        start = time.perf_counter()
        waits.append(start - last_end[0])  # the loop waited for this batch (the loader's share)
        out = inner(batch)
        sync(args.device)
        end = time.perf_counter()
        steps.append(end - start)
        samples.append(len(batch))
        last_end[0] = end
        return out

    recipe.train_step = timed_step
    sync(args.device)
    last_end[0] = time.perf_counter()
    recipe.train()
    timed = slice(args.warmup, None)
    step_t, wait_t, n = steps[timed], waits[timed], samples[timed]
    wall = sum(step_t) + sum(wait_t)
    model = recipe.engine.module
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"stage": stage, "params": params, "trainable": trainable, "batch_per_gpu": cfg.batch_per_rank,
           "zero_stage": cfg.zero_stage, "activation_checkpointing": cfg.activation_checkpointing,
           "setup_s": setup_s, "steps_timed": len(step_t),
           "step_s_mean": float(np.mean(step_t)) if step_t else float("nan"),
           "step_s_min": float(np.min(step_t)) if step_t else float("nan"),
           "samples_per_s": sum(n) / wall if wall else float("nan"),
           "loader_wait_share": sum(wait_t) / wall if wall else float("nan"),
           "losses_finite": all(np.isfinite(v) for m in session.history for k, v in m.items() if k.startswith("loss/"))}
    if args.device == "cuda":
        row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    try:
        from xsam.train.planning import train_flops_per_sample
    except ImportError:  # the planner is optional for a smoke run of an older tree
        train_flops_per_sample = None
    if train_flops_per_sample is not None:
        flops = train_flops_per_sample(recipe.model_cfg, stage, activation_checkpointing=cfg.activation_checkpointing)
        row["train_tflop_per_sample"] = flops / 1e12
        row["mfu"] = row["samples_per_s"] * flops / (args.peak_tflops * 1e12)
    del recipe, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="paper")
    p.add_argument("--profile", default="paper", help="training profile whose stage settings are used")
    p.add_argument("--llm-layers", type=int, default=8, help="LLM depth (0: the preset's; 32 = Phi-3 mini)")
    p.add_argument("--stages", default="s1,s3")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per stage")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels, loader start)")
    p.add_argument("--batch", type=int, default=0, help="batch per GPU (0: the profile's)")
    p.add_argument("--images", type=int, default=96, help="generated images")
    p.add_argument("--loader-cpus", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for cuda")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak of the device")
    p.add_argument("--work", default=str(ROOT / ".cache" / "gpu_check"))
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = args.device == "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a smoke run")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tokenizer").exists():
        build_tiny_tokenizer(work / "tokenizer")
    t0 = time.perf_counter()
    from xsam.model.config import PRESETS

    shards = make_shards(work, args.images, min(133, PRESETS[args.preset]().decoder.num_s1_classes))
    print(f"data: {args.images} generated 640x480 images -> shards in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16={args.bf16}", flush=True)
    init_process_group(args.device)
    rows = []
    for stage in args.stages.split(","):
        row = run_stage(stage, args, shards, work)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    print("\nstage  params  trainable  batch  step s (mean/min)  samples/s  peak GiB  loader wait  TFLOP/sample  MFU")
    for r in rows:
        peak = r.get("peak_alloc_gib", r.get("peak_rss_gib", float("nan")))
        print(f"{r['stage']:<5}  {r['params'] / 1e6:6.0f}M  {r['trainable'] / 1e6:8.0f}M  {r['batch_per_gpu']:5d}  "
              f"{r['step_s_mean']:8.3f}/{r['step_s_min']:.3f}  {r['samples_per_s']:9.2f}  {peak:8.1f}  "
              f"{r['loader_wait_share']:10.1%}  {r.get('train_tflop_per_sample', float('nan')):12.2f}  "
              f"{r.get('mfu', float('nan')):.3f}")
    print(f"(MFU against {args.peak_tflops:.0f} TFLOP/s; LLM depth {args.llm_layers or 'preset'}; "
          "tiny tokenizer: the LM head has fewer rows than Phi-3's)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()
    return 0 if all(r["losses_finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
