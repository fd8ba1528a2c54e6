"""Convert registered datasets into unified WebDataset shards with Ray Data.

    python pipelines/convert.py --registry datasets_registry --validate-only
    python pipelines/convert.py --registry datasets_registry [--datasets a,b] --data-root /data --output s3://bucket/shards
    python pipelines/convert.py --verify --output s3://bucket/shards

Each shard is one Ray Data task (read images and masks, check them, encode RLE, write the tar
under a temporary name, rename, write its commit record); the driver writes each split's
quarantine.jsonl and, last, its manifest.json. A shard task whose worker dies is retried
`SHARD_TASK_RETRIES` times, then its split fails naming the shard's samples; the others finish.
Exit status: 0 when every split converted or was up to date, 1 when a split failed (the others
still convert) or `--verify` found a bad shard, 2 for an invalid registry.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import pickle
import sys
import warnings
from collections.abc import Iterable

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
from xsam.data.verify import verify_tree

SHARD_TASK_RETRIES = 2  # re-runs of a shard task whose worker died (Ray's default for Ray Data is forever)


def _run_shard(row: dict) -> dict:
    result = write_shard(pickle.loads(row["spec"]))
    return {"result": result.to_json()}


def ray_executor(specs: list[ShardSpec]) -> Iterable[ShardResult]:
    """Run shard tasks as a Ray Data job: one block (one task) per shard, results streamed back.

    A task whose worker dies is retried SHARD_TASK_RETRIES times (`max_retries`), then its block is
    dropped (`max_errored_blocks=-1`: the other shards go on) and an error result names its samples."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    # One operator whose outputs are a few hundred bytes: per-operator resource reservation only
    # holds back the ramp-up (measured on 2 CPUs: the second task started 1.5 s late and every
    # task waited ~0.2 s for a slot), so let the shard tasks take every CPU at once.
    ctx.op_resource_reservation_enabled = False
    ctx.max_errored_blocks = -1
    ds = ray.data.from_items([{"spec": pickle.dumps(s)} for s in specs], override_num_blocks=len(specs))
    with warnings.catch_warnings():
        # max_retries has no named parameter in Ray Data yet; the generic remote args are deprecated for one
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        mapped = ds.map(_run_shard, num_cpus=1, max_retries=SHARD_TASK_RETRIES)
    reported = set()
    for row in mapped.iter_rows():
        result = ShardResult.from_json(row["result"])
        reported.add(result.name)
        yield result
    for spec in specs:
        if spec.name not in reported:
            yield ShardResult(name=spec.name, fingerprint=spec.fingerprint, error=(
                f"its Ray task failed {SHARD_TASK_RETRIES + 1} times (the worker died: a crash or out of memory "
                f"outside the per-sample guards; Ray's log has the cause); its {spec.samples()}"))


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
    p.add_argument("--registry", help="registry folder or one YAML file (required unless --verify)")
    p.add_argument("--datasets", help="comma-separated dataset names (default: every entry)")
    p.add_argument("--data-root", default=os.environ.get("XSAM_DATA_ROOT", "data"),
                   help="where relative source paths start: a folder or s3:// URI (env XSAM_DATA_ROOT)")
    p.add_argument("--output", help="output folder or s3://bucket/prefix")
    p.add_argument("--validate-only", action="store_true", help="check the registry entries and exit")
    p.add_argument("--max-samples-per-shard", type=int, default=DEFAULT_MAX_SAMPLES)
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_BYTES)
    p.add_argument("--max-pixels", type=int, default=ConvertSettings.max_pixels,
                   help="images above this many pixels are quarantined as decompression bombs")
    p.add_argument("--quick-decode", action="store_true",
                   help="check images by their headers only instead of decoding each in full (faster, "
                        "misses corruption inside the pixel data)")
    p.add_argument("--allow-shrink", action="store_true",
                   help="accept a split whose good samples fall below half of its previous conversion's")
    p.add_argument("--verify", action="store_true",
                   help="check every shard under --output against its manifest (size, sha256) and exit")
    p.add_argument("--force", action="store_true", help="rebuild even if a split is up to date")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--serial", action="store_true", help="run shard tasks in this process, without Ray")
    logs.add_arguments(p)
    return p


def run(args: argparse.Namespace, report=print) -> tuple[int, list[SplitOutcome]]:
    """Validate or convert; per-split lines and the total go to `report` (the CLI prints them; the workflow
    passes a DEBUG logger and reports the total itself). Failures always go to stderr."""
    if args.verify:
        return _verify(args, report), []
    if not args.registry:
        print("--registry is required", file=sys.stderr)
        return 2, []
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
    settings = ConvertSettings(max_pixels=args.max_pixels, full_decode=not args.quick_decode,
                               allow_shrink=args.allow_shrink)
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


def _verify(args: argparse.Namespace, report) -> int:
    if not args.output:
        print("--verify needs --output (the converted tree to check)", file=sys.stderr)
        return 2
    checked, bad = verify_tree(args.output)
    for problem in bad:
        print(f"[verify] BAD {problem}", file=sys.stderr)
    report(f"[verify] {checked} shard(s) checked, {len(bad)} bad; tree {args.output}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    if not faulthandler.is_enabled():
        try:  # a crash in native code (a decoder, the rasteriser) prints where it happened
            faulthandler.enable()
        except (OSError, ValueError):  # io.UnsupportedOperation: stderr without a file descriptor
            pass
    args = build_parser().parse_args(argv)
    # a standalone conversion keeps Ray Data's progress bars (its progress display); the rest as logs.setup
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    logs.setup(logs.verbosity_of(args))
    with logs.cli_errors("convert", also=(FileNotFoundError,)):  # a missing registry / source folder
        code, _ = run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
