"""Evaluation throughput: the batched engine (xsam.eval.engine) against one query at a time.

    python benchmarks/eval_throughput.py            # CPU, tiny model, fp32 (~1 min on 2 cores)
    python benchmarks/eval_throughput.py --gpu      # one GPU: paper width in bf16, images/s per benchmark
                                                    # kind and the standard set's wall time on 16 GPUs

CPU: a referring benchmark where every image has ~8 deduplicated sentences (the E2 protocol) and a
panoptic one, hand-made samples (coloured rectangles, their masks; referring sentences with case
duplicates that the protocol folds), the tiny preset with random weights (speed does not depend on the
values). Both paths run in the same process on the same samples: queries/s (referring) and images/s
(both), and whether the metrics are identical. The LAST line is exactly

    referring: engine / one query at a time = X.XXx, results identical: yes|no

GPU (--gpu): the paper preset (SAM ViT-L, SigLIP so400m, Phi-3-mini, the decoder), random weights, bf16
on one device, the engine only; per benchmark kind images/s over a few batches after a warm-up, then
the standard benchmark set's wall time extrapolated to 16 GPUs (one actor per GPU, perfect split).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xsam.data import masks as rle
from xsam.data.schema import (
    RLE,
    GroundedCaption,
    ImageInfo,
    PromptType,
    Provenance,
    ReasoningQuery,
    ReferringExpression,
    Sample,
    Segment,
    Task,
    VisualPrompt,
)
from xsam.eval.benchmark import Benchmark
from xsam.eval.engine import Engine, one_at_a_time
from xsam.eval.engine_io import prefetched
from xsam.train.format_common import decode_image

WORDS = ["the", "red", "box", "on", "left", "right", "small", "big", "near", "top", "bottom", "blue", "one", "thing"]
# The standard benchmark set (images, queries): REFER's split sizes (expressions per split), COCO / ADE20K val,
# ReasonSeg val, GranDf GCG val, COCO-VGD / COCO interactive val (prompts per image: ~4 types; interactive ~29)
STANDARD_SET = {
    "referring": [("refcoco/val", 1500, 10834), ("refcoco/testA", 750, 5657), ("refcoco/testB", 750, 5095),
                  ("refcoco+/val", 1500, 10758), ("refcoco+/testA", 750, 5726), ("refcoco+/testB", 750, 4889),
                  ("refcocog/val", 1300, 4896), ("refcocog/test", 2600, 9602)],
    "panoptic": [("coco_panoptic/val2017", 5000, 5000), ("ade20k_panoptic/val", 2000, 2000)],
    "reasoning": [("reasonseg/val", 200, 344)],
    "gcg": [("gcg/val", 1000, 1000)],
    "vgd": [("coco_vgd/val", 5000, 20000)],
    "interactive": [("coco_interactive/val", 5000, 147000)],
}


TASKS = {"referring": Task.referring_seg, "panoptic": Task.generic_seg, "reasoning": Task.reasoning_seg,
         "gcg": Task.gcg, "vgd": Task.vgd, "interactive": Task.interactive}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _scene(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """An image with n coloured rectangles (later ones occlude) and their masks."""
    image = np.full((h, w, 3), 30, np.uint8)
    masks = []
    for _ in range(n):
        y0, x0 = int(rng.integers(0, h * 2 // 3)), int(rng.integers(0, w * 2 // 3))
        m = np.zeros((h, w), bool)
        m[y0:y0 + int(rng.integers(h // 6, h // 3)), x0:x0 + int(rng.integers(w // 6, w // 3))] = True
        for prev in masks:
            prev &= ~m
        image[m] = rng.integers(60, 255, size=3)
        masks.append(m)
    return image, masks


def _segments(masks: list[np.ndarray], cats: list[int]) -> list[Segment]:
    out = []
    for k, (m, c) in enumerate(zip(masks, cats), start=1):
        enc, area, box = rle.encode_with_stats(m)
        out.append(Segment(id=k, category_id=c, bbox=tuple(box), area=area, mask=RLE(**enc)))
    return out


def make_samples(kind: str, n: int, size: tuple[int, int], categories: list[dict], seed: int = 0
                 ) -> list[tuple[str, Sample, bytes]]:
    """n hand-made (key, Sample, PNG bytes) of one benchmark kind (referring: 3 refs, 8 distinct
    sentences per image, plus case duplicates; reasoning: 2 queries; vgd / interactive: one prompt of
    each type per object)."""
    rng = np.random.default_rng([seed, len(kind)])
    task = TASKS[kind]
    out = []
    for i in range(n):
        image, masks = _scene(rng, *size, n=3 if kind != "panoptic" else 5)
        cats = [categories[int(rng.integers(len(categories)))]["id"] for _ in masks]
        extra: dict = {}
        if kind == "referring":
            sents = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) + f" {k}" for k in range(8)]
            extra["referring"] = [ReferringExpression(ref_id=str(r), sentences=[*sents[r * 3:r * 3 + 3],
                                                                                 sents[r * 3].upper()],
                                                      segment_ids=[r + 1]) for r in range(3)]
        elif kind == "reasoning":
            extra["reasoning"] = [ReasoningQuery(queries=["what is the red one?", "which box is largest?"],
                                                 is_sentence=True, segment_ids=[1])]
        elif kind == "gcg":
            extra["gcg"] = GroundedCaption(caption="a red box and a blue box.", phrases=[])
        elif kind in ("vgd", "interactive"):
            extra["visual_prompts"] = [VisualPrompt(type=t, mask=RLE(**rle.encode(m)), segment_id=k)
                                       for k, m in enumerate(masks, start=1) for t in PromptType]
        sample = Sample(dataset=f"synthetic_{kind}", split="val", task=task,
                        image=ImageInfo(id=str(i), file_name=f"{i}.png", width=size[1], height=size[0], format="png"),
                        segments=_segments(masks, cats), provenance=Provenance(
                            source_file="synthetic", source_id=str(i), reader="synthetic", reader_version=1), **extra)
        out.append((f"{kind}{i:05d}", sample, _png(image)))
    return out


def _decode(item):
    key, sample, data = item
    return key, sample, decode_image(data, sample)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def cpu_run(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
    from model_fixtures import tiny_model, tiny_tokenizer

    from xsam.data.fixtures.common import COCO_LIKE_CATEGORIES

    torch.set_num_threads(args.threads)
    tok = tiny_tokenizer(tempfile.mkdtemp())
    _, model = tiny_model(tok, "s3", seed=0)
    model.eval()
    engine = Engine(model, tok, image_batch=args.image_batch, max_sequences=args.max_sequences, threads=2)
    size = (args.height, args.width)
    print(f"tiny model, fp32, CPU ({torch.get_num_threads()} torch threads), images {size[1]}x{size[0]}, "
          f"image batch {args.image_batch}, {args.max_sequences} sequences per batch")
    ratio, identical = {}, {}
    for kind, n in (("panoptic", args.images), ("referring", args.images)):
        bench = Benchmark(f"synthetic_{kind}", "val", TASKS[kind], COCO_LIKE_CATEGORIES)
        items = make_samples(kind, n, size, COCO_LIKE_CATEGORIES)
        warm = make_samples(kind, args.image_batch, size, COCO_LIKE_CATEGORIES, seed=1)
        one_at_a_time(bench, model, tok, warm)  # warm-up (kernels, allocator, lazy imports) for both paths
        engine.score(bench, prefetched(warm, _decode))
        (ref, _), t_ref = _timed(lambda b=bench, it=items: one_at_a_time(b, model, tok, it))
        (acc, _), t_eng = _timed(lambda b=bench, it=items: engine.score(b, prefetched(it, _decode, 2)))
        r_ref, r_eng = bench.result(ref), bench.result(acc)
        q = int(r_ref["n_queries"])
        identical[kind] = _same(r_ref, r_eng)
        ratio[kind] = t_ref / t_eng
        print(f"{kind}: {n} images, {q} queries; one query at a time {n / t_ref:.2f} images/s, {q / t_ref:.2f} "
              f"queries/s; engine {n / t_eng:.2f} images/s, {q / t_eng:.2f} queries/s; "
              f"{ratio[kind]:.2f}x; metrics identical: {'yes' if identical[kind] else 'no'}")
    print(f"referring: engine / one query at a time = {ratio['referring']:.2f}x, "
          f"results identical: {'yes' if identical['referring'] else 'no'}")


def gpu_run(args) -> None:
    from xsam.model.builder import build_model
    from xsam.model.config import PRESETS
    from xsam.model.stages import S3
    from xsam.model.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    tok = build_tiny_tokenizer(tempfile.mkdtemp())  # its ids fit the paper vocabulary; prompt lengths differ a little
    cfg = PRESETS[args.preset]()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:  # parameters made on the device: no multi-GB random init on the host
        model = build_model(cfg, S3.parts, cfg.llm.vocab_size)
    model.special_ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    model.siglip_pad_square = True
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.preset} preset, bf16, {name}, built in {time.perf_counter() - t0:.0f} s", flush=True)
    coco = [{"id": i + 1, "name": f"object class {i}", "isthing": int(i < 80)} for i in range(133)]
    size = (480, 640)
    engine = Engine(model, tok, image_batch=args.image_batch, max_sequences=args.max_sequences, threads=4,
                    max_new_tokens=args.gcg_tokens)
    rates = {}
    for kind in ("referring", "panoptic", "reasoning", "vgd", "interactive", "gcg"):
        n = args.gpu_images if kind != "gcg" else max(1, args.gpu_images // 2)
        items = make_samples(kind, n + args.image_batch, size, coco)
        bench = Benchmark(f"synthetic_{kind}", "val", TASKS[kind], coco if kind != "gcg" else None)
        engine.score(bench, prefetched(items[:args.image_batch], _decode))  # warm-up
        (acc, _), sec = _timed(lambda b=bench, it=items[args.image_batch:]: engine.score(b, prefetched(it, _decode, 4)))
        q = acc["counts"].queries
        rates[kind] = (n / sec, q / sec)
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"{kind}: {n / sec:.2f} images/s, {q / sec:.2f} queries/s ({n} images, {q} queries{peak})", flush=True)
    total = 0.0
    print("standard set: images, queries (REFER expressions, prompts) -> hours on one device at the measured rate "
          "(queries/s; panoptic: images/s, ADE20K at COCO's rate):")
    for kind, splits in STANDARD_SET.items():
        for split, images, queries in splits:
            sec = images / rates[kind][0] if kind == "panoptic" else queries / rates[kind][1]
            total += sec
            print(f"  {split}: {images} images, {queries} queries: {sec / 3600:.3f} h")
    print(f"standard set on 16 GPUs: {total / 16 / 3600:.2f} h wall ({total / 3600:.2f} device-hours; target <= 1 h)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="paper width, bf16, one CUDA device")
    p.add_argument("--images", type=int, default=32, help="CPU: images per benchmark kind")
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--threads", type=int, default=2, help="CPU: torch threads")
    p.add_argument("--image-batch", type=int, default=8)
    p.add_argument("--max-sequences", type=int, default=64)
    p.add_argument("--gpu-images", type=int, default=32, help="--gpu: images timed per kind")
    p.add_argument("--gcg-tokens", type=int, default=128, help="--gpu: GCG max new tokens (random weights "
                   "rarely stop early: the worst case)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # --gpu's code path elsewhere (a check)
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu_run(args) if args.gpu else cpu_run(args)


if __name__ == "__main__":
    main()
