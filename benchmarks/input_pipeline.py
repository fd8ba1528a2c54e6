"""Input pipeline throughput: storage -> batch, per core; views on the CPU vs shipped raw to the device.

    python benchmarks/input_pipeline.py [--images 300] [--data-dir .cache/bench_input] [--passes 2] [--threads 8]

The data set is COCO-panoptic-like (640x480 JPEGs, 9-12 segments each, a 133-category label space;
generated once and cached), converted with `xsam.data.convert.convert` (serial executor) into shards.
One process, torch on one thread unless said otherwise.

1. Shards vs the raw COCO source, same per-sample work up to a model-ready batch of 4 (decode the
   JPEG, one boolean mask per segment, the SigLIP 384 / SAM 1024 views and SAM-frame mask targets on
   the CPU through `image_views` / `mask_targets`):
   (a) ours: ShardIndex (tar-header offsets) + Schedule + Loader; per sample one ranged read of the
       shard (JPEG + JSON record), RLE decode of the stored masks.
   (b) the original X-SAM way: the dataset parses the panoptic JSON at start; per sample it opens the
       JPEG and the panoptic PNG, converts RGB -> id (panopticapi rgb2id) and builds one mask per
       segment with a numpy comparison.
   Timings alternate (a), (b) for `--passes` rounds over the whole set after a warm-up; the best pass
   of each is reported. Files are in the page cache for both: this measures CPU work, not disk.
2. The training loader, loader part only (index read + the real `Formatter` + collate, paper sizes:
   SigLIP 384, SAM 1024, batches of 4), S3 (generic segmentation with negatives, tokenised chat; a
   small BPE tokenizer stands in for Phi-3's) and S1 (large-scale jitter), CPU time per sample
   (process CPU time, so other load on the machine does not count) and bytes per batch:
   - CPU fallback: the views and mask targets built in the loader (`collate` / `S1Batch.prepared`);
   - raw: uint8 images and bool masks at the original size, as the loader ships them for the device
     transform (`collate_raw` / `collate_s1`; `XSAM.prepare` builds the views on the GPU);
   - raw + packbits: the same, masks bit-packed with numpy (the alternative to bool masks).
3. Loader threads: samples/s of the raw S3 loader with 1 and N threads (wall clock) and the ratio: the
   per-sample work releases the GIL mostly when the ratio is near N (on a machine with N free cores).
4. Supply / demand: supply = 8 cores x the per-core rate of the raw path (1 / CPU time per sample;
   8 x per-core, not measured on 8 cores: loader threads share one GIL, see 3, so the 1-core figure
   printed beside it is what a single loader thread alone delivers); demand = samples/s one GPU
   consumes at 40% MFU = peak x 0.40 / training FLOPs per sample. Its last line is
   `S1 supply/demand (8 cores, H100 @40% MFU): X.XXx`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from xsam.data import masks as mask_lib
from xsam.data.convert import convert, serial_executor
from xsam.data.fixtures.coco_panoptic import write_panoptic_split
from xsam.data.images import decode_rgb
from xsam.data.registry import load_registry
from xsam.model.batching import collate, collate_raw
from xsam.model.config import paper
from xsam.model.preprocess import image_views, mask_targets
from xsam.model.tokenizer import build_tiny_tokenizer
from xsam.model.xsam import DecodeMode
from xsam.train.formatting import Formatter, collate_s1
from xsam.train.loader import Loader
from xsam.train.planning import train_flops_per_sample
from xsam.train.sampling import Schedule
from xsam.train.shard_index import ShardIndex

COCO_TRAIN_IMAGES = 118_287
SIGLIP, SAM = 384, 1024
DATASET, SPLIT = "bench_panoptic", "bench"
MiB = 2**20
# Training FLOPs per sample from the planner (paper preset; S3: a COCO-panoptic generic sample, the
# profile's activation checkpointing counted as model FLOPs only) and GPU peaks (dense bf16).
TRAIN_FLOPS = {stage: train_flops_per_sample("paper", stage) for stage in ("s1", "s3")}
GPU_PEAK = {"A100": 312e12, "H100": 989e12}
MFU = 0.40
SUPPLY_CORES = 8
CATEGORIES = ([{"id": k + 1, "name": f"thing {k}", "isthing": 1, "supercategory": "thing"} for k in range(80)]
              + [{"id": 100 + k, "name": f"stuff {k}", "isthing": 0, "supercategory": "stuff"} for k in range(53)])


# ---------------------------------------------------------------------------------------------- data

def make_data(data_dir: Path, images: int) -> Path:
    root = data_dir / "coco_panoptic"
    ann = root / "annotations" / f"panoptic_{SPLIT}.json"
    if ann.exists():
        doc = json.loads(ann.read_text())
        if len(doc["images"]) == images and len(doc["categories"]) == len(CATEGORIES):
            return ann
    shutil.rmtree(data_dir, ignore_errors=True)  # the shards too: they are converted from this
    t0 = time.perf_counter()
    write_panoptic_split(root, SPLIT, np.random.default_rng(0), images, size=(640, 480), segments=(9, 13),
                         categories=CATEGORIES)
    print(f"generated {images} images in {time.perf_counter() - t0:.0f}s under {root}", flush=True)
    return ann


def make_shards(data_dir: Path, images: int, shards: int) -> str:
    registry = data_dir / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    entry = {"name": DATASET, "task": "generic_seg", "format": "coco_panoptic", "root": "coco_panoptic",
             "splits": {SPLIT: {"annotations": f"annotations/panoptic_{SPLIT}.json", "images": f"images/{SPLIT}",
                                "masks": f"annotations/panoptic_{SPLIT}"}},
             "label_space": "bench", "license": "synthetic", "citation": "synthetic"}
    (registry / f"{DATASET}.yaml").write_text(yaml.safe_dump(entry))
    entries, problems = load_registry(registry)
    assert not problems, problems
    out = str(data_dir / "shards")
    t0 = time.perf_counter()
    (outcome,) = convert(list(entries.values()), str(data_dir), out, executor=serial_executor,
                         max_samples=-(-images // shards), log=lambda _: None)
    assert outcome.status in ("converted", "up-to-date") and outcome.manifest.num_samples == images, outcome
    if outcome.status == "converted":
        print(f"converted into {len(outcome.manifest.shards)} shards in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- 1. shards vs raw COCO

def model_ready(image: np.ndarray, masks: np.ndarray, labels: list[int]) -> dict:
    views = image_views(image, SIGLIP, SAM)
    return {"siglip": views.siglip, "sam": views.sam, "masks": mask_targets(masks, SAM),
            "labels": torch.tensor(labels, dtype=torch.long), "orig_size": views.orig_size,
            "scaled_size": views.scaled_size}


def stack(items: list[dict]) -> dict:
    return {"siglip": torch.stack([x["siglip"] for x in items]), "sam": torch.stack([x["sam"] for x in items]),
            "masks": [x["masks"] for x in items], "labels": [x["labels"] for x in items],
            "orig_size": [x["orig_size"] for x in items], "scaled_size": [x["scaled_size"] for x in items]}


def shard_format(sample, image_bytes: bytes, rng) -> list[dict]:
    image = decode_rgb(image_bytes, file=sample.image.file_name)
    h, w = image.shape[:2]
    if sample.segments:
        masks = np.stack([mask_lib.decode(s.mask) for s in sample.segments]).astype(bool)
    else:
        masks = np.zeros((0, h, w), bool)
    return [model_ready(image, masks, [s.category_id for s in sample.segments])]


def run_ours(index: ShardIndex, batch: int, limit: int | None = None) -> tuple[int, float]:
    schedule = Schedule(index.counts(), t=0.1, batch_per_rank=batch, world_size=1, seed=0)
    loader = Loader(index, schedule, 0, shard_format, stack, seed=0, num_epochs=1)
    n, t0 = 0, time.perf_counter()
    for _, _, b in loader:
        n += len(b["sam"])
        if limit is not None and n >= limit:
            break
    return n, time.perf_counter() - t0


def rgb2id(color: np.ndarray) -> np.ndarray:
    """panopticapi.utils.rgb2id, as the original mapper uses it."""
    color = color.astype(np.int32)
    return color[:, :, 0] + 256 * color[:, :, 1] + 256 * 256 * color[:, :, 2]


class RawPanoptic:
    """What the original X-SAM COCO panoptic dataset does: parse the JSON at start, read files per sample."""

    def __init__(self, ann_path: Path):
        t0 = time.perf_counter()
        doc = json.loads(ann_path.read_bytes())
        self.parse_s = time.perf_counter() - t0
        root = ann_path.parent.parent
        files = {img["id"]: img["file_name"] for img in doc["images"]}
        self.items = [(root / "images" / SPLIT / files[a["image_id"]],
                       root / "annotations" / f"panoptic_{SPLIT}" / a["file_name"], a["segments_info"])
                      for a in doc["annotations"]]
        self.startup_s = time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image_path, png_path, segments = self.items[i]
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(png_path) as im:
            ids = rgb2id(np.asarray(im.convert("RGB")))
        h, w = ids.shape
        masks = np.stack([ids == s["id"] for s in segments]) if segments else np.zeros((0, h, w), bool)
        return model_ready(image, masks, [s["category_id"] for s in segments])


def run_raw(ann: Path, batch: int, limit: int | None = None) -> tuple[int, float, RawPanoptic]:
    t0 = time.perf_counter()
    ds = RawPanoptic(ann)  # counted: a worker pays it before its first sample
    order = np.random.default_rng(0).permutation(len(ds))
    n = 0
    for start in range(0, len(order), batch):
        b = stack([ds[int(i)] for i in order[start:start + batch]])
        n += len(b["sam"])
        if limit is not None and n >= limit:
            break
    return n, time.perf_counter() - t0, ds


def json_parse_per_annotation(ann: Path, target: int = 20_000) -> tuple[float, float, int]:
    """Parse a panoptic JSON of `target` annotations (the bench set replicated with fresh ids):
    seconds per annotation, bytes per annotation, and the set's own parse time is printed separately."""
    doc = json.loads(ann.read_bytes())
    reps = -(-target // len(doc["annotations"]))
    images, annotations = [], []
    for r in range(reps):
        for img in doc["images"]:
            images.append({**img, "id": img["id"] + r * 10_000_000})
        for a in doc["annotations"]:
            annotations.append({**a, "image_id": a["image_id"] + r * 10_000_000})
    big = json.dumps({"info": doc.get("info", {}), "licenses": [], "images": images, "annotations": annotations,
                      "categories": doc["categories"]}).encode()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        json.loads(big)
        best = min(best, time.perf_counter() - t0)
    return best / len(annotations), len(big) / len(annotations), len(annotations)


def breakdown(index: ShardIndex, ds: RawPanoptic, n: int = 60) -> dict[str, tuple[float, float]]:
    """ms per sample of each step, (a) and (b), on the first n samples (best of 2 rounds)."""
    refs = index.refs[DATASET][:n]
    by_file = {s.provenance.source_id: s for s in (index.read(r)[0] for r in refs)}
    items = [it for it in ds.items if it[0].stem.lstrip("0") in by_file][:n]

    def best(fn, xs):
        t = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            out = [fn(x) for x in xs]
            t = min(t, (time.perf_counter() - t0) / len(xs) * 1000)
        return t, out

    t_read_a, got = best(index.read, refs)  # ranged read + Sample JSON parse
    t_read_b, files = best(lambda it: (it[0].read_bytes(), it[1].read_bytes(), it[2]), items)
    t_img_a, imgs = best(lambda g: decode_rgb(g[1], file=""), got)
    t_img_b, _ = best(lambda f: np.asarray(Image.open(io.BytesIO(f[0])).convert("RGB")), files)
    t_mask_a, masks = best(lambda g: np.stack([mask_lib.decode(s.mask) for s in g[0].segments]).astype(bool), got)

    def raw_masks(f):
        ids = rgb2id(np.asarray(Image.open(io.BytesIO(f[1])).convert("RGB")))
        return np.stack([ids == s["id"] for s in f[2]])

    t_mask_b, _ = best(raw_masks, files)
    t_views, _ = best(lambda im: image_views(im, SIGLIP, SAM), imgs)
    t_targets, _ = best(lambda m: mask_targets(m, SAM), masks)
    return {"read (+ record parse)": (t_read_a, t_read_b), "JPEG decode": (t_img_a, t_img_b),
            "masks (RLE decode | PNG + rgb2id + ==)": (t_mask_a, t_mask_b),
            "image_views (SigLIP 384 + SAM 1024), CPU": (t_views, t_views),
            "mask_targets (SAM 1024 frame, bool), CPU": (t_targets, t_targets)}


def shards_vs_raw_coco(args, ann: Path, out: str, index: ShardIndex) -> None:
    index_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ShardIndex.build(out, [(DATASET, SPLIT)], threads=1, cache=False)  # the header walk itself
        index_s = min(index_s, time.perf_counter() - t0)

    run_ours(index, args.batch, limit=8)  # warm-up: imports, first-call allocations
    run_raw(ann, args.batch, limit=8)
    ours, raw = [], []
    for _ in range(args.passes):
        n_a, t_a = run_ours(index, args.batch)
        n_b, t_b, ds = run_raw(ann, args.batch)
        ours.append(n_a / t_a)
        raw.append(n_b / t_b)
    a, b = max(ours), max(raw)

    refs = index.refs[DATASET]
    shard_bytes = sum(r.image_size + r.json_size for r in refs) / len(refs)
    raw_bytes = sum(img.stat().st_size + png.stat().st_size for img, png, _ in ds.items) / len(ds)
    segs = sum(len(s) for _, _, s in ds.items) / len(ds)
    per_ann, bytes_per_ann, n_big = json_parse_per_annotation(ann)

    print(f"\n1. shards vs raw COCO: {args.images} images 640x480, {segs:.1f} segments each, batches of {args.batch}, "
          f"SigLIP {SIGLIP} + SAM {SAM} views on the CPU, torch threads = 1")
    print(f"{'':44s}{'samples/s/core':>16s}{'ms/sample':>11s}{'bytes read/sample':>19s}")
    print(f"{'(a) shards: ShardIndex + Schedule + Loader':44s}{a:16.1f}{1000 / a:11.1f}{shard_bytes:19,.0f}")
    print(f"{'(b) raw: JSON + JPEG + panoptic PNG':44s}{b:16.1f}{1000 / b:11.1f}{raw_bytes:19,.0f}")
    print(f"ratio (a) / (b): {a / b:.2f}x   (passes: a {', '.join(f'{x:.1f}' for x in ours)}; "
          f"b {', '.join(f'{x:.1f}' for x in raw)})")
    print("\nper-step breakdown, ms/sample (first 60 samples, same samples for both):")
    print(f"{'':44s}{'(a) shards':>12s}{'(b) raw':>10s}")
    for name, (ta, tb) in breakdown(index, ds).items():
        print(f"{name:44s}{ta:12.2f}{tb:10.2f}")
    print("\nstart-up, paid by a process before its first sample:")
    print(f"  (b) panoptic JSON parse: {ds.parse_s * 1000:.1f} ms for this set ({args.images} annotations); "
          f"{per_ann * 1e6:.1f} us/annotation measured on a {n_big:,}-annotation JSON "
          f"({bytes_per_ann:.0f} B/annotation) -> EXTRAPOLATED to COCO train2017 ({COCO_TRAIN_IMAGES:,} annotations): "
          f"{per_ann * COCO_TRAIN_IMAGES:.1f} s per process that builds the dataset")
    print(f"  (a) shard index build (tar header walk, local, 1 thread): {index_s * 1000:.1f} ms for "
          f"{len(refs)} samples -> EXTRAPOLATED to {COCO_TRAIN_IMAGES:,} samples: "
          f"{index_s / len(refs) * COCO_TRAIN_IMAGES:.1f} s (once per split: later starts read the stored index)")


# ---------------------------------------------------------------------------------------------- 2. the training loader

def batch_bytes(batch) -> int:
    """Bytes of every tensor / array a batch holds (what crosses to the device)."""
    def walk(x) -> int:
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        if isinstance(x, np.ndarray):
            return x.nbytes
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        if hasattr(x, "__dataclass_fields__"):
            return sum(walk(getattr(x, k)) for k in x.__dataclass_fields__)
        return 0
    return walk(batch)


def packbits(batch):
    """Bit-pack every bool mask of a raw batch (numpy, over each mask's memory order: no transposition)."""
    def pack(m: torch.Tensor) -> np.ndarray:
        a = m.numpy()
        if a.ndim == 3 and a.strides[1] == 1:  # column-major planes (RLE decodes): pack them as stored
            a = a.transpose(0, 2, 1)
        return np.packbits(np.ascontiguousarray(a).reshape(len(a), -1), axis=1)
    targets = [{**t, "masks": pack(t["masks"])} for t in batch.targets]
    regions = [pack(m) if m is not None else None for m in getattr(batch, "region_masks", [])]
    return batch.images, targets, regions


def loader_cost(index: ShardIndex, format_fn: Callable, collate_fn: Callable, batch: int,
                threads: int = 1, passes: int = 1) -> tuple[float, float, float]:
    """Over the whole set (best of `passes`): (CPU ms / sample, wall samples/s, mean bytes / batch)."""
    best_cpu, best_rate, sizes = float("inf"), 0.0, []
    for _ in range(passes):
        schedule = Schedule(index.counts(), t=0.1, batch_per_rank=batch, world_size=1, seed=0)
        loader = Loader(index, schedule, 0, format_fn, collate_fn, seed=0, num_epochs=1,
                        prefetch=2 * threads if threads > 1 else 0, threads=threads)
        n, sizes = 0, []
        c0, t0 = time.process_time(), time.perf_counter()
        for _, _, b in loader:
            n += batch
            sizes.append(batch_bytes(b))
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        best_cpu, best_rate = min(best_cpu, cpu / n * 1000), max(best_rate, n / wall)
    return best_cpu, best_rate, float(np.mean(sizes))


def training_loader(args, index: ShardIndex) -> tuple[dict, dict]:
    cfg = paper()
    assert (cfg.siglip.image_size, cfg.sam.image_size) == (SIGLIP, SAM)
    spaces = index.label_spaces()
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tiny_tokenizer(tmp)
    s3, s1 = Formatter("s3", spaces), Formatter("s1", spaces, sam_size=SAM)

    def s3_examples(items):
        return [f.example for f in items]

    variants = {
        "s3": {"CPU fallback (views + targets in the loader)":
               lambda it: collate(s3_examples(it), DecodeMode.per_sample, tok, cfg),
               "raw (uint8 + bool, device transform)":
               lambda it: collate_raw(s3_examples(it), DecodeMode.per_sample, tok, cfg),
               "raw + packbits masks":
               lambda it: packbits(collate_raw(s3_examples(it), DecodeMode.per_sample, tok, cfg))},
        "s1": {"CPU fallback (views + targets in the loader)": lambda it: collate_s1(it).prepared(SAM),
               "raw (uint8 + bool, device transform)": collate_s1,
               "raw + packbits masks": lambda it: packbits(collate_s1(it))},
    }
    formats = {"s3": s3, "s1": s1}
    cost: dict[str, dict[str, tuple[float, float, float]]] = {}
    for stage, fns in variants.items():
        loader_cost(index, formats[stage], next(iter(fns.values())), args.batch)  # warm-up
        cost[stage] = {name: loader_cost(index, formats[stage], fn, args.batch, passes=args.passes)
                       for name, fn in fns.items()}

    print(f"\n2. training loader, loader part only (index read + Formatter + collate), {args.images} samples, "
          f"batches of {args.batch}, SigLIP {SIGLIP} / SAM {SAM}, 1 thread, torch threads = 1")
    print(f"{'':8s}{'':46s}{'CPU ms/sample':>15s}{'MiB/batch':>11s}")
    for stage, rows in cost.items():
        for name, (cpu, _, nbytes) in rows.items():
            print(f"{stage.upper():8s}{name:46s}{cpu:15.1f}{nbytes / MiB:11.1f}")
    for stage, rows in cost.items():
        (fb, _, fb_b), (raw, _, raw_b), (pk, _, pk_b) = rows.values()
        print(f"{stage.upper()}: raw vs CPU fallback: {fb / raw:.2f}x less CPU, {fb_b / raw_b:.1f}x fewer bytes; "
              f"packbits: {pk - raw:+.2f} ms/sample CPU for {raw_b / pk_b:.1f}x fewer bytes than bool")
    return cost, {"s3": s3_examples, "tok": tok, "cfg": cfg, "fmt": s3}


# ---------------------------------------------------------------------------------------------- 3. threads

def thread_scaling(args, index: ShardIndex, ctx: dict) -> None:
    """Wall-clock rate with 1 and N loader threads, and the cores they kept busy (process CPU time / wall):
    threads serialised by the GIL would keep about one core busy whatever N."""
    n = max(1, min(args.threads, os.cpu_count() or 1))

    def fn(it):
        return collate_raw(ctx["s3"](it), DecodeMode.per_sample, ctx["tok"], ctx["cfg"])
    cpu1, one, _ = loader_cost(index, ctx["fmt"], fn, args.batch, threads=1, passes=args.passes)
    cpun, many, _ = loader_cost(index, ctx["fmt"], fn, args.batch, threads=n, passes=args.passes)
    print(f"\n3. loader threads, raw S3 path, wall clock: 1 thread {one:.1f} samples/s ({cpu1 * one / 1000:.2f} cores "
          f"busy), {n} threads {many:.1f} samples/s ({cpun * many / 1000:.2f} cores busy): {many / one:.2f}x "
          f"({os.cpu_count()} CPUs on this machine, shared with whatever else runs)")


# ---------------------------------------------------------------------------------------------- 4. supply / demand

def supply_demand(cost: dict) -> None:
    raw = "raw (uint8 + bool, device transform)"
    print(f"\n4. supply / demand: supply = {SUPPLY_CORES} cores x per-core rate of the raw path "
          f"(1000 / CPU ms per sample; not measured on {SUPPLY_CORES} cores); demand = peak x {MFU:.2f} / "
          "training FLOPs per sample")
    lines = []
    for stage in ("s3", "s1"):
        supply = SUPPLY_CORES * 1000 / cost[stage][raw][0]
        fallback = SUPPLY_CORES * 1000 / cost[stage]["CPU fallback (views + targets in the loader)"][0]
        for gpu, peak in GPU_PEAK.items():
            demand = peak * MFU / TRAIN_FLOPS[stage]
            print(f"  {stage.upper()} {gpu}: demand {demand:6.1f} samples/s ({TRAIN_FLOPS[stage] / 1e12:.1f} TF/sample);"
                  f" supply raw {supply:6.1f} -> {supply / demand:6.2f}x (1 core: {supply / SUPPLY_CORES / demand:5.2f}x);"
                  f" CPU fallback {fallback:6.1f} -> {fallback / demand:5.2f}x")
        lines.append((stage, supply))
    s3_cpu = cost["s3"][raw][0]
    s3_bytes = cost["s3"][raw][2] / MiB
    print(f"targets: S3 loader CPU {s3_cpu:.1f} ms/sample (<= 25); S3 batch of 4 {s3_bytes:.1f} MiB (<= 40); "
          f"S1 H100 supply/demand >= 2.0x")
    s1_supply = dict(lines)["s1"]
    print(f"S1 supply/demand ({SUPPLY_CORES} cores, H100 @40% MFU): "
          f"{s1_supply / (GPU_PEAK['H100'] * MFU / TRAIN_FLOPS['s1']):.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--threads", type=int, default=8, help="loader threads for section 3 (capped at the CPUs)")
    p.add_argument("--data-dir", default=".cache/bench_input")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    data_dir = Path(args.data_dir)
    ann = make_data(data_dir, args.images)
    out = make_shards(data_dir, args.images, args.shards)
    index = ShardIndex.build(out, [(DATASET, SPLIT)], threads=1)
    shards_vs_raw_coco(args, ann, out, index)
    cost, ctx = training_loader(args, index)
    thread_scaling(args, index, ctx)
    supply_demand(cost)


if __name__ == "__main__":
    main()
