"""X-SAM training-step benchmark: forward + backward time and peak memory.

    python benchmarks/model_step.py                 # CPU: tiny preset and a paper-width, reduced-depth model
                                                    # (~7 min on 2 cores: the reduced model takes ~100 s a step)
    python benchmarks/model_step.py --gpu           # one H100/H200: the paper preset's S3 step in bf16,
                                                    # samples/s and MFU (needs a CUDA device)
    python benchmarks/model_step.py --sam-block     # only the SAM global-block section below (~1 min on CPU)

Each configuration runs in its own process so its peak memory is its own (ru_maxrss on CPU,
torch.cuda.max_memory_allocated on GPU). The batch is a generic-segmentation S3 batch (two images,
two categories, teacher-forced), the most common S3 task shape. Weights are random: speed and memory
do not depend on their values.

Both modes end with the SAM global-block section (fp32 on CPU, bf16 with --gpu): ONE ViT-L
global-attention block at 64x64 tokens (width 1024, 16 heads, batch 1), forward + backward,
segment-anything's own Block (naive attention, the [heads, N, N] scores materialised) vs the same block
with xsam's SdpaAttention, side by side with the ratio. Peak memory: on CPU the rise of the process's
peak RSS (ru_maxrss) during the step over its RSS just before it (after a small warm-up), each variant
in a fresh process; on GPU max_memory_allocated over memory_allocated before the step. The SDPA kernel
that ran is named (from torch.profiler): on CPU a bias that needs a gradient takes the math kernel.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from segment_anything.modeling.image_encoder import Block
from torch import nn
from torch.profiler import profile

from xsam.model.batching import Example, collate
from xsam.model.builder import build_model
from xsam.model.config import XSAMConfig, paper, tiny
from xsam.model.sam_attention import SdpaAttention
from xsam.model.stages import S3, apply_policy
from xsam.model.tokenizer import build_tiny_tokenizer
from xsam.model.xsam import DecodeMode

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (H200: the same tensor cores)


def reduced_paper() -> XSAMConfig:
    """Paper widths and image sizes, shallow: SAM 4 blocks, SigLIP 2 layers, LLM 2 layers, decoder 4."""
    cfg = paper()
    cfg.sam = replace(cfg.sam, depth=4, global_attn_indexes=(1, 3), connector_blocks=(2, 3, 4), projector_block=3)
    cfg.siglip = replace(cfg.siglip, num_hidden_layers=2)
    cfg.llm = replace(cfg.llm, num_hidden_layers=2)
    cfg.decoder = replace(cfg.decoder, dec_layers=4, enc_layers=2)
    return cfg


CONFIGS = {"tiny": tiny, "paper-reduced": reduced_paper, "paper": paper}


def _batch(cfg: XSAMConfig, tok, device: str):
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(2):
        image = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
        masks = np.zeros((2, 480, 640), bool)
        masks[0, 50:200, 80:300] = True
        masks[1, 250:400, 300:600] = True
        q = "<image>\nCan you segment the image based on the following categories: <p>person</p>, " \
            "<p>sky</p>? Please output the segmentation masks."
        examples.append(Example(image, [(q, "Sure, <SEG>.")], masks, [0, 1]))
    batch = collate(examples, DecodeMode.per_sample, tok, cfg)
    batch.sam_pixels, batch.siglip_pixels = batch.sam_pixels.to(device), batch.siglip_pixels.to(device)
    batch.input_ids = [t.to(device) for t in batch.input_ids]
    batch.labels = [t.to(device) for t in batch.labels]
    batch.targets = [{k: v.to(device) for k, v in t.items()} for t in batch.targets]
    return batch


def train_flops(model, cfg: XSAMConfig, batch) -> float:
    """Model FLOPs of one training step: 6 x parameters x tokens per part (+ attention scores)."""
    def n(module):
        return sum(p.numel() for p in module.parameters())

    b = batch.sam_pixels.shape[0]
    text = sum(len(t) for t in batch.input_ids) / b + cfg.num_visual_tokens
    sam_tokens = cfg.sam.grid ** 2
    flops = 6 * n(model.llm) * text + 6 * n(model.siglip) * cfg.siglip.num_tokens + 6 * n(model.sam) * sam_tokens
    flops += 6 * 2 * cfg.llm.num_hidden_layers * cfg.llm.hidden_size * text ** 2  # causal attention (x2 fwd+bwd)
    flops += 6 * n(model.segmentor) * (cfg.sam.image_size // 8) ** 2
    return flops * b


def run_one(name: str, device: str, dtype: str, steps: int) -> dict:
    cfg = CONFIGS[name]()
    tok = build_tiny_tokenizer(tempfile.mkdtemp())  # a real tokenizer; its ids fit any of the vocabularies
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg, S3.parts, cfg.llm.vocab_size)
    model.special_ids = {t: tok.convert_tokens_to_ids(t) for t in ("<SEG>", "<p>", "</p>")}
    apply_policy(model, S3, unused=model.unused_prefixes())
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    batch = _batch(cfg, tok, device)
    if dtype == "bf16":
        batch.sam_pixels, batch.siglip_pixels = batch.sam_pixels.bfloat16(), batch.siglip_pixels.bfloat16()
    times = []
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses, _ = model(batch)
        losses["total"].backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # step 0 warms up (allocator, kernels)
            times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    out = {"config": name, "device": device, "dtype": dtype, "params": sum(p.numel() for p in model.parameters()),
           "step_s": sec, "samples_per_s": batch.sam_pixels.shape[0] / sec}
    if device == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["mfu"] = train_flops(model, cfg, batch) / sec / H100_BF16_PEAK
    else:
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


SAM_BLOCK = {"dim": 1024, "heads": 16, "grid": 64}  # ViT-L, 1024 / 16 = 64 x 64 tokens, a global block


def _sam_block(variant: str, dim: int, heads: int, grid: int, device: str, dtype: torch.dtype) -> nn.Module:
    """A segment-anything global-attention Block (non-zero rel_pos); `sdpa`: attn swapped for SdpaAttention."""
    blk = Block(dim, heads, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=0,
                input_size=(grid, grid)).to(device, dtype)
    with torch.no_grad():
        blk.attn.rel_pos_h.normal_(std=0.02)
        blk.attn.rel_pos_w.normal_(std=0.02)
    if variant == "sdpa":
        blk.attn = SdpaAttention.from_attention(blk.attn)
    return blk


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_sam_block(variant: str, device: str, dtype_name: str) -> dict:
    """One forward + backward of one SAM global block; the memory the step adds at its peak."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    warm = _sam_block(variant, 64, 4, 8, device, dtype)  # warm-up: kernels, thread pools, allocator
    x = torch.randn(1, 8, 8, 64, device=device, dtype=dtype, requires_grad=True)
    with profile() as prof:
        warm(x).sum().backward()
    kernels = sorted({e.name.removeprefix("aten::") for e in prof.events()
                      if e.name.startswith("aten::_scaled_dot_product") and not e.name.endswith("_backward")})
    g = SAM_BLOCK["grid"]
    blk = _sam_block(variant, SAM_BLOCK["dim"], SAM_BLOCK["heads"], g, device, dtype)
    x = torch.randn(1, g, g, SAM_BLOCK["dim"], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before, maxrss_before = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    blk(x).backward(grad)
    if device == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    assert blk.attn.rel_pos_h.grad is not None
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if maxrss <= maxrss_before:  # the step never rose above an earlier peak: no honest figure
            sys.exit(f"sam block {variant}: step peak not above the set-up peak "
                     f"({maxrss} <= {maxrss_before})")
        peak = maxrss - before
    return {"variant": variant, "device": device, "dtype": dtype_name, "peak_mib": peak / 2**20,
            "step_s": sec, "kernel": ",".join(kernels) or "-"}


def sam_block_section(device: str, dtype: str) -> None:
    rows = {}
    for variant in ("naive", "sdpa"):
        proc = subprocess.run([sys.executable, __file__, "--one-sam-block", variant, "--device", device,
                               "--dtype", dtype], check=False, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"SAM block {variant} failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    n, heads = SAM_BLOCK["grid"] ** 2, SAM_BLOCK["heads"]
    scores = heads * n * n * (2 if dtype == "bf16" else 4) / 2**20
    print(f"\nSAM global block: {SAM_BLOCK['grid']}x{SAM_BLOCK['grid']} tokens, width {SAM_BLOCK['dim']}, "
          f"{heads} heads, batch 1, {dtype}, forward + backward on {device} "
          f"(one [heads, N, N] = {scores:.0f} MiB)")
    print(f"{'attention':12s}{'peak MiB':>10s}{'step s':>9s}  sdpa kernel")
    for r in rows.values():
        print(f"{r['variant']:12s}{r['peak_mib']:>10.0f}{r['step_s']:>9.2f}  {r['kernel']}")
    naive, sdpa = rows["naive"], rows["sdpa"]
    print(f"sdpa / naive: peak memory {sdpa['peak_mib'] / naive['peak_mib']:.2f}x, "
          f"step time {sdpa['step_s'] / naive['step_s']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="paper preset, bf16, on the CUDA device")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sam-block", action="store_true", help="only the SAM global-block memory section")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-sam-block", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.dtype, args.steps)))
        return
    if args.one_sam_block:
        print(json.dumps(run_sam_block(args.one_sam_block, args.device, args.dtype)))
        return
    block_device, block_dtype = ("cuda", "bf16") if args.gpu else ("cpu", "fp32")
    if args.sam_block:
        sam_block_section(block_device, block_dtype)
        return
    runs = [("paper", "cuda", "bf16")] if args.gpu else [("tiny", "cpu", "fp32"), ("paper-reduced", "cpu", "fp32")]
    rows = []
    for name, device, dtype in runs:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--device", device, "--dtype", dtype,
                               "--steps", str(args.steps)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'config':16s}{'device':8s}{'dtype':7s}{'params':>16s}{'step s':>9s}{'samples/s':>11s}{'peak GB':>9s}"
          f"{'MFU':>7s}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['config']:16s}{r['device']:8s}{r['dtype']:7s}{r['params']:>16,d}{r['step_s']:>9.3f}"
              f"{r['samples_per_s']:>11.2f}{r['peak_mem_gb']:>9.2f}{mfu:>7s}")
    sam_block_section(block_device, block_dtype)


if __name__ == "__main__":
    main()
