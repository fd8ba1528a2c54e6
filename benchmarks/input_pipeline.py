"""Input pipeline throughput: storage -> model-ready batch, per core, shards vs the raw COCO source.

    python benchmarks/input_pipeline.py [--images 300] [--data-dir .cache/bench_input] [--passes 2]

The data set is COCO-panoptic-like (640x480 JPEGs, 9-12 segments each; generated once and cached),
converted with `xsam.data.convert.convert` (serial executor) into shards. Both paths then do the
same per-sample work up to a model-ready batch of 4: decode the JPEG, get one boolean mask per
segment, build the SigLIP 384 and SAM 1024 views (`image_views`) and the SAM-frame mask targets
(`mask_targets`), stack the views. One process, torch on one thread: samples/s per core.

(a) ours: ShardIndex (tar-header offsets) + Schedule + Loader; per sample one ranged read of the
    shard (JPEG + JSON record), RLE decode of the stored masks.
(b) the original X-SAM way: the dataset parses the panoptic JSON at start; per sample it opens the
    JPEG and the panoptic PNG, converts RGB -> id (panopticapi rgb2id) and builds one mask per
    segment with a numpy comparison.

Start-up costs are printed separately: what a process pays before its first sample - (a) the
shard index build (header walk), (b) the JSON parse - both measured here and extrapolated linearly
to the size of COCO panoptic train2017 (118,287 images). Timings alternate (a), (b) for `--passes`
rounds over the whole set after a warm-up; the best pass of each is reported. Files are in the
page cache for both (generated / converted just before): this measures CPU work, not disk.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
import warnings
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
from xsam.model.preprocess import image_views, mask_targets
from xsam.train.loader import Loader
from xsam.train.sampling import Schedule
from xsam.train.shard_index import ShardIndex

COCO_TRAIN_IMAGES = 118_287
SIGLIP, SAM = 384, 1024
DATASET, SPLIT = "bench_panoptic", "bench"


# ---------------------------------------------------------------------------------------------- data

def make_data(data_dir: Path, images: int) -> Path:
    root = data_dir / "coco_panoptic"
    ann = root / "annotations" / f"panoptic_{SPLIT}.json"
    if ann.exists() and len(json.loads(ann.read_text())["images"]) == images:
        return ann
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    write_panoptic_split(root, SPLIT, np.random.default_rng(0), images, size=(640, 480), segments=(9, 13))
    print(f"generated {images} images in {time.perf_counter() - t0:.0f}s under {root}", flush=True)
    return ann


def make_shards(data_dir: Path, images: int, shards: int) -> str:
    registry = data_dir / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    entry = {"name": DATASET, "task": "generic_seg", "format": "coco_panoptic", "root": "coco_panoptic",
             "splits": {SPLIT: {"annotations": f"annotations/panoptic_{SPLIT}.json", "images": f"images/{SPLIT}",
                                "masks": f"annotations/panoptic_{SPLIT}"}},
             "label_space": "bench", "sampling_group": "generic_seg", "license": "synthetic", "citation": "synthetic"}
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


# ---------------------------------------------------------------------------------------------- shared work

def model_ready(image: np.ndarray, masks: np.ndarray, labels: list[int]) -> dict:
    views = image_views(image, SIGLIP, SAM)
    return {"siglip": views.siglip, "sam": views.sam, "masks": mask_targets(masks, SAM),
            "labels": torch.tensor(labels, dtype=torch.long), "orig_size": views.orig_size,
            "scaled_size": views.scaled_size}


def collate(items: list[dict]) -> dict:
    return {"siglip": torch.stack([x["siglip"] for x in items]), "sam": torch.stack([x["sam"] for x in items]),
            "masks": [x["masks"] for x in items], "labels": [x["labels"] for x in items],
            "orig_size": [x["orig_size"] for x in items], "scaled_size": [x["scaled_size"] for x in items]}


# ---------------------------------------------------------------------------------------------- (a) ours

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
    loader = Loader(index, schedule, 0, shard_format, collate, seed=0, num_epochs=1)
    n, t0 = 0, time.perf_counter()
    for _, _, b in loader:
        n += len(b["sam"])
        if limit is not None and n >= limit:
            break
    return n, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- (b) raw source

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
        b = collate([ds[int(i)] for i in order[start:start + batch]])
        n += len(b["sam"])
        if limit is not None and n >= limit:
            break
    return n, time.perf_counter() - t0, ds


# ---------------------------------------------------------------------------------------------- start-up costs

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
            "image_views (SigLIP 384 + SAM 1024)": (t_views, t_views),
            "mask_targets (SAM 1024 frame)": (t_targets, t_targets)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--data-dir", default=".cache/bench_input")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    data_dir = Path(args.data_dir)
    ann = make_data(data_dir, args.images)
    out = make_shards(data_dir, args.images, args.shards)

    index_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        index = ShardIndex.build(out, [(DATASET, SPLIT)], threads=1)
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

    print(f"\n{args.images} images 640x480, {segs:.1f} segments each, batches of {args.batch}, "
          f"SigLIP {SIGLIP} + SAM {SAM} views, torch threads = 1")
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
          f"{index_s / len(refs) * COCO_TRAIN_IMAGES:.1f} s (once; reusable through ShardIndex.build(cache=...))")


if __name__ == "__main__":
    main()
