"""Stage checkpoints: what a stage trains, as safetensors, plus a manifest of keys.

    <folder>/model.safetensors   the exported tensors (stage policy's `exports` prefixes)
    <folder>/manifest.json       {"stage", "config", "keys": {name: [shape...]}}

The next stage loads one by exact key (`load_stage_checkpoint`): every exported key must exist in
the new model with the same shape (a mismatch is an error unless explicitly allowed); keys of parts
the new stage does not build (S1's segmentor when S2 takes its SAM) are skipped and reported as
ignored; the report lists matched / missing / unexpected / ignored / mismatched keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from xsam.model.config import XSAMConfig
from xsam.model.stages import StagePolicy
from xsam.model.weights import LoadReport, load_checked


def _exported(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def save_stage_checkpoint(model: nn.Module, policy: StagePolicy, cfg: XSAMConfig, folder: str | Path,
                          extra: dict | None = None) -> Path:
    return export_state(model.state_dict(), policy, cfg, folder, extra)


def export_state(state: dict, policy: StagePolicy, cfg: XSAMConfig, folder: str | Path,
                 extra: dict | None = None) -> Path:
    """Write the policy's exported tensors of a (consolidated) state dict + the key manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if _exported(k, policy.exports)}
    save_file(tensors, str(folder / "model.safetensors"))
    manifest = {"stage": policy.name, "config": cfg.to_dict(),
                "keys": {k: list(v.shape) for k, v in sorted(tensors.items())}, **(extra or {})}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return folder


def read_manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def load_stage_checkpoint(model: nn.Module, folder: str | Path, policy: StagePolicy,
                          allow_mismatch: bool = False) -> LoadReport:
    """Load an earlier stage's export into `model` (built for `policy`) by exact key."""
    state = load_file(str(Path(folder) / "model.safetensors"))
    manifest = read_manifest(folder)
    if set(manifest["keys"]) != set(state):
        raise ValueError(f"{folder}: manifest and tensors disagree on {len(set(manifest['keys']) ^ set(state))} keys")
    # keys of parts this stage does not build (e.g. S1's segmentor when S2 takes S1's SAM) are skipped
    built = {name for name, _ in model.named_children()}
    absent = tuple(sorted({k.split(".", 1)[0] for k in state} - built))
    return load_checked(model, state, allow_mismatch=allow_mismatch, ignore_unexpected=absent,
                        strict_missing=False)
