"""The evaluation engine: a benchmark's samples scored in batches, with the same queries, the same
post-processing and the same scoring as the one-query-at-a-time path (`Benchmark.evaluate`).

    engine = Engine(model, tokenizer, image_batch=8, max_sequences=32)
    acc, overlays = engine.score_shards(bench, index, refs)     # shard reads + decode prefetched
    metrics = bench.result(acc)

Per batch of `image_batch` images (one device, the model's):

- ONCE per image: the SAM and SigLIP views (on the device), SAM, SigLIP + projector, the segmentation
  projector and the pixel decoder (`XSAM.encode` -> ImageFeatures);
- per query: its teacher-forced pass(es) (`predict.passes`: the template, label chunks for a long label
  space); the passes of ALL queries of ALL images of the batch go through the LLM and the mask decoder
  together, `max_sequences` at a time, each sequence its own decoder item over its image's cached
  features (expanded along the batch dim: `XSAM.decode_features`);
- GCG: the answers of all images of the batch are generated greedily together with one KV cache
  (`XSAM.generate_features`), parsed, and their phrase passes decoded as above;
- post-processing on the device (`predict.finish`), then scoring on the host (`Benchmark.score`).

The prompt-point draws of visual prompts come from one generator per sample seeded with
`Benchmark.torch_seed`, consumed in query order: the draws of the one-at-a-time path, which seeds the
global generator per sample. On CPU in fp32 the metrics equal the one-at-a-time path's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import torch

from xsam.data.schema import Sample, Task
from xsam.eval.benchmark import GCG_MAX_NEW_TOKENS, Benchmark, Query, overlay_png
from xsam.eval.engine_batch import Pass, encode_images, generate_gcg, model_device, run_passes
from xsam.eval.engine_io import Progress, prefetched, shard_loader
from xsam.model.predict import (
    GCGParse,
    Passes,
    Prediction,
    PredictTask,
    finish,
    finish_gcg,
    gcg_passes,
    passes,
)

Item = tuple[str, Sample, np.ndarray]  # (key, sample, image [H, W, 3] uint8 RGB)


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(islice(it, max(1, size))):
        yield chunk


class Engine:
    """Batched scoring of benchmarks with one model on its device (see the module docstring).

    image_batch: images encoded together; max_sequences: sequences per LLM / decoder batch (and GCG
    prompts per generation batch); threads / prefetch: reader threads and how many samples they read
    ahead; progress_every: seconds between progress lines (None: silent)."""

    def __init__(self, model, tokenizer, *, image_batch: int = 8, max_sequences: int = 32, threads: int = 2,
                 prefetch: int = 32, progress_every: float | None = None, max_new_tokens: int = GCG_MAX_NEW_TOKENS):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.image_batch, self.max_sequences = image_batch, max_sequences
        self.threads, self.prefetch = threads, prefetch
        self.progress_every, self.max_new_tokens = progress_every, max_new_tokens

    # ------------------------------------------------------------------ entry points
    def score_shards(self, bench: Benchmark, index, refs: list, overlays: int = 0, total: int | None = None):
        """Score the samples `refs` of a ShardIndex, reads and image decoding prefetched on threads."""
        items = prefetched(refs, shard_loader(index), self.threads, self.prefetch)
        return self.score(bench, items, overlays, total=len(refs) if total is None else total)

    @torch.no_grad()
    def score(self, bench: Benchmark, items: Iterable[Item], overlays: int = 0, total: int | None = None):
        """Score (key, sample, image) items -> (accumulators, [(key, overlay PNG)] of up to `overlays`)."""
        acc, pngs = bench.new(), []
        progress = Progress(bench.name, total, self.progress_every)
        for group in _batches(items, self.image_batch):
            done = self.predict(bench, [(s, im) for _, s, im in group])
            for (key, sample, image), (queries, preds) in zip(group, done):
                bench.score(sample, queries, preds, acc)
                if len(pngs) < overlays and (png := overlay_png(bench, sample, image, queries, preds)) is not None:
                    pngs.append((key, png))
            progress.update(len(group), sum(len(q) for q, _ in done))
        progress.close()
        return acc, pngs

    # ------------------------------------------------------------------ one batch of images
    @torch.no_grad()
    def predict(self, bench: Benchmark, samples: list[tuple[Sample, np.ndarray]]
                ) -> list[tuple[list[Query], list[Prediction]]]:
        """The queries of each (sample, image) and their predictions, the images encoded once."""
        model, tok = self.model, self.tokenizer
        size = model.cfg.sam.image_size
        feats = encode_images(model, [im for _, im in samples])
        queries = [bench.queries(s) for s, _ in samples]
        texts = iter(())
        if bench.task is Task.gcg:  # generation first, batched over the images of the batch
            texts = iter(generate_gcg(model, tok, feats, [b for b, q in enumerate(queries) for _ in q],
                                      self.max_new_tokens, self.max_sequences))
        dev = model_device(model)
        plans: list[list[tuple[Query, Passes | None, GCGParse | None]]] = []
        flat: list[Pass] = []
        for b, ((sample, image), qs) in enumerate(zip(samples, queries)):
            gen = None
            if any(q.request.prompt_masks is not None for q in qs):
                gen = torch.Generator(device=dev).manual_seed(bench.torch_seed(sample))
            plan = []
            for q in qs:
                parse = None
                if q.request.task is PredictTask.gcg:
                    parse = gcg_passes(image, next(texts))
                    p = parse.passes
                else:
                    p = passes(model.cfg, tok, image, q.request)
                plan.append((q, p, parse))
                flat += [Pass(b, ex, gen) for ex in (p.examples if p is not None else [])]
            plans.append(plan)
        outs = iter(run_passes(model, tok, feats, flat, self.max_sequences))
        done = []
        for (sample, image), plan in zip(samples, plans):
            orig = image.shape[:2]
            preds = []
            for q, p, parse in plan:
                merged = p.merge([next(outs) for _ in p.examples]) if p is not None else (None, None)
                if parse is not None:
                    preds.append(finish_gcg(parse, *merged, orig, size))
                else:
                    preds.append(finish(q.request, *merged, orig, size))
            done.append(([q for q, _, _ in plan], preds))
        return done


def one_at_a_time(bench: Benchmark, model, tokenizer, items: Iterable[tuple[str, Sample, bytes]], overlays: int = 0):
    """The reference path: `Benchmark.evaluate` (one `predict` per query) over (key, sample, image
    bytes) items -> (accumulators, [(key, overlay PNG)])."""
    acc, pngs = bench.new(), []
    for key, sample, image_bytes in items:
        png = bench.evaluate(model, tokenizer, sample, image_bytes, acc)
        if png is not None and len(pngs) < overlays:
            pngs.append((key, png))
    return acc, pngs
