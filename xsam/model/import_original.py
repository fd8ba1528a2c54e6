"""Import a published X-SAM checkpoint (the authors' key names) as an export in this project's layout.

    python -m xsam.model.import_original --checkpoint PATH/pytorch_model.bin --preset tiny|paper \\
        --stage s1|s2|s3 [--config JSON|@file] [--partial] [--tokenizer DIR] --out EXPORT_DIR

The checkpoint is a `torch.save`d state dict (fp32 or bf16; possibly wrapped as {"state_dict": ...} or
{"module": ...}), read with weights_only=True. Its keys are mapped by the table of
xsam.model.original_keys (renames plus three tensor transforms), checked against the project model of
the preset (built on the meta device: no weights allocated) and written with xsam.model.export, so
`load_stage_checkpoint` and `predict.load_for_inference` read it. EXPORT_DIR/import_report.json lists
{"consumed", "dropped", "unconsumed", "filled", "unfilled": [keys], "transforms": {project key: name},
"vocab": the row placement (null without LLM rows)}.

What is wanted per stage (the project keys the import must fill):
    s1  the S1 export (SAM, connector, pixel decoder, transformer decoder) plus the S1 linear head
        (`segmentor.s1_head`, from the original's `segmentor.class_predictor`), so S1 class logits can
        be compared;
    s2  the S2 export (both projectors, embed_tokens, lm_head); the original S2 checkpoint holds the
        projectors only, so it imports with --partial;
    s3  every key except `segmentor.s1_head` (the original S3 model has no linear head).

Refused (exit status 1, the message names the keys; nothing is written): an original key that no rule
maps and that is not dropped on purpose (SAM neck, shared_image_embedding), or that maps outside the
stage; a shape mismatch; a wanted project key the checkpoint does not fill (allowed with --partial:
then only the filled keys are exported); an incomplete q/k/v group.

Vocabulary rows (`embed_tokens`, `lm_head`; --tokenizer required): the original's rows are the base
tokenizer's ids followed by <SEG>, <p>, </p> in that order; each project token takes the row of the
same token (`original_keys.vocab_row_map`). A project token the original lacks (an extra special token
of the project tokenizer) is an error naming it; with --partial its row is the mean of the original's
rows and the report lists it under vocab.missing_tokens. Original rows no project token takes (a
different base tokenizer) are always an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from xsam.data import storage
from xsam.model import original_keys as ok
from xsam.model.builder import build_model
from xsam.model.config import PRESETS, XSAMConfig, with_overrides
from xsam.model.stages import STAGES

REPORT = "import_report.json"
_SHOWN = 20  # keys named per problem in an error message


class ImportCheckError(ValueError):
    """The checkpoint does not fit: the message names the keys."""


@dataclass
class ImportResult:
    state: dict[str, Tensor]
    report: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- reading
def unwrap(obj) -> dict[str, Tensor]:
    """The state dict inside {"state_dict": ...} / {"module": ...} wrappers (any depth)."""
    while isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = [k for k in ("state_dict", "module") if isinstance(obj.get(k), Mapping)]
        if not inner:
            bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
            raise ImportCheckError(f"not a state dict: non-tensor entries {bad[:_SHOWN]} and no 'state_dict' or "
                                   "'module' entry")
        obj = obj[inner[0]]
    if not isinstance(obj, Mapping):
        raise ImportCheckError(f"not a state dict: a {type(obj).__name__}")
    return dict(obj)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """torch.load with weights_only=True (memory-mapped when the file format allows it)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return unwrap(obj)


# --------------------------------------------------------------------------- what a stage wants
def wanted_shapes(cfg: XSAMConfig, stage: str, vocab_size: int | None) -> dict[str, torch.Size]:
    """Project key -> shape of what the import must fill for `stage` (model built on the meta device)."""
    policy = STAGES[stage]
    with torch.device("meta"):
        model = build_model(cfg, policy.parts, vocab_size)
    if stage == "s3":
        prefixes, skip = ("",), ("segmentor.s1_head",)
    else:
        prefixes, skip = policy.exports + (("segmentor.s1_head",) if stage == "s1" else ()), ()

    def under(key: str, ps: tuple[str, ...]) -> bool:
        return any(p == "" or key == p or key.startswith(p + ".") for p in ps)

    return {k: v.shape for k, v in model.state_dict().items() if under(k, prefixes) and not under(k, skip)}


