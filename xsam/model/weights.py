"""Checked weight loading: every key and shape is compared BEFORE anything is copied.

The original silently skipped shape mismatches; here a mismatch, a missing key or an unexpected key
is an error that names the keys, unless the caller opts out explicitly (allow_mismatch,
strict_missing=False, strict_unexpected=False, or prefixes in ignore_unexpected), and every load
returns a LoadReport saying what happened.

    load_checked(module, state_dict, ...)  -> LoadReport     the primitive everyone uses
    load_siglip(encoder, folder)           -> LoadReport     a HF SigLIP folder (vision-only or full model)
    load_sam(encoder, checkpoint_path)     -> LoadReport     an original segment-anything checkpoint
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig

from xsam.model.config import SiglipProcessing
from xsam.model.encoders import SamEncoder, SiglipEncoder

_LIST_LIMIT = 30  # keys listed per category in an error message


class WeightLoadError(ValueError):
    """A checkpoint does not fit the module (mismatched shapes, missing or unexpected keys, bad config)."""


@dataclass
class LoadReport:
    """What a load did. Keys are the module's names (after any prefix stripping).

    matched     keys copied into the module
    missing     module keys the state dict did not provide (left as they were)
    unexpected  state-dict keys the module does not have (not loaded)
    mismatched  (key, shape in the state dict, shape in the module), not loaded
    ignored     state-dict keys skipped on purpose (ignore_unexpected prefixes, other towers, SAM's neck)
    """

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every module key was loaded from a same-shaped tensor and nothing was left over
        (keys ignored on purpose do not count)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        return (f"LoadReport({'ok' if self.ok else 'NOT ok'}: matched {len(self.matched)}, "
                f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                f"mismatched {len(self.mismatched)}, ignored {len(self.ignored)})")


def _under(key: str, prefixes: Iterable[str]) -> bool:
    """key is `p`, or lies under `p` at a module boundary ("a.b" covers "a.b.c", not "a.bc"); "" matches nothing."""
    for p in prefixes:
        p = p.rstrip(".")
        if p and (key == p or key.startswith(p + ".")):
            return True
    return False


def _listing(title: str, lines: list[str]) -> str:
    shown = "\n  ".join(lines[:_LIST_LIMIT])
    more = f"\n  ... and {len(lines) - _LIST_LIMIT} more" if len(lines) > _LIST_LIMIT else ""
    return f"{title} ({len(lines)}):\n  {shown}{more}"


def load_checked(module: nn.Module, state_dict: Mapping[str, Tensor], *, allow_mismatch: bool = False,
                 ignore_unexpected: Iterable[str] = (), strict_missing: bool = True,
                 strict_unexpected: bool = True) -> LoadReport:
    """Compare `state_dict` with `module.state_dict()` by key and shape, then load the matches.

    Raises WeightLoadError listing the offending keys when there are shape mismatches (unless
    allow_mismatch: then they are skipped and reported), missing keys (unless strict_missing=False)
    or unexpected keys (unless strict_unexpected=False). Nothing is copied when it raises.
    ignore_unexpected: key prefixes skipped on purpose (module-boundary match, "head" covers
    "head.weight"): state-dict keys under them are never loaded and are reported in `ignored`;
    module keys under them are not counted as missing (they stay as initialised).
    Dtypes are converted to the module's by the copy.
    """
    prefixes = tuple(ignore_unexpected)
    target = module.state_dict()
    target_shapes = {k: tuple(v.shape) for k, v in target.items()}

    matched, unexpected, mismatched, ignored = [], [], [], []
    for key, value in state_dict.items():
        if _under(key, prefixes):
            ignored.append(key)
        elif key not in target_shapes:
            unexpected.append(key)
        elif tuple(value.shape) != target_shapes[key]:
            mismatched.append((key, tuple(value.shape), target_shapes[key]))
        else:
            matched.append(key)
    seen = set(matched) | {k for k, _, _ in mismatched}
    missing = [k for k in target_shapes if k not in seen and not _under(k, prefixes)]
    report = LoadReport(matched, missing, unexpected, mismatched, ignored)

    problems = []
    if mismatched and not allow_mismatch:
        problems.append(_listing("shape mismatches (state dict vs module; pass allow_mismatch=True to skip them)",
                                 [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched]))
    if missing and strict_missing:
        problems.append(_listing("missing keys (pass strict_missing=False to leave them initialised)", missing))
    if unexpected and strict_unexpected:
        problems.append(_listing("unexpected keys (not in the module)", unexpected))
    if problems:
        raise WeightLoadError(f"cannot load into {type(module).__name__}: {report}\n" + "\n".join(problems))

    result = module.load_state_dict({k: state_dict[k] for k in matched}, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; guard against silent drift
        raise WeightLoadError(f"load_state_dict rejected keys {result.unexpected_keys[:_LIST_LIMIT]}")
    return report


# ---------------------------------------------------------------------------------------------------
# SigLIP (transformers folder)

_SIGLIP_FIELDS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_channels", "hidden_act", "layer_norm_eps", "vision_use_head")
_VISION_PREFIX = "vision_model."


def _safetensors_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_siglip(encoder: SiglipEncoder, folder: str | Path, *, allow_mismatch: bool = False) -> LoadReport:
    """Load a HF-format SigLIP folder into `encoder.model`.

    Accepts a SiglipVisionModel.save_pretrained folder (keys `embeddings.*`, `encoder.*`, ... as written
    by transformers 5; older versions wrote them under `vision_model.`) or a full SiglipModel checkpoint
    (vision keys under `vision_model.`, plus `text_model.*`, `logit_scale`, `logit_bias`, which are
    reported as ignored and never read). The folder's vision config must equal the encoder's
    (WeightLoadError naming the first differing field). Single or sharded safetensors.

    The folder's image-processor settings (preprocessor_config.json; SigLIP's defaults when it has none)
    become `encoder.cfg.processing` - the SigLIP section of the model config the encoder was built from,
    so the views (`XSAM.prepare`) and the exports' config follow the checkpoint's own processor.
    """
    folder = Path(folder)
    try:
        processing = SiglipProcessing.from_folder(folder)
    except ValueError as e:
        raise WeightLoadError(str(e)) from e
    if processing.size not in (None, (encoder.cfg.image_size,) * 2):
        raise WeightLoadError(f"{folder}: preprocessor_config.json resizes to {processing.size}, the encoder "
                              f"takes {encoder.cfg.image_size} x {encoder.cfg.image_size}")
    hf_cfg = AutoConfig.from_pretrained(str(folder))
    if hf_cfg.model_type == "siglip":
        hf_cfg = hf_cfg.vision_config
    elif hf_cfg.model_type != "siglip_vision_model":
        raise WeightLoadError(f"{folder}: model_type {hf_cfg.model_type!r} is not a SigLIP model "
                              "('siglip' or 'siglip_vision_model')")
    mine = encoder.model.config
    for name in _SIGLIP_FIELDS:
        theirs, ours = getattr(hf_cfg, name, None), getattr(mine, name, None)
        if theirs != ours:
            raise WeightLoadError(f"{folder}: SigLIP config field {name!r} is {theirs!r} in the folder but "
                                  f"{ours!r} in the encoder")

    files = _safetensors_files(folder)
    keys: dict[str, Path] = {}  # checkpoint key -> its file
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names = sf.keys()
        keys.update(dict.fromkeys(names, f))
    prefixed = any(k.startswith(_VISION_PREFIX) for k in keys)
    wanted = {k: k[len(_VISION_PREFIX):] for k in keys if k.startswith(_VISION_PREFIX)} if prefixed \
        else {k: k for k in keys}
    ignored = sorted(k for k in keys if k not in wanted)

    state: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k, name in wanted.items():
                if keys[k] == f:
                    state[name] = sf.get_tensor(k)
    report = load_checked(encoder.model, state, allow_mismatch=allow_mismatch)
    report.ignored.extend(ignored)
    encoder.cfg.processing = processing
    return report


# ---------------------------------------------------------------------------------------------------
# SAM (original segment-anything checkpoint)

_SAM_PREFIX = "image_encoder."
_SAM_IGNORED = ("image_encoder.neck", "prompt_encoder", "mask_decoder")


def load_sam(encoder: SamEncoder, checkpoint_path: str | Path, *, allow_mismatch: bool = False) -> LoadReport:
    """Load the image encoder of an original SAM checkpoint (torch.save of Sam.state_dict():
    image_encoder.*, prompt_encoder.*, mask_decoder.*) into `encoder`.

    `image_encoder.` is stripped; the neck, prompt encoder and mask decoder keys are reported as
    ignored (checkpoint names). Any other key is unexpected (an error). torch.load(weights_only=True).
    """
    state = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightLoadError(f"{checkpoint_path}: not a flat state dict of tensors")
    if not any(k.startswith(_SAM_PREFIX) for k in state):
        raise WeightLoadError(f"{checkpoint_path}: no '{_SAM_PREFIX}*' keys; is this a segment-anything checkpoint?")
    ignored = [k for k in state if _under(k, _SAM_IGNORED)]
    encoder_state = {k.removeprefix(_SAM_PREFIX): v for k, v in state.items() if not _under(k, _SAM_IGNORED)}
    report = load_checked(encoder, encoder_state, allow_mismatch=allow_mismatch)
    report.ignored.extend(ignored)
    return report
