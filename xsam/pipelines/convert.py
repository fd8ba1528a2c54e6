"""Convert registered datasets into unified WebDataset shards with Ray Data.

    python pipelines/convert.py --registry datasets_registry --validate-only
    python pipelines/convert.py --registry datasets_registry [--datasets a,b] --data-root /data --output s3://bucket/shards

Each shard is one Ray Data task (read images and masks, check them, encode RLE, write the tar
under a temporary name, rename, write its commit record); the driver writes each split's
quarantine.jsonl and, last, its manifest.json. Exit status: 0 when every split converted or was
up to date, 1 when a split failed (the others still convert), 2 for an invalid registry.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Iterable

from xsam import logs
from xsam.data.convert import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_SAMPLES,
    ShardResult,
    ShardSpec,
    SplitOutcome,
    convert,
    write_shard,
)
from xsam.data.readers.base import ConvertSettings
from xsam.data.registry import load_registry


def _run_shard(row: dict) -> dict:
    result = write_shard(pickle.loads(row["spec"]))
    return {"result": result.to_json()}


def ray_executor(specs: list[ShardSpec]) -> Iterable[ShardResult]:
    """Run shard tasks as a Ray Data job: one block (one task) per shard, results streamed back."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    # One operator whose outputs are a few hundred bytes: per-operator resource reservation only
    # holds back the ramp-up (measured on 2 CPUs: the second task started 1.5 s late and every
    # task waited ~0.2 s for a slot), so let the shard tasks take every CPU at once.
    ctx.op_resource_reservation_enabled = False
    ds = ray.data.from_items([{"spec": pickle.dumps(s)} for s in specs], override_num_blocks=len(specs))
    for row in ds.map(_run_shard, num_cpus=1).iter_rows():
        yield ShardResult.from_json(row["result"])


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = logs.ray_init_kwargs(logs.current(), local_cluster=not address)
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, help="registry folder or one YAML file")
    p.add_argument("--datasets", help="comma-separated dataset names (default: every entry)")
    p.add_argument("--data-root", default=os.environ.get("XSAM_DATA_ROOT", "data"),
                   help="where relative source paths start: a folder or s3:// URI (env XSAM_DATA_ROOT)")
    p.add_argument("--output", help="output folder or s3://bucket/prefix")
    p.add_argument("--validate-only", action="store_true", help="check the registry entries and exit")
    p.add_argument("--max-samples-per-shard", type=int, default=DEFAULT_MAX_SAMPLES)
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_BYTES)
    p.add_argument("--max-pixels", type=int, default=ConvertSettings.max_pixels,
                   help="images above this many pixels are quarantined as decompression bombs")
    p.add_argument("--full-decode", action="store_true", help="decode every image to catch inner corruption")
    p.add_argument("--force", action="store_true", help="rebuild even if a split is up to date")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--serial", action="store_true", help="run shard tasks in this process, without Ray")
    logs.add_arguments(p)
    return p


def run(args: argparse.Namespace, report=print) -> tuple[int, list[SplitOutcome]]:
    """Validate or convert; per-split lines and the total go to `report` (the CLI prints them; the workflow
    passes a DEBUG logger and reports the total itself). Failures always go to stderr."""
    entries, problems = load_registry(args.registry)
    for problem in problems:
        print(f"INVALID {problem}", file=sys.stderr)
    if args.validate_only:
        if problems:
            bad = len({p.file for p in problems})
            print(f"{bad} invalid registry file(s), {len(entries)} valid entries", file=sys.stderr)
            return 2, []
        print(f"{len(entries)} valid registry entries")
        return 0, []
    if problems:
        return 2, []
    if not args.output:
        print("--output is required to convert", file=sys.stderr)
        return 2, []
    selected = list(entries.values())
    if args.datasets:
        wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
        unknown = [d for d in wanted if d not in entries]
        if unknown:
            print(f"unknown dataset(s): {', '.join(unknown)}", file=sys.stderr)
            return 2, []
        selected = [entries[d] for d in wanted]
    settings = ConvertSettings(max_pixels=args.max_pixels, full_decode=args.full_decode)
    if args.serial:
        from xsam.data.convert import serial_executor as executor
    else:
        init_ray(args.ray_address, args.num_cpus)
        executor = ray_executor
    outcomes = convert(selected, args.data_root, args.output, executor=executor, settings=settings,
                       max_samples=args.max_samples_per_shard, max_bytes=args.max_shard_bytes, force=args.force,
                       log=report)
    failed = [o for o in outcomes if o.status == "failed"]
    written = sum(o.manifest.num_samples for o in outcomes if o.manifest)
    quarantined = sum(o.manifest.num_quarantined for o in outcomes if o.manifest)
    report(f"[convert] {len(outcomes) - len(failed)} split(s) ready ({written} samples, {quarantined} quarantined), "
          f"{len(failed)} failed; output {args.output}")
    for o in failed:
        print(f"[convert] FAILED {o.dataset}/{o.split}: {o.error}", file=sys.stderr)
    return (1 if failed else 0), outcomes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a standalone conversion keeps Ray Data's progress bars (its progress display); the rest as logs.setup
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    logs.setup(logs.verbosity_of(args))
    code, _ = run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
