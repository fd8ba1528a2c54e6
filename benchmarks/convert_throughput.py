"""Conversion throughput: the Ray Data job on 1 and 2 CPUs vs a bare loop doing the same per-sample
work (read the bytes, decode the JPEG in full, decode the panoptic PNG, encode every segment's RLE),
in one run; and the cost of the default full image decode: the job on 1 CPU with `--quick-decode`
(header checks only) side by side, with the ratio.

    python benchmarks/convert_throughput.py [--images 2000] [--data-dir .cache/bench_panoptic]

The data set is COCO-panoptic-like: 640x480 JPEGs, ~10 segments each (generated once, cached).
Targets: job on 1 CPU >= 0.7x the bare loop; job on 2 CPUs >= 1.6x the job on 1 CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from xsam.data.fixtures.coco_panoptic import write_panoptic_split


def make_data(data_dir: Path, images: int) -> Path:
    root = data_dir / "coco_panoptic"
    ann = root / "annotations" / "panoptic_bench.json"
    if ann.exists() and len(json.loads(ann.read_text())["images"]) == images:
        return ann
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    write_panoptic_split(root, "bench", np.random.default_rng(0), images, size=(640, 480), segments=(9, 13))
    print(f"generated {images} images in {time.perf_counter() - t0:.0f}s under {root}", flush=True)
    return ann


def registry_entry(out: Path) -> Path:
    entry = {"name": "bench_panoptic", "task": "generic_seg", "format": "coco_panoptic", "root": "coco_panoptic",
             "splits": {"bench": {"annotations": "annotations/panoptic_bench.json", "images": "images/bench",
                                  "masks": "annotations/panoptic_bench"}},
             "label_space": "bench", "license": "synthetic", "citation": "synthetic"}
    path = out / "bench_panoptic.yaml"
    path.write_text(yaml.safe_dump(entry))
    return path


def bare_loop(ann_path: Path) -> tuple[int, int]:
    """What the job does per sample, with nothing else: read, decode the PNG, encode the RLEs."""
    doc = json.loads(ann_path.read_text())
    root = ann_path.parent.parent
    files = {img["id"]: img["file_name"] for img in doc["images"]}
    nbytes = 0
    for ann in doc["annotations"]:
        image = (root / "images" / "bench" / files[ann["image_id"]]).read_bytes()
        png = (root / "annotations" / "panoptic_bench" / ann["file_name"]).read_bytes()
        nbytes += len(image) + len(png)
        with Image.open(__import__("io").BytesIO(image)) as im:
            im.load()  # the job decodes every image in full by default
        with Image.open(__import__("io").BytesIO(png)) as im:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        for seg in ann["segments_info"]:
            rle = mask_utils.encode(np.asfortranarray((ids == seg["id"]).astype(np.uint8)))
            mask_utils.area(rle), mask_utils.toBbox(rle)
    return len(doc["annotations"]), nbytes


def run_job(registry: Path, data_root: Path, out: Path, cpus: int, shards: int, images: int,
            quick_decode: bool = False) -> float:
    import ray

    from xsam.data.convert import convert
    from xsam.data.readers.base import ConvertSettings
    from xsam.data.registry import load_registry
    from xsam.pipelines.convert import ray_executor

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        entries, problems = load_registry(registry)
        assert not problems, problems
        shutil.rmtree(out, ignore_errors=True)
        # one-time cluster start-up is not throughput: warm the worker pool and Ray Data's own
        # actors (stats, autoscaling coordinator), which the first Dataset execution creates
        ray.get([ray.remote(lambda: None).remote() for _ in range(cpus)])
        ray.data.range(cpus, override_num_blocks=cpus).map(lambda r: r, num_cpus=1).take_all()
        t0 = time.perf_counter()
        outcomes = convert(list(entries.values()), str(data_root), str(out), executor=ray_executor,
                           settings=ConvertSettings(full_decode=not quick_decode),
                           max_samples=-(-images // shards), force=True, log=lambda _: None)
        elapsed = time.perf_counter() - t0
        (o,) = outcomes
        assert o.status == "converted" and o.manifest.num_samples == images, o
        return elapsed
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shards", type=int, default=8, help="shards to cut the set into (the unit of parallelism)")
    p.add_argument("--data-dir", default=".cache/bench_panoptic")
    args = p.parse_args()
    data_dir = Path(args.data_dir)
    ann = make_data(data_dir, args.images)
    registry = registry_entry(data_dir)

    t0 = time.perf_counter()
    n, nbytes = bare_loop(ann)
    bare = time.perf_counter() - t0
    one = run_job(registry, data_dir, data_dir / "out", 1, args.shards, args.images)
    two = run_job(registry, data_dir, data_dir / "out", 2, args.shards, args.images)
    quick = run_job(registry, data_dir, data_dir / "out", 1, args.shards, args.images, quick_decode=True)

    mb = nbytes / 1e6
    print(f"\n{n} images, {mb:.0f} MB of JPEG + PNG input, {args.shards} shards")
    print(f"{'':28s}{'seconds':>10s}{'samples/s':>12s}{'MB/s':>10s}")
    for name, t in (("bare loop (1 core)", bare), ("convert job, 1 CPU", one), ("convert job, 2 CPUs", two),
                    ("job, 1 CPU, --quick-decode", quick)):
        print(f"{name:28s}{t:10.1f}{n / t:12.1f}{mb / t:10.1f}")
    r1, r2 = bare / one, one / two
    print(f"\njob 1 CPU / bare loop: {r1:.2f}x  (target >= 0.7)")
    print(f"job 2 CPUs / job 1 CPU: {r2:.2f}x  (target >= 1.6)")
    print(f"full decode (default) / --quick-decode, 1 CPU: {one / quick:.2f}x the time (the cost of decoding "
          f"every image)")
    sys.exit(0 if r1 >= 0.7 and r2 >= 1.6 else 1)


if __name__ == "__main__":
    main()
