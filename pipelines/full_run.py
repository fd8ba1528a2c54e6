"""The workflow entry point: `python pipelines/full_run.py` (or `ray job submit -- python pipelines/full_run.py`).

With no arguments it runs the embedded default on one machine: generate the fixture datasets (every
source format, small) if missing, then convert them with Ray Data into unified WebDataset shards
under .cache/xsam/shards. Training, evaluation and model selection join this workflow as they land.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.convert import build_parser as convert_parser
from pipelines.convert import run as run_convert


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=".cache/xsam", help="where fixtures and outputs go (embedded default)")
    p.add_argument("--registry", help="registry folder (default: the generated fixture registry)")
    p.add_argument("--data-root", help="data root of --registry")
    p.add_argument("--output", help="shard output (default: <workdir>/shards)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    if args.registry is None:
        from xsam.data.fixtures import generate

        fixtures = work / "fixtures"
        if not (fixtures / "registry").is_dir():
            made = generate(fixtures)
            print(f"[full_run] generated {len(made)} fixture datasets under {fixtures}")
        registry, data_root = str(fixtures / "registry"), str(fixtures / "data")
    else:
        registry, data_root = args.registry, args.data_root or "data"
    output = args.output or str(work / "shards")
    convert_argv = ["--registry", registry, "--data-root", data_root, "--output", output]
    if args.num_cpus:
        convert_argv += ["--num-cpus", str(args.num_cpus)]
    code, outcomes = run_convert(convert_parser().parse_args(convert_argv))
    print(f"[full_run] convert: {len(outcomes)} dataset split(s) -> {output} in {time.perf_counter() - t0:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