def _named(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:_SHOWN]) + more


# --------------------------------------------------------------------------- the import
def import_state(original: Mapping[str, Tensor], cfg: XSAMConfig, stage: str, tokenizer=None,
                 partial: bool = False) -> ImportResult:
    """Map an original state dict onto the project's keys for `stage`. `tokenizer`: the project's
    (X-SAM tokens added), required when the checkpoint has vocabulary rows. Raises ImportCheckError."""
    original = unwrap(original)
    vocab_size = len(tokenizer) if tokenizer is not None else None
    wanted = wanted_shapes(cfg, stage, vocab_size)
    dropped, unconsumed, outside = [], [], []
    groups: dict[str, dict[int, str]] = {}
    rules: dict[str, ok.Mapped] = {}
    for key in sorted(original):
        if ok.is_dropped(key):
            dropped.append(key)
            continue
        m = ok.to_project(key)
        if m is None:
            unconsumed.append(key)
        elif m.project not in wanted:
            outside.append(f"{key} -> {m.project}")
        else:
            groups.setdefault(m.project, {})[m.part or 0] = key
            rules[m.project] = m
    problems = []
    if unconsumed:
        problems.append(_named("original keys no rule maps", unconsumed))
    if outside:
        problems.append(_named(f"original keys mapping to project keys that stage {stage} does not import (or "
                               "that the project model lacks)", outside))

    state: dict[str, Tensor] = {}
    transforms: dict[str, str] = {}
    mismatched, incomplete = [], []
    vocab_report = None
    for project, parts in sorted(groups.items()):
        m = rules[project]
        if len(parts) != m.parts:
            names, _ = ok.to_original(project)
            incomplete.append(f"{project} lacks {sorted(set(names) - set(parts.values()))}")
            continue
        tensors = [original[parts[i]] for i in range(m.parts)]
        sources = ", ".join(parts[i] for i in range(m.parts))
        name = m.rule.transform
        if name == "concat_qkv":
            shapes = sorted({tuple(t.shape) for t in tensors})
            if len(shapes) != 1 or len(shapes[0]) == 0:
                mismatched.append(f"{project} (from {sources}): parts of shapes {shapes}")
                continue
            value = ok.concat_qkv(tensors)
        elif name == "vocab_rows":
            if tokenizer is None:
                raise ImportCheckError(f"{sources}: vocabulary rows are placed by token; pass --tokenizer")
            if tensors[0].dim() != 2:
                mismatched.append(f"{project} (from {sources}): {tuple(tensors[0].shape)} is not [rows, dim]")
                continue
            vmap = ok.vocab_row_map(tokenizer, tensors[0].shape[0])
            if vmap.unused_rows:
                raise ImportCheckError(_named(f"{sources}: original vocabulary rows no project token takes "
                                              "(a different base tokenizer?)", [str(r) for r in vmap.unused_rows]))
            if vmap.missing_tokens and not partial:
                problems.append(_named(f"{project}: project tokens without an original row (--partial fills "
                                       "them with the mean row)", vmap.missing_tokens))
            value = ok.place_rows(tensors[0], vmap)
            vocab_report = {"original_rows": vmap.original_rows, "project_rows": len(vmap.source),
                            "moved": {str(k): v for k, v in vmap.moved.items()},
                            "missing_tokens": vmap.missing_tokens}
        else:
            value = tensors[0]
        if tuple(value.shape) != tuple(wanted[project]):
            mismatched.append(f"{project} (from {sources}): {tuple(value.shape)} vs {tuple(wanted[project])}")
            continue
        if name == "pixel_shuffle_groups":  # after the shape check: the project's dim 0 is a multiple of 4
            value = ok.pixel_shuffle_groups(value)
        state[project] = value
        if name:
            transforms[project] = name
    if mismatched:
        problems.append(_named("shape mismatches (checkpoint vs project)", mismatched))
    if incomplete:
        problems.append(_named("incomplete q/k/v groups", incomplete))
    unfilled = sorted(set(wanted) - set(groups))  # keys with a checkpoint tensor that failed are named above
    if unfilled and not partial:
        problems.append(_named("project keys the checkpoint does not fill (pass --partial to export only the "
                               "filled ones)", unfilled))
    if problems:
        raise ImportCheckError(f"cannot import the checkpoint as stage {stage}:\n  " + "\n  ".join(problems))
    consumed = sorted(k for parts in groups.values() for k in parts.values())
    report = {"consumed": consumed, "dropped": dropped, "unconsumed": [], "filled": sorted(state),
              "unfilled": unfilled, "transforms": transforms, "vocab": vocab_report}
    return ImportResult(state, report)


