"""`full_run.py --dry-run`: the plan - steps, resources, samples per dataset, tokens and optimizer
steps per stage - and a predicted wall time per stage from model FLOPs.

Prediction: FLOPs per sample are counted from the preset's parameter counts (6 x params x tokens
for trained parts, 2 x for frozen forward-only parts, 4 x for frozen parts gradients flow through,
+1/3 of the forward again under activation checkpointing); time = FLOPs / (GPUs x peak x MFU).
Peak and MFU are stated assumptions (A100 bf16 dense 312 TFLOP/s, MFU 0.35), not measurements.
"""

from __future__ import annotations

import math

import torch

from xsam.data import storage
from xsam.data.shards import read_manifest
from xsam.model.builder import build_model, resolve_config
from xsam.model.stages import Part

A100_PEAK = 312e12
ASSUMED_MFU = 0.35
TEXT_TOKENS = {"s1": 0, "s2": 70, "s3": 250}  # assumed mean text tokens per sample (captions vs S3 chats)
REPORTED_HOURS = {"s1": 24.0, "s2": 5.0, "s3": 24.0}  # reference section 2, on 16 GPUs

# public per-image sizes of the paper's training splits, used until the manifests exist (approximate)
PUBLIC_SAMPLES = {
    "coco_panoptic/train2017": 118_287, "llava_pretrain_558k/train": 558_128, "llava_v1_5_mix665k/train": 624_610,
    "refcoco/train": 16_994, "refcoco_plus/train": 16_992, "refcocog/train": 21_899, "reasonseg/train": 239,
    "grandf/train": 1_000, "psg_gcg/train": 31_000, "refcocog_gcg/train": 24_000, "flickr30k_gcg/train": 148_900,
    "coco_vgd/train2017": 117_266,
}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def flops_per_sample(preset: str, stage: str, activation_checkpointing: bool) -> float:
    cfg = resolve_config(preset)
    with torch.device("meta"):
        m = build_model(cfg, frozenset({Part.segmentor, Part.mllm}))
    sam, seg = _count(m.sam), _count(m.segmentor)
    siglip = _count(m.siglip)
    llm = _count(m.llm)
    proj = _count(m.image_projector) + _count(m.seg_projector) + _count(m.llm_to_decoder)
    sam_tok, sig_tok = cfg.sam.grid ** 2, cfg.siglip.num_tokens
    llm_tok = cfg.num_visual_tokens + TEXT_TOKENS[stage]
    mask_pos = (cfg.sam.image_size // 8) ** 2
    if stage == "s1":
        fwd = 2 * sam * sam_tok + 2 * seg * mask_pos
        total = 3 * fwd
    elif stage == "s2":  # everything frozen but the projectors; gradients flow back through the LLM only
        fwd = 2 * (sam * sam_tok + siglip * sig_tok + llm * llm_tok + proj * llm_tok)
        total = fwd + 2 * llm * llm_tok + 4 * proj * llm_tok
    else:
        fwd = 2 * (sam * sam_tok + siglip * sig_tok + llm * llm_tok + proj * llm_tok + seg * mask_pos)
        total = 3 * fwd
    return total + (fwd if activation_checkpointing and stage != "s1" else 0)


def samples(shards: str, datasets: list[str]) -> dict[str, tuple[int | None, str, int | None]]:
    """dataset/split -> (samples, where the number comes from, shard count)."""
    out = {}
    for name in datasets:
        d, s = name.split("/", 1)
        try:
            m = read_manifest(storage.join(shards, d, s, "manifest.json"))
        except Exception:  # noqa: BLE001 - an unreachable store is "not converted yet" for a plan
            m = None
        if m is not None:
            out[name] = (m.num_samples, "manifest", len(m.shards))
        else:
            out[name] = (PUBLIC_SAMPLES.get(name), "public size (not converted yet)", None)
    return out


def print_plan(profile: str, cfgs: dict, shards: str) -> None:
    print(f"[plan] profile {profile!r}; shards {shards}")
    print("  step      resources")
    print("  convert   Ray Data: one task (1 CPU) per shard, all datasets of the registry in one job")
    for stage, cfg in cfgs.items():
        unit = "GPU" if cfg.use_gpu else "CPU"
        print(f"  {stage:9s} Ray Train: {cfg.num_workers} workers x 1 {unit} ({cfg.cpus_per_worker} CPU each), "
              f"DeepSpeed ZeRO-{cfg.zero_stage}, {'bf16' if cfg.bf16 else 'fp32'}")
    print("  evaluate  Ray actors, one model copy each; then the registry alias")
    for stage, cfg in cfgs.items():
        counts = samples(shards, cfg.datasets)
        known = {k: v[0] for k, v in counts.items() if v[0]}
        total = sum(known.values())
        print(f"\n[plan] {stage}: {len(cfg.datasets)} dataset(s), balancing t = {cfg.balance_t}")
        epoch = 0.0
        for name, (n, source, nshards) in counts.items():
            if n:
                mult = max(1.0, math.sqrt(cfg.balance_t / (n / total)))
                epoch += mult * n
                shard_txt = f"{nshards} shards" if nshards is not None else "shards: -"
                print(f"    {name:32s} {n:>9,d} samples ({source}; {shard_txt}), repeat x{mult:.2f}")
            else:
                print(f"    {name:32s}   unknown samples ({source})")
        gbatch = cfg.batch_per_rank * cfg.num_workers * cfg.grad_accum
        steps = int(epoch * cfg.epochs / gbatch)
        if cfg.max_steps:
            steps = min(steps, cfg.max_steps)
        cfg_model = resolve_config(cfg.preset)
        tokens = steps * gbatch * (cfg_model.num_visual_tokens + TEXT_TOKENS[stage]) if stage != "s1" else 0
        flops = flops_per_sample(cfg.preset, stage, cfg.activation_checkpointing) * steps * gbatch
        print(f"    epoch after balancing {epoch:,.0f} samples x {cfg.epochs} epoch(s) / global batch {gbatch}"
              f" = {steps:,d} optimizer steps; {tokens / 1e9:.2f} B LLM tokens")
        if cfg.use_gpu:
            hours = flops / (cfg.num_workers * A100_PEAK * ASSUMED_MFU) / 3600
            ref = REPORTED_HOURS[stage] * 16 / cfg.num_workers
            print(f"    predicted: {flops:.2e} FLOPs -> {hours:.1f} h on {cfg.num_workers} A100 at MFU {ASSUMED_MFU}"
                  f" (reported: ~{REPORTED_HOURS[stage]:.0f} h on 16 GPUs = ~{ref:.0f} h scaled to "
                  f"{cfg.num_workers})")
        else:
            print(f"    predicted: {flops:.2e} FLOPs (CPU run: measured ~0.02-0.06 s/step for the tiny preset)")
