"""Selection candidates of a training run: every KEPT checkpoint, exported on demand.

A run keeps its last `keep_checkpoints` Ray Train checkpoints under ``<output>/<run name>/checkpoint_*``
(DeepSpeed shards, tag "ds", plus the recipe's ``state.json`` with the optimizer step). The run's own
export is its final weights; every other kept checkpoint becomes a candidate by consolidating its
DeepSpeed shards (DeepSpeed's zero_to_fp32: the fp32 master weights, any ZeRO stage) and writing an
export in the project's layout - the same stage, config and tokenizer as the run's export, the
weights rounded to the dtype the run trained in (what the run's own export does) - with its lineage
(`candidate`: the checkpoint and its step) in the manifest. An export already written for that
checkpoint is reused (the manifest names it), so a rerun exports nothing again.

    for c in candidates(run_dir, export_dir):  # -> [Candidate(step, checkpoint, export)], oldest first
        ...
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from xsam.data import storage

_CANDIDATES = "candidates"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    step: int
    checkpoint: str | None  # None: the run's final export itself
    export: str

    def to_dict(self) -> dict:
        return asdict(self)


def kept_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(optimizer step, folder) of every checkpoint under the run folder, by step."""
    out = []
    for loc in storage.list_files(run_dir, suffix="state.json", recursive=True):
        folder = loc.replace("\\", "/").rsplit("/", 1)[0]
        if folder.rsplit("/", 1)[-1].startswith("checkpoint_"):
            out.append((int(json.loads(storage.read_bytes(loc))["step"]), folder))
    return sorted(out)


def _local(folder: str, tmp: str) -> str:
    """A local copy of a checkpoint folder on object storage (zero_to_fp32 reads local files)."""
    if not storage.is_uri(folder):
        return folder
    for loc in storage.list_files(folder, recursive=True):
        rel = loc[len(folder.rstrip("/")) + 1:]
        dst = Path(tmp, rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(storage.read_bytes(loc))
    return tmp


def export_checkpoint(checkpoint: str, step: int, reference_export: str, out: str) -> str:
    """Consolidate one DeepSpeed checkpoint and export it like `reference_export` (the run's export)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from xsam.model.checkpoint import export_state
    from xsam.model.config import XSAMConfig
    from xsam.model.export import load_tokenizer, read_manifest
    from xsam.model.stages import STAGES

    try:
        if read_manifest(out).get("candidate", {}).get("checkpoint") == checkpoint:
            return out  # already exported from this checkpoint
    except Exception:  # noqa: BLE001 - absent or incomplete: write it
        pass
    ref = read_manifest(reference_export)
    train_config = ref.get("train_config") or {}
    dtype = torch.bfloat16 if train_config.get("bf16") else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        said = io.StringIO()  # zero_to_fp32 print()s 'Processing zero checkpoint ...' etc.: DEBUG lines here
        with contextlib.redirect_stdout(said):
            state = get_fp32_state_dict_from_zero_checkpoint(_local(checkpoint, tmp), tag="ds")
        for text in said.getvalue().splitlines():
            log.debug("zero_to_fp32: %s", text)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    export_state(state, STAGES[ref["stage"]], XSAMConfig.from_dict(ref["config"]), out,
                 extra={"train_config": train_config, "data_fingerprint": ref.get("data_fingerprint"),
                        "candidate": {"checkpoint": checkpoint, "step": step, "run_export": reference_export}},
                 tokenizer=load_tokenizer(reference_export))
    return out


def candidates(run_dir: str, export_dir: str, final_step: int | None = None) -> list[Candidate]:
    """The run's kept checkpoints as exports (oldest first); the checkpoint of the final step is the run's
    own export (not exported twice)."""
    kept = kept_checkpoints(run_dir)
    last = final_step if final_step is not None else (kept[-1][0] if kept else 0)
    out = []
    for step, folder in kept:
        if step == last:
            continue
        target = storage.join(run_dir, _CANDIDATES, f"step-{step:07d}", "export")
        out.append(Candidate(step, folder, export_checkpoint(folder, step, export_dir, target)))
    out.append(Candidate(last, None, export_dir))
    return out
