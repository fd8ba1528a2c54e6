"""Builders: a config (preset) + local weight locations -> an X-SAM model for a stage.

Weights come from local paths only (no hub): SigLIP and Phi-3 as Hugging Face folders, SAM as its
original checkpoint file. Every load returns a LoadReport (matched / missing / unexpected /
shape-mismatched keys) and a shape mismatch fails unless `allow_mismatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xsam.model.config import PRESETS, XSAMConfig
from xsam.model.encoders import SamEncoder, SiglipEncoder
from xsam.model.llm import XSamLLM
from xsam.model.stages import Part, StagePolicy, apply_policy
from xsam.model.tokenizer import SPECIAL_TOKENS, add_special_tokens
from xsam.model.weights import LoadReport, load_sam, load_siglip
from xsam.model.xsam import XSAM, Segmentor


@dataclass
class WeightPaths:
    """Local weight locations; None = random initialisation (tests, or a part the stage skips)."""

    sam: str | None = None  # original SAM checkpoint file, e.g. sam_vit_l_0b3195.pth
    siglip: str | None = None  # HF folder of the SigLIP(2) vision tower or full model
    llm: str | None = None  # HF folder of Phi-3 (its tokenizer too, unless `tokenizer` is given)
    tokenizer: str | None = None


@dataclass
class Built:
    model: XSAM
    tokenizer: object | None
    reports: dict[str, LoadReport] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def resolve_config(preset: str | XSAMConfig) -> XSAMConfig:
    return preset if isinstance(preset, XSAMConfig) else PRESETS[preset]()


def build_model(cfg: XSAMConfig, parts: frozenset[Part], vocab_size: int | None = None) -> XSAM:
    """Construct (random init) the parts a stage uses. Works under `with torch.device("meta")`."""
    segmentor = Segmentor(cfg) if Part.segmentor in parts else None
    siglip = llm = None
    if Part.mllm in parts:
        siglip = SiglipEncoder(cfg.siglip)
        llm = XSamLLM(cfg.llm, vocab_size or cfg.llm.vocab_size)
    return XSAM(cfg, SamEncoder(cfg.sam), segmentor=segmentor, siglip=siglip, llm=llm)


def build_xsam(preset: str | XSAMConfig, stage: StagePolicy, weights: WeightPaths | None = None,
               allow_mismatch: bool = False) -> Built:
    from transformers import AutoTokenizer

    cfg = resolve_config(preset)
    weights = weights or WeightPaths()
    tokenizer = None
    if Part.mllm in stage.parts:
        source = weights.tokenizer or weights.llm
        if source is None:
            raise ValueError("a stage with the LLM needs a tokenizer folder (WeightPaths.tokenizer or .llm)")
        tokenizer = AutoTokenizer.from_pretrained(source)
        add_special_tokens(tokenizer)
    model = build_model(cfg, stage.parts, len(tokenizer) if tokenizer is not None else None)
    reports: dict[str, LoadReport] = {}
    if weights.sam:
        reports["sam"] = load_sam(model.sam, weights.sam)
    if model.siglip is not None and weights.siglip:
        reports["siglip"] = load_siglip(model.siglip, weights.siglip)
    if model.llm is not None:
        if weights.llm:
            model.llm = XSamLLM.from_pretrained(weights.llm, len(tokenizer))
            reports["llm"] = model.llm.load_report
        model.special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    counts = apply_policy(model, stage, unused=model.unused_prefixes())
    return Built(model=model, tokenizer=tokenizer, reports=reports, counts=counts)
