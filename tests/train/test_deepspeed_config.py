"""recipe.deepspeed_config: the dict each profile produces, and that DeepSpeed accepts and applies it.

The engine test builds real DeepSpeed ZeRO-2 engines (bf16, grad_accum 2, the paper's communication
settings) in 2 gloo processes on the CPU and takes one optimizer step.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xsam.train.config import load_profile, profile_path
from xsam.train.recipe import deepspeed_config

REPO = Path(__file__).resolve().parents[2]
STAGES = ("s1", "s2", "s3")
PAPER_ZERO = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
              "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000}


def _ds(profile: str, stage: str, *overrides: str) -> dict:
    return deepspeed_config(load_profile(profile_path(profile), stage, list(overrides)))


@pytest.mark.parametrize("profile", ["paper", "single-node-8gpu"])
def test_gpu_profiles_set_the_communication_settings(profile):
    for stage in STAGES:
        ds = _ds(profile, stage)
        assert ds["zero_optimization"] == PAPER_ZERO, stage
        assert ds["bf16"] == {"enabled": True}
        assert ds["communication_data_type"] == "fp32", "gradients reduced in fp32, not bf16"
        assert "data_types" not in ds, "grad_accum 1: nothing to accumulate, no fp32 buffers"
        assert _ds(profile, stage, "grad_accum=2")["data_types"] == {"grad_accum_dtype": "fp32"}


def test_local_profile_keeps_deepspeeds_defaults():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for stage in STAGES:
        ds = _ds("local", stage)
        assert "communication_data_type" not in ds and "data_types" not in ds
        zero = ds["zero_optimization"]
        assert "overlap_comm" not in zero, "DeepSpeed decides: off for ZeRO-2, on for ZeRO-3"
        # what the dict sets is what DeepSpeed would pick with {"stage": N} alone: CPU runs are unchanged
        assert DeepSpeedZeroConfig(**zero) == DeepSpeedZeroConfig(stage=zero["stage"])
    ds = _ds("local", "s1", "grad_accum=2", "ds_grad_accum_dtype=fp32")
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}


@pytest.mark.parametrize("override, message", [
    ("ds_comm_dtype=float32", "ds_comm_dtype: 'float32' is not one of fp32, bf16, fp16"),
    ("ds_grad_accum_dtype=fp8", "ds_grad_accum_dtype: 'fp8'"),
    ("ds_reduce_bucket_size=2e8", "ds_reduce_bucket_size: '2e8' is not a positive integer"),  # YAML: a string
    ("ds_allgather_bucket_size=0", "ds_allgather_bucket_size: 0 is not a positive integer"),
])
def test_bad_values_name_the_setting(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _ds("paper", "s1", override)


# ---------------------------------------------------------------- a real engine, 2 gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_worker(rank: int, port: int, out_dir: str, overrides: list[str]) -> None:
    # DeepSpeed's CPU backend compiles its shm op once (~60 s): share pipelines/train.py's workers' cache
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    import deepspeed

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")  # what a launcher would set
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_profile(profile_path("paper"), "s3", ["use_gpu=false", "batch_per_rank=2", *overrides])
        config = deepspeed_config(cfg)
        torch.manual_seed(0)  # same initial weights on both ranks
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                          dist_init_required=False)
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        losses = []
        for micro in range(cfg.grad_accum):
            x = torch.randn(cfg.batch_per_rank, 16, generator=g).to(torch.bfloat16)
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        opt = engine.optimizer
        torch.save({"config": config, "losses": losses,
                    "comm_dtype": opt.communication_data_type, "accum_dtype": opt.gradient_accumulation_dtype,
                    "overlap_comm": opt.overlap_comm, "param_dtype": next(engine.module.parameters()).dtype,
                    "global_steps": engine.global_steps,
                    "before": before,
                    "after": [p.detach().float().clone() for p in engine.module.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_deepspeed_accepts_and_applies_the_paper_settings(tmp_path):
    mp.spawn(_engine_worker, args=(_free_port(), str(tmp_path), ["grad_accum=2"]), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        assert r["config"]["zero_optimization"] == PAPER_ZERO
        assert r["param_dtype"] == torch.bfloat16
        assert r["comm_dtype"] == torch.float32 and r["overlap_comm"] is True
        assert r["accum_dtype"] == torch.float32, "bf16 parameters, micro-batches accumulated in fp32"
        assert r["global_steps"] == 1, "2 micro-batches = 1 optimizer step"
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        assert all(not torch.equal(a, b) for a, b in zip(r["before"], r["after"])), "every parameter moved"
    # ZeRO-2: each rank updates its partition and all-gathers the rest: the ranks end identical
    assert all(torch.equal(a, b) for a, b in zip(r0["after"], r1["after"]))
    assert r0["losses"] != r1["losses"], "the ranks saw different data"
