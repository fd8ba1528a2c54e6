"""`full_run.py --dry-run`: the plan - steps, resources, samples per dataset, tokens and optimizer
steps per stage - with FLOPs per sample, per-GPU memory and a predicted wall time per stage.

FLOPs (xsam.train.planning, xsam.model.flops): per part of the model, attention included (LLM causal
over the real sequence, SAM windowed + global blocks, SigLIP up to its selected layer), the segmentor
counted by torch's FLOP counter on the meta device; backward 2F for trained parts, 1F for frozen parts
gradients flow through, 0 for frozen parts with no graph (S2's encoders), checkpoint recompute shown
apart ("executed"). S2 / S3 text per source: measured through the real formatter and tokenizer on the
converted shards when they and the tokenizer are reachable, otherwise a stated assumption.
Memory (xsam.train.memory): ZeRO-partitioned model states + activations measured per part on the meta
device, with and without activation checkpointing, against 40 and 80 GiB GPUs.
Mixture (xsam.train.mixture, the Schedule's own figures): per source samples, records after the
recipe's expansion (xsam.data.expansion: referring images give one record per sentence combination),
the balancing repeat factor r_d, draws per epoch and their share; records from the manifests, else
the public estimates below.
Time = model FLOPs / (GPUs x peak x MFU). Peak (A100 bf16 dense 312 TFLOP/s) and MFU per stage are
stated assumptions, printed beside the MFU that X-SAM's reported hours imply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from xsam.data.shards import split_manifest
from xsam.model.builder import resolve_config
from xsam.train.memory import OVERHEAD, GiB, StateBytes, state_bytes
from xsam.train.mixture import SourceMix, mixture
from xsam.train.planning import (
    activation_bytes,
    implied_mfu,
    sample_flops,
    stage_model,
)
from xsam.train.text_stats import TextStats, assumed_text, measure_text

A100_PEAK = 312e12
# assumed model-FLOPs utilisation: S2 is dense LLM GEMMs at batch 16; S1 is SAM + the deformable pixel
# decoder (grid_sample, small GEMMs); S3 mixes both and recomputes under checkpointing
ASSUMED_MFU = {"s1": 0.35, "s2": 0.40, "s3": 0.35}
REPORTED_HOURS = {"s1": 24.0, "s2": 5.0, "s3": 24.0}  # reference section 2, on 16 GPUs
REPORTED_GPUS = 16
# ../shared/design/gpu-scale.md, per GPU, ZeRO-2, 16 GPUs, the profile's batch and checkpointing
DESIGN_NOTE_MEMORY = {"s1": "~38-42 GB", "s2": "~37-43 GB", "s3": "~30-45 GB"}
GPU_GIB = (40, 80)
TIGHT = 0.9  # a total above 90% of a GPU's memory is called "tight", not "fits"
TEXT_SAMPLES = 200  # samples per source for the measured text lengths

# public per-image sizes of the paper's training splits, used until the manifests exist (approximate)
PUBLIC_SAMPLES = {
    "coco_panoptic/train2017": 118_287, "llava_pretrain_558k/train": 558_128, "llava_v1_5_mix665k/train": 624_610,
    "refcoco/train": 16_994, "refcoco_plus/train": 16_992, "refcocog/train": 21_899, "reasonseg/train": 239,
    "grandf/train": 1_000, "psg_gcg/train": 31_000, "refcocog_gcg/train": 24_000, "flickr30k_gcg/train": 148_900,
    "coco_vgd/train2017": 117_266,
}

# Training records of the referring sets until their manifests count them (xsam.data.expansion: per image
# min(prod, sum) of its objects' deduplicated sentence counts), estimated from REFER's train-split
# statistics (RefCOCO unc: 120,624 sentences / 42,404 refs / 16,994 images; RefCOCO+ unc: 120,191 / 42,278 /
# 16,992; RefCOCOg umd: 80,512 / 42,226 / 21,899) as sentences x REFER_RECORDS_PER_SENTENCE.
# An image gives exactly its sentence count unless (a) an object repeats a sentence (REFER's `sent` is
# already lowercased and tokenised, so only verbatim repeats go) or (b) single-sentence objects make the
# product smaller than the sum (sizes (1, 2): 2 records for 3 sentences). Neither is published; assumed,
# not measured: 5% together, the same for the three sets. The reasoning: RefCOCOg has 1.91 sentences per
# object and 1.93 objects per image, so ~9% of its objects would have one sentence (if 1 or 2 each), ~17%
# of its images hold one and lose ~1 record each: ~4.5%; RefCOCO/+ (2.84 per object, 2.5 objects per
# image) lose little to (b) but more to (a) (3.5-word expressions such as "left" repeat). Sensitivity:
# each 5% fewer records moves the RefCOCO/+/g share of the paper's S3 by about half a point.
REFER_TRAIN_SENTENCES = {"refcoco/train": 120_624, "refcoco_plus/train": 120_191, "refcocog/train": 80_512}
REFER_RECORDS_PER_SENTENCE = 0.95
PUBLIC_RECORDS = {name: round(n * REFER_RECORDS_PER_SENTENCE) for name, n in REFER_TRAIN_SENTENCES.items()}
# every other public set: one record per image (xsam.data.expansion)

REFERRING = ("refcoco", "refcoco_plus", "refcocog")  # the datasets of the summed referring share
ORIGINAL_REFERRING_SHARE = 23.7  # percent of the original X-SAM's S3 draws that come from RefCOCO/+/g


class Source(NamedTuple):
    samples: int | None
    basis: str  # where the samples come from
    shards: int | None
    records: int | None  # training records after expansion
    records_basis: str


def sources(shards: str, datasets: list[str]) -> dict[str, Source]:
    """dataset/split -> its samples and records, and where they come from: the converted manifest, else the
    public sizes (PUBLIC_SAMPLES, PUBLIC_RECORDS)."""
    out = {}
    for name in datasets:
        d, s = name.split("/", 1)
        try:
            m = split_manifest(shards, d, s)
        except Exception:  # noqa: BLE001 - an unreachable store is "not converted yet" for a plan
            m = None
        if m is None:
            n = PUBLIC_SAMPLES.get(name)
            records = (PUBLIC_RECORDS[name], "public estimate") if name in PUBLIC_RECORDS else (n, "1 per image")
            out[name] = Source(n, "public size (not converted yet)", None, *records)
        elif m.num_records is None:
            out[name] = Source(m.num_samples, "manifest", len(m.shards), m.num_samples,
                               "not in the manifest (converted before they were counted): = samples")
        else:
            out[name] = Source(m.num_samples, "manifest", len(m.shards), m.num_records, "manifest")
    return out


def stage_mixture(srcs: dict[str, Source], t: float) -> dict[str, SourceMix]:
    """The balanced mixture of the sources whose samples are known."""
    return mixture({k: v.samples for k, v in srcs.items() if v.samples},
                   {k: v.records for k, v in srcs.items() if v.samples and v.records is not None}, t)


def referring_share(mix: dict[str, SourceMix]) -> float | None:
    """Percent of the draws that come from RefCOCO/+/g; None when the stage has none of them."""
    shares = [m.share for name, m in mix.items() if name.split("/", 1)[0] in REFERRING]
    return sum(shares) if shares else None


def print_mixture(srcs: dict[str, Source], mix: dict[str, SourceMix]) -> None:
    """One line per source (dataset name first, its share of the draws last), then the referring total."""
    for name, src in srcs.items():
        if name not in mix:
            print(f"    {name:28s}   unknown samples ({src.basis})")
            continue
        m = mix[name]
        shards = f"; {src.shards} shards" if src.shards is not None else ""
        where = f"{src.basis}{shards}; records: {src.records_basis}"
        print(f"    {name:28s} {m.samples:>9,d} samples {m.records:>9,d} records (x{m.expansion:.2f}) repeat "
              f"x{m.repeat:.2f} {m.draws:>11,.0f} draws  [{where}]  share {m.share:.1f}%")
    refer = referring_share(mix)
    if refer is not None:
        print(f"    referring RefCOCO/+/g ({', '.join(REFERRING)}): {refer:.1f}% of the draws per epoch "
              f"(the original X-SAM: {ORIGINAL_REFERRING_SHARE}%)")
    if any(s.records_basis == "public estimate" for s in srcs.values()):
        print(f"    records 'public estimate': REFER train sentences x {REFER_RECORDS_PER_SENTENCE} "
              f"(PUBLIC_RECORDS in pipelines/plan.py)")


def load_tokenizer(weights: dict[str, str]):
    """-> (the stage tokenizer with X-SAM's special tokens, None) or (None, why not)."""
    folder = weights.get("tokenizer") or weights.get("llm")
    if not folder or not Path(folder).is_dir():
        return None, f"no tokenizer folder at {folder}"
    from transformers import AutoTokenizer

    from xsam.model.tokenizer import add_special_tokens

    tokenizer = AutoTokenizer.from_pretrained(folder)
    add_special_tokens(tokenizer)
    return tokenizer, None


def stage_text(stage: str, cfg, shards: str, counts: dict, tokenizer, why_not: str | None,
               n: int = TEXT_SAMPLES) -> dict[str, TextStats]:
    """Per dataset/split of an S2 / S3 stage: measured TextStats, or the assumption (with the reason)."""
    out = {}
    for name, entry in counts.items():  # a Source, or any (samples, basis, ...) tuple
        dataset, split = name.split("/", 1)
        reason = why_not if entry[1] == "manifest" else "not converted"
        if reason is None:
            try:
                out[name] = measure_text(shards, dataset, split, stage, tokenizer, resolve_config(cfg.preset), n)
                continue
            except Exception as e:  # noqa: BLE001 - a plan reports what it could not measure and goes on
                reason = f"measuring failed: {e}"
        a = assumed_text(dataset, stage)
        out[name] = TextStats(a.examples, a.lengths, a.labelled, a.items, a.conditions, f"{a.basis} ({reason})")
    return out




def print_flops(stage: str, cfg, text: dict[str, TextStats] | None, epoch: dict[str, float]) -> tuple[float, float]:
    """Print FLOPs per sample (per part for the first source, then per source) -> (model, executed) FLOPs of
    one balanced epoch."""
    ckpt = cfg.activation_checkpointing
    per_source = {name: sample_flops(cfg.preset, stage, ckpt, text[name] if text else None)
                  for name in epoch}
    shown = max(per_source, key=lambda n: (len(per_source[n].parts), per_source[n].model))  # the most parts run
    scale, unit = (1e12, "TFLOP") if per_source[shown].model >= 1e11 else (1e9, "GFLOP")

    def _tf(x: float) -> str:
        return f"{x / scale:.2f}"

    print(f"    FLOPs per sample ({unit}; backward 2F trained / 1F frozen with gradients through / 0 no graph;"
          f" recompute: activation checkpointing {'on' if ckpt else 'off'})")
    print(f"      {'part':16s} {'forward':>8s} {'backward':>8s} {'recompute':>9s}"
          + (f"   [{shown}]" if len(per_source) > 1 else ""))
    for part, c in per_source[shown].parts.items():
        print(f"      {part:16s} {_tf(c.forward):>8s} {_tf(c.backward):>8s} {_tf(c.recompute):>9s}")
    if text:
        print(f"      {'source':32s} {'model':>6s} {'exec':>6s} {'ex/s':>5s} {'text':>6s} {'lab':>5s} "
              f"{'items':>5s}  basis")
        for name, f in per_source.items():
            t = text[name]
            print(f"      {name:32s} {_tf(f.model):>6s} {_tf(f.executed):>6s} {t.examples:5.2f} {t.text_tokens:6.0f}"
                  f" {t.labelled:5.0f} {t.items:5.2f}  {t.basis}")
    total = sum(epoch.values())
    model = sum(epoch[n] * per_source[n].model for n in epoch)
    executed = sum(epoch[n] * per_source[n].executed for n in epoch)
    print(f"      mean per sample after balancing: model {_tf(model / total)} {unit}, executed {_tf(executed / total)}")
    return model, executed


@dataclass(frozen=True)
class MemoryRow:
    checkpointing: bool
    label: str
    activations: float  # bytes of one micro-batch
    total: float  # GiB per GPU: model states + OVERHEAD + activations
    source: str  # the dataset/split it is for ("" for a single-source stage)

    def fit(self, capacity: int) -> str:
        """Within TIGHT of the capacity is "tight": what the estimate leaves out (loss buffers, transient
        forward tensors, fragmentation beyond OVERHEAD) decides."""
        return "fits" if self.total <= TIGHT * capacity else "tight on" if self.total <= capacity else "does not fit"


def memory_table(stage: str, cfg, text: dict[str, TextStats] | None
                 ) -> tuple[StateBytes, list[MemoryRow]]:
    """Model states per GPU, and per checkpointing setting the micro-batch of the source with the most
    activations (+ the same at the LLM's 4096-token limit for S2 / S3)."""
    sm = stage_model(cfg.preset, stage)
    overlap = getattr(cfg, "ds_overlap_comm", None)
    states = state_bytes(sm.trainable_params, sm.frozen_params, cfg.zero_stage, cfg.num_workers,
                         reduce_bucket=int(getattr(cfg, "ds_reduce_bucket_size", 500_000_000)),
                         overlap_comm=cfg.zero_stage == 3 if overlap is None else bool(overlap))
    sources = text or {"": None}
    long_tokens = resolve_config(cfg.preset).llm.max_position_embeddings
    rows = []
    for ckpt in (True, False):
        acts = {n: activation_bytes(cfg.preset, stage, t, cfg.batch_per_rank, ckpt) for n, t in sources.items()}
        worst = max(acts, key=acts.get)
        found = [("largest source" if text else "per micro-batch", acts[worst])]
        if text:
            found.append((f"{long_tokens}-token sequences", activation_bytes(
                cfg.preset, stage, sources[worst], cfg.batch_per_rank, ckpt, tokens=long_tokens)))
        rows += [MemoryRow(ckpt, label, act, (states.total + OVERHEAD + act) / GiB, worst) for label, act in found]
    return states, rows


def print_memory(stage: str, cfg, text: dict[str, TextStats] | None) -> None:
    sm = stage_model(cfg.preset, stage)
    states, rows = memory_table(stage, cfg, text)
    print(f"    memory per GPU (ZeRO-{cfg.zero_stage}, {cfg.num_workers} GPUs, batch {cfg.batch_per_rank}/GPU, bf16; "
          f"{sm.trainable_params / 1e9:.3f} B trainable of {(sm.trainable_params + sm.frozen_params) / 1e9:.3f} B):")
    print(f"      weights {states.weights / GiB:.2f} + gradients {states.gradients / GiB:.2f} + optimizer "
          f"{states.optimizer / GiB:.2f} + buckets {states.buckets / GiB:.2f} + overhead {OVERHEAD / GiB:.0f} "
          f"(assumed) = {(states.total + OVERHEAD) / GiB:.1f} GiB before activations")
    for ckpt in (True, False):
        used = " (the profile's setting)" if ckpt == bool(cfg.activation_checkpointing) else ""
        print(f"      checkpointing {'on' if ckpt else 'off'}{used}:")
        for r in (r for r in rows if r.checkpointing == ckpt):
            fit = ", ".join(f"{r.fit(g)} {g} GiB" for g in GPU_GIB)
            print(f"        {r.label:22s} activations {r.activations / GiB:6.1f} GiB -> {r.total:6.1f} GiB: {fit}"
                  + (f"  [{r.source}]" if r.source else ""))
    print(f"      design note (gpu-scale.md): {DESIGN_NOTE_MEMORY.get(stage, '-')} per GPU")


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
        counts = sources(shards, cfg.datasets)
        mix = stage_mixture(counts, cfg.balance_t)
        epoch = {k: m.draws for k, m in mix.items()}  # draws (records) per epoch
        print(f"\n[plan] {stage}: {len(cfg.datasets)} dataset(s), balancing t = {cfg.balance_t}: repeat "
              f"r_d = max(1, sqrt(t / f_d)), f_d the share of the records; draws = r_d x records")
        print_mixture(counts, mix)
        gbatch = cfg.batch_per_rank * cfg.num_workers * cfg.grad_accum
        per_epoch = sum(epoch.values())
        steps = int(per_epoch * cfg.epochs / gbatch)
        if cfg.max_steps:
            steps = min(steps, cfg.max_steps)
        scale = steps * gbatch / per_epoch if per_epoch else 0.0  # epochs actually run
        text = None
        if stage != "s1":
            tokenizer, why_not = load_tokenizer(cfg.weights)
            text = stage_text(stage, cfg, shards, {k: counts[k] for k in epoch}, tokenizer, why_not)
        visual = resolve_config(cfg.preset).num_visual_tokens
        tokens = scale * sum(epoch[k] * text[k].examples * (visual + text[k].text_tokens) for k in epoch) if text else 0
        print(f"    epoch after balancing {per_epoch:,.0f} draws x {cfg.epochs} epoch(s) / global batch {gbatch}"
              f" = {steps:,d} optimizer steps; {tokens / 1e9:.2f} B LLM tokens")
        if not epoch:
            continue
        model, executed = (x * scale for x in print_flops(stage, cfg, text, epoch))
        if not cfg.use_gpu:
            print(f"    predicted: {model:.2e} FLOPs (CPU run: measured ~0.02-0.06 s/step for the tiny preset)")
            continue
        print_memory(stage, cfg, text)
        mfu = ASSUMED_MFU[stage]
        hours = model / (cfg.num_workers * A100_PEAK * mfu) / 3600
        reported = implied_mfu(model, REPORTED_HOURS[stage], REPORTED_GPUS, A100_PEAK)
        print(f"    predicted: {model:.2e} model FLOPs ({executed:.2e} executed) -> {hours:.1f} h on {cfg.num_workers}"
              f" A100 at MFU {mfu:.2f} (assumed); X-SAM's reported ~{REPORTED_HOURS[stage]:.0f} h on "
              f"{REPORTED_GPUS} GPUs implies MFU {reported:.3f} for these FLOPs ({cfg.epochs} epoch(s))")
