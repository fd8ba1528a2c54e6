"""`python -m xsam.model --preset paper --summary`: parameter counts per module, built on the meta
device (no weights loaded, no memory), compared with the published component sizes."""

from __future__ import annotations

import argparse

import torch

from xsam.model.builder import build_model, resolve_config
from xsam.model.stages import Part

# Published sizes of the three pretrained components (model cards / papers)
PUBLISHED = {
    "llm": ("Phi-3-mini-4k-instruct", 3_821_079_552),
    "siglip": ("SigLIP2 so400m/14 vision tower (SoViT-400m)", 428_000_000),
    "sam": ("SAM ViT-L image encoder", 308_000_000),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(preset: str) -> tuple[dict[str, int], int]:
    cfg = resolve_config(preset)
    with torch.device("meta"):
        model = build_model(cfg, frozenset({Part.segmentor, Part.mllm}))
    rows = {name: count(child) for name, child in model.named_children() if count(child)}
    return rows, sum(rows.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    p.add_argument("--summary", action="store_true", help="print parameter counts (meta device)")
    args = p.parse_args(argv)
    rows, total = summary(args.preset)
    print(f"X-SAM preset {args.preset!r}: parameters per module")
    for name, n in rows.items():
        print(f"  {name:18s} {n:>15,d}  ({n / 1e6:9.1f} M)")
    print(f"  {'total':18s} {total:>15,d}  ({total / 1e9:9.3f} B)")
    if args.preset == "paper":
        published = sum(n for _, n in PUBLISHED.values())
        for key, (what, n) in PUBLISHED.items():
            print(f"  published {what}: {n / 1e6:,.0f} M (ours: {rows.get(key, 0) / 1e6:,.1f} M)")
        print(f"  published components together: {published / 1e9:.3f} B; total vs that: "
              f"{100 * (total - published) / published:+.2f}% (the rest: projectors, connector, decoders)")


if __name__ == "__main__":
    main()
