"""One training stage as a readable recipe: setup, train step, checkpoint, export, cleanup.

Runs on every worker of a data-parallel group (torch.distributed initialised by the launcher:
Ray Train in pipelines/train.py). The launcher passes a `Session` - how to report metrics and
checkpoints and where the last checkpoint is - so this module has no Ray in it.

    recipe = StageRecipe(cfg, session)
    recipe.setup()      # model for the stage (+ earlier stages' exports), data, DeepSpeed, resume
    recipe.train()      # steps until the epochs / max_steps are done, checkpoint every N steps
    recipe.export()     # consolidated safetensors + config + key manifest for the next stage
    recipe.cleanup()
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from xsam.model.batching import collate_raw
from xsam.model.builder import WeightPaths, build_xsam, resolve_config
from xsam.model.checkpoint import export_state, load_stage_checkpoint
from xsam.model.config import with_overrides
from xsam.model.stages import STAGES, param_groups
from xsam.train import rng
from xsam.train.config import TrainConfig
from xsam.train.formatting import Formatter, collate_s1
from xsam.train.loader import Loader
from xsam.train.progress import StageProgress
from xsam.train.sampling import Schedule
from xsam.train.shard_index import ShardIndex

log = logging.getLogger(__name__)


class Session(Protocol):
    rank: int
    world_size: int

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None: ...

    def latest_checkpoint(self) -> AbstractContextManager[str | None]: ...


class InjectedFailure(RuntimeError):
    """Raised by `fail_at_step` (fault-tolerance tests)."""


def lr_lambda(cfg: TrainConfig, total_steps: int, steps_per_epoch: float):
    """Multiplier of the base lr at optimizer step k (0-based): linear warmup + cosine, or multistep.

    Multistep with `cfg.warmup_start_factor` set is the reference's S1 schedule (mmengine LinearLR
    start_factor over [0, w), then MultiStepLR over [w, end), both converted to iterations, with
    w = warmup_ratio * total_steps, not rounded): the factor rises linearly from warmup_start_factor at
    k = 0 to 1 at the last warmup step (mmengine's total_iters = w - 1), and the milestones count from
    the first step after the warmup, as mmengine's MultiStepLR counts its steps from its `begin`: with
    w = 1.08 epochs, milestones [24, 30] drop the lr at epochs 25.08 and 31.08.
    """
    warmup = int(cfg.warmup_ratio * total_steps)

    def cosine(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        progress = (k - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def multistep(k: int) -> float:
        return cfg.gamma ** sum(k >= m * steps_per_epoch for m in cfg.milestones)

    def warmup_multistep(k: int) -> float:
        w = cfg.warmup_ratio * total_steps
        if k < w:
            start = cfg.warmup_start_factor
            return start + (1.0 - start) * k / (w - 1) if w > 1 else start
        return multistep(k - math.ceil(w))

    if cfg.schedule != "multistep":
        return cosine
    return multistep if cfg.warmup_start_factor is None else warmup_multistep


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage and offload, the communication settings (`cfg.ds_*`), bf16.

    `ds_grad_accum_dtype` applies only when grad_accum > 1: one micro-batch per step accumulates nothing,
    and fp32 accumulation buffers would only cost memory. A bad value is a ValueError naming the setting.
    """
    for name in ("ds_comm_dtype", "ds_grad_accum_dtype"):
        value = getattr(cfg, name)
        if value is not None and value not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"{name}: {value!r} is not one of fp32, bf16, fp16")
    for name in ("ds_reduce_bucket_size", "ds_allgather_bucket_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: {value!r} is not a positive integer number of elements "
                             f"(YAML: write 200_000_000, not 2e8)")
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": cfg.ds_contiguous_gradients,
                            "reduce_bucket_size": cfg.ds_reduce_bucket_size,
                            "allgather_bucket_size": cfg.ds_allgather_bucket_size}
    if cfg.ds_overlap_comm is not None:
        zero["overlap_comm"] = cfg.ds_overlap_comm
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_per_rank, "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip, "zero_optimization": zero, "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if cfg.ds_comm_dtype is not None:
        out["communication_data_type"] = cfg.ds_comm_dtype
    if cfg.ds_grad_accum_dtype is not None and cfg.grad_accum > 1:
        out["data_types"] = {"grad_accum_dtype": cfg.ds_grad_accum_dtype}
    return out


