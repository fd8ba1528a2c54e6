"""Stage checkpoints: what a stage trains, as an export (xsam.model.export: Hugging Face layout,
sharded safetensors + config.json + tokenizer + a manifest of keys and files written last).

The next stage loads one by exact key (`load_stage_checkpoint`): every exported key must exist in
the new model with the same shape (a mismatch is an error unless explicitly allowed); keys of parts
the new stage does not build (S1's segmentor when S2 takes its SAM) are skipped and reported as
ignored; the report lists matched / missing / unexpected / ignored / mismatched keys. Exports are
read from a folder or an s3:// prefix directly, after the completeness checks of `load_export`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from xsam.model.config import XSAMConfig
from xsam.model.export import DEFAULT_SHARD_SIZE, ExportResult, load_export, read_manifest, write_export
from xsam.model.stages import StagePolicy
from xsam.model.weights import LoadReport, load_checked

__all__ = ["export_state", "load_stage_checkpoint", "load_stage_state", "read_manifest", "save_stage_checkpoint"]


def _exported(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def save_stage_checkpoint(model: nn.Module, policy: StagePolicy, cfg: XSAMConfig, location: str | os.PathLike,
                          extra: dict | None = None, tokenizer=None,
                          max_shard_size: int = DEFAULT_SHARD_SIZE) -> ExportResult:
    return export_state(model.state_dict(), policy, cfg, location, extra, tokenizer, max_shard_size)


def export_state(state: dict[str, torch.Tensor], policy: StagePolicy, cfg: XSAMConfig, location: str | os.PathLike,
                 extra: dict | None = None, tokenizer=None, max_shard_size: int = DEFAULT_SHARD_SIZE) -> ExportResult:
    """Export the policy's tensors of a (consolidated) state dict to a folder or s3:// prefix."""
    tensors = {k: v for k, v in state.items() if _exported(k, policy.exports)}
    return write_export(location, tensors, cfg, policy.name, tokenizer=tokenizer, extra=extra,
                        max_shard_size=max_shard_size)


def load_stage_state(model: nn.Module, state: dict[str, torch.Tensor], allow_mismatch: bool = False) -> LoadReport:
    """Load an export's tensors into `model` by exact key, skipping parts the model does not build."""
    built = {name for name, _ in model.named_children()}
    absent = tuple(sorted({k.split(".", 1)[0] for k in state} - built))
    return load_checked(model, state, allow_mismatch=allow_mismatch, ignore_unexpected=absent,
                        strict_missing=False)


def load_stage_checkpoint(model: nn.Module, location: str | os.PathLike, policy: StagePolicy,
                          allow_mismatch: bool = False, verify: bool = True) -> LoadReport:
    """Load an earlier stage's export into `model` (built for `policy`) by exact key. The export must be
    complete (ExportError naming the missing manifest / file / key otherwise)."""
    state, _ = load_export(location, verify=verify)
    return load_stage_state(model, state, allow_mismatch)