def to_original_state(state: Mapping[str, Tensor], tokenizer=None) -> dict[str, Tensor]:
    """The inverse: a project state dict -> the original's key names and tensor layout (same table).
    Vocabulary rows go to the original's order (needs the project `tokenizer`). Dropped keys are not
    produced. Used by the tests to make checkpoints in the original's names."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        found = ok.to_original(key)
        if found is None:
            raise KeyError(f"no rule maps project key {key!r}")
        names, rule = found
        if rule.transform == "concat_qkv":
            out.update(zip(names, ok.split_qkv(value, len(names))))
        elif rule.transform == "pixel_shuffle_groups":
            out[names[0]] = ok.pixel_shuffle_groups(value)
        elif rule.transform == "vocab_rows":
            if tokenizer is None:
                raise ValueError(f"{key}: the vocabulary rows need the project tokenizer")
            out[names[0]] = value[torch.tensor(ok.original_row_order(tokenizer))].clone()
        else:
            out[names[0]] = value
    return out


# --------------------------------------------------------------------------- command line
def load_tokenizer(folder: str | Path):
    """A project tokenizer folder, with the X-SAM tokens added (as build_xsam / load_for_inference do)."""
    from transformers import AutoTokenizer

    from xsam.model.tokenizer import add_special_tokens

    tok = AutoTokenizer.from_pretrained(str(folder))
    add_special_tokens(tok)
    return tok


def parse_config(text: str | None) -> dict:
    """--config: a JSON object, inline or @path."""
    if not text:
        return {}
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise TypeError(f"--config: expected a JSON object, got {type(value).__name__}")
    return value


def run(checkpoint: str | Path, preset: str, stage: str, out: str, config: dict | None = None,
        partial: bool = False, tokenizer: str | Path | None = None) -> dict:
    """Import `checkpoint` and write the export and its import_report.json to `out`; returns the report."""
    from xsam.model.export import write_export

    cfg = with_overrides(PRESETS[preset](), config)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    result = import_state(read_checkpoint(checkpoint), cfg, stage, tok, partial)
    write_export(out, result.state, cfg, STAGES[stage].name, tokenizer=tok,
                 extra={"imported_from": str(checkpoint), "import_partial": partial})
    storage.write_bytes(storage.join(str(out), REPORT), json.dumps(result.report, indent=1).encode())
    return result.report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the original's pytorch_model.bin (a torch.save'd state dict)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--stage", required=True, choices=sorted(STAGES))
    p.add_argument("--config", help="model-config overrides as a JSON object nested as XSAMConfig.to_dict(), "
                                    "inline or @file")
    p.add_argument("--partial", action="store_true", help="allow unfilled project keys; export only the filled ones")
    p.add_argument("--tokenizer", help="the project's tokenizer folder (required for LLM vocabulary rows)")
    p.add_argument("--out", required=True, help="export folder or s3:// prefix")
    args = p.parse_args(argv)
    try:
        report = run(args.checkpoint, args.preset, args.stage, args.out, parse_config(args.config), args.partial,
                     args.tokenizer)
    except (ImportCheckError, ValueError, TypeError, KeyError, FileNotFoundError) as e:
        print(f"import_original: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: len(v) for k, v in report.items() if isinstance(v, (list, dict))} | {"out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