def _to(batch, device: torch.device | None):
    """Move a batch's tensors (XSAMBatch or S1Batch, raw or prepared) to `device` in place, asynchronously
    when they are pinned; device None pins them in page-locked host memory instead (the loader threads
    do that for a CUDA run, so the copy in train_step is a DMA that does not block the host)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if device is None else t.to(device, non_blocking=True)

    for name, value in vars(batch).items():
        if torch.is_tensor(value):
            setattr(batch, name, move(value))
        elif isinstance(value, list):
            setattr(batch, name, [move(v) if torch.is_tensor(v) else
                                  {k: move(t) for k, t in v.items()} if isinstance(v, dict) else v
                                  for v in value])
    return batch


class StageRecipe:
    def __init__(self, cfg: TrainConfig, session: Session):
        self.cfg = cfg
        self.session = session
        self.policy = STAGES[cfg.stage]
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches done
        self.seen: Counter[str] = Counter()  # samples per source
        self.init_reports: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        w = cfg.weights
        model_cfg = with_overrides(resolve_config(cfg.preset), cfg.model_overrides)
        built = build_xsam(model_cfg, self.policy, WeightPaths(sam=w.get("sam"), siglip=w.get("siglip"),
                                                               llm=w.get("llm"), tokenizer=w.get("tokenizer")))
        self.model, self.tokenizer, self.model_cfg = built.model, built.tokenizer, built.model.cfg
        self.model.siglip_pad_square = cfg.siglip_pad_square  # the stage's SigLIP view (S2 pads to a square)
        self.init_reports = {k: str(v) for k, v in built.reports.items()}
        for folder in cfg.init_from:  # a folder or s3:// prefix, read directly and checked complete
            self.init_reports[f"init:{folder}"] = str(load_stage_checkpoint(self.model, folder, self.policy))
        if cfg.activation_checkpointing:
            self.model.enable_activation_checkpointing()
        self.model.to(self.device)

        datasets = [tuple(d.split("/", 1)) for d in cfg.datasets]
        self.index = ShardIndex.build(cfg.shards, datasets)
        self.schedule = Schedule(self.index.counts(), t=cfg.balance_t, batch_per_rank=cfg.batch_per_rank,
                                 world_size=self.session.world_size, seed=cfg.seed, repeats=self.index.expansions())
        self.formatter = Formatter(cfg.stage, self.index.label_spaces(), sam_size=self.model_cfg.sam.image_size,
                                   seed=cfg.seed)
        self.steps_per_epoch = self.schedule.steps_per_epoch(0)
        micro_total = sum(self.schedule.steps_per_epoch(e) for e in range(int(cfg.epochs)))
        micro_total += int((cfg.epochs % 1) * self.steps_per_epoch)
        self.total_steps = max(1, micro_total // cfg.grad_accum)
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        groups = param_groups(self.model, self.policy, cfg.lr, cfg.weight_decay)
        for g in groups:
            g.pop("names")
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg, self.total_steps, self.steps_per_epoch / cfg.grad_accum))
        said = io.StringIO()  # DeepSpeed print()s 'deepspeed_shm_comm_op built successfully' (CPU): DEBUG
        with contextlib.redirect_stdout(said):
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
                dist_init_required=False)
        for text in said.getvalue().splitlines():
            log.debug("deepspeed: %s", text)
        start = (0, 0)
        with self.session.latest_checkpoint() as ckpt:
            if ckpt is not None:
                self.engine.load_checkpoint(ckpt, tag="ds")
                state = json.loads(Path(ckpt, "state.json").read_text())
                self.step, self.micro, start = state["step"], state["micro"], tuple(state["loader"])
                self.seen = Counter(state["seen"])
                rng.load(ckpt, self.session.rank)  # exact resume: the steps draw what they would have drawn
        threads = max(1, int(cfg.cpus_per_worker))  # one batch per thread: overlaps object-store reads + decode
        self.loader = Loader(self.index, self.schedule, self.session.rank, self.format_sample, self.collate,
                             cfg.seed, start=start, prefetch=2 * threads, threads=threads)
        # one progress line per stage, written by rank 0 (xsam.train.progress: bounded rate, same on CPU/GPU)
        self.progress = StageProgress(cfg.stage, self.total_steps, self.step) if self.session.rank == 0 else None

    def format_sample(self, sample, image_bytes, rng):
        return self.formatter(sample, image_bytes, rng)

    def collate(self, items):
        """-> a RAW batch (uint8 images, bool masks at the original size; pinned for a CUDA run): the
        model builds the views and targets on its device (XSAM.prepare). VGD items first get their
        region prompts from any image of this rank's batch (`format_regions.assign_region_sources`,
        deterministic: its randomness was drawn by the formatter from the per-sample generators)."""
        if self.cfg.stage == "s1":
            batch = collate_s1(items)
        else:
            modes = {f.mode for f in items}
            if len(modes) != 1:
                raise ValueError(f"a batch mixes decode modes {modes}: batches must be single-task")
            from xsam.train.format_regions import assign_region_sources

            items = assign_region_sources(items)
            batch = collate_raw([f.example for f in items], modes.pop(), self.tokenizer, self.model_cfg)
        return _to(batch, None) if self.device.type == "cuda" else batch

    # ------------------------------------------------------------------ training
    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One micro-batch: forward, backward, step. Returns the detached losses ON THE DEVICE (no host
        sync per step; `train` reads them once per log interval)."""
        losses, _ = self.engine(_to(batch, self.device))
        self.engine.backward(losses["total"])
        self.engine.step()
        return {k: v.detach().float() for k, v in losses.items()}

    def train(self) -> None:
        cfg = self.cfg
        sums: dict[str, torch.Tensor | float] = defaultdict(float)  # device tensors until a log line
        count, tokens, samples, t0 = 0, 0, 0, time.perf_counter()
        run_samples, run_t0, last_loss = 0, time.perf_counter(), None  # for the progress line
        trace = self._trace_file()
        for (epoch, pos_step), dataset, batch in self.loader:
            if self.step >= self.total_steps:
                break
            if cfg.fail_at_step is not None and self.step == cfg.fail_at_step and \
                    self.session.rank == self.session.world_size - 1 and not _already_failed(cfg):
                raise InjectedFailure(f"injected failure at step {self.step} on rank {self.session.rank}")
            if trace is not None:
                trace.write(json.dumps({"step": self.step, "epoch": epoch, "pos": pos_step, "dataset": dataset,
                                        "keys": self._keys(epoch, pos_step)}) + "\n")
                trace.flush()
            n = len(batch)  # images in the micro-batch (raw or prepared)
            for k, v in self.train_step(batch).items():
                sums[k] += v
            count += 1
            samples += n
            run_samples += n * self.session.world_size
            tokens += sum(len(t) for t in getattr(batch, "input_ids", []))
            self.seen[dataset] += n * self.session.world_size
            self.micro += 1
            if self.micro % cfg.grad_accum:
                continue
            self.step += 1
            done = self.step >= self.total_steps
            if self.progress is not None:
                self.progress.update(
                    self.step, lambda: float(sums["total"]) / count if count and "total" in sums else last_loss,
                    run_samples / max(time.perf_counter() - run_t0, 1e-9))
            if self.step % cfg.log_every == 0 or done or self.step % cfg.checkpoint_every == 0:
                dt = max(time.perf_counter() - t0, 1e-9)
                metrics = {f"loss/{k}": float(v) / count for k, v in sums.items()}  # the one host sync
                metrics.update({"lr": self.scheduler.get_last_lr()[0], "step": self.step, "epoch": epoch,
                                "samples_per_s": samples * self.session.world_size / dt,
                                "tokens_per_s": tokens * self.session.world_size / dt})
                metrics.update({f"seen/{d}": float(c) for d, c in self.seen.items()})
                ckpt = self.step % cfg.checkpoint_every == 0 or done
                self._report(metrics, ckpt)
                last_loss = metrics.get("loss/total", last_loss)
                sums.clear()
                count, tokens, samples, t0 = 0, 0, 0, time.perf_counter()
            if done:
                break
        if trace is not None:
            trace.close()

    def _keys(self, epoch: int, step: int) -> list[str]:
        gb = self.schedule.epoch(epoch)[step]
        b = self.schedule.batch_per_rank
        refs = self.index.refs[gb.dataset]
        return [refs[i].key for i in gb.indices[self.session.rank * b:(self.session.rank + 1) * b]]

    def _trace_file(self):
        if not self.cfg.trace:
            return None
        Path(self.cfg.trace).mkdir(parents=True, exist_ok=True)
        return open(Path(self.cfg.trace) / f"rank{self.session.rank}.jsonl", "a")

    # ------------------------------------------------------------------ checkpoints
    def _report(self, metrics: dict[str, float], checkpoint: bool) -> None:
        if not checkpoint:
            self.session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag="ds")
            rng.save(tmp, self.session.rank)
            if self.session.rank == 0:
                state = {"step": self.step, "micro": self.micro, "loader": list(self.loader.state()),
                         "seen": dict(self.seen)}
                Path(tmp, "state.json").write_text(json.dumps(state))
            self.session.report(metrics, tmp)

    def export(self) -> str | None:
        """Consolidate the trained weights (a collective under ZeRO-3) and, on rank 0, write the
        stage export straight to export_dir (xsam.model.export: config.json, safetensors shards of at
        most export_shard_size bytes + index, the tokenizer, manifest.json last; no temp name, no copy)."""
        if self.cfg.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.session.rank == 0 else None
        if self.session.rank != 0:
            return None
        export_state(state, self.policy, self.model_cfg, self.cfg.export_dir,
                     extra={"train_config": self.cfg.to_dict(), "init_reports": self.init_reports,
                            "data_fingerprint": self.index.fingerprint()},
                     tokenizer=self.tokenizer, max_shard_size=self.cfg.export_shard_size)
        return self.cfg.export_dir

    def cleanup(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def _already_failed(cfg: TrainConfig) -> bool:
    """The injected failure fires once per run: a marker beside the trace / export says it did."""
    marker = Path(cfg.trace or tempfile.gettempdir()) / f".failed-{cfg.name}"
    if marker.exists():
        return True
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("1")
    return False

