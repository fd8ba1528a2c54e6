"""Sizes of every X-SAM module, as plain dataclasses, and the two presets.

`paper()` is the published Phi-3 configuration (reference section 1): Phi-3-mini-4k-instruct +
SigLIP2-so400m-patch14-384 + SAM ViT-L, about 4.6B parameters. `tiny()` keeps every class and
every interface (token counts scale with the image sizes) at small widths and depths so a forward
runs in well under a second on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes -> torch antialiased interpolate modes


@dataclass(frozen=True)
class SiglipProcessing:
    """transformers' SiglipImageProcessor settings as data: how the SigLIP view is made
    (`preprocess.siglip_view`). Defaults are SigLIP's own (the processor class defaults): bicubic,
    x 1/255, mean = std = 0.5. `from_folder` reads a checkpoint folder's preprocessor_config.json.

    size: the processor's (height, width); None = the encoder's image_size (the two must agree).
    resample: PIL code, 2 (bilinear) or 3 (bicubic), done as PIL does it (antialiased, 8-bit passes).
    """

    size: tuple[int, int] | None = None
    resample: int = 3
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:  # JSON gives lists: tuples, so equal settings compare equal
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            value = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
            if len(value) != 3:
                raise ValueError(f"SiglipProcessing.{name}: expected 3 values, got {value}")
            object.__setattr__(self, name, value)
        if self.resample not in PIL_RESAMPLE:
            raise ValueError(f"SiglipProcessing.resample: PIL code {self.resample} is not supported "
                             f"(supported: {', '.join(f'{k} {v}' for k, v in PIL_RESAMPLE.items())})")

    @property
    def mode(self) -> str:
        """The torch interpolate mode of `resample`."""
        return PIL_RESAMPLE[self.resample]

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """expand2square's canvas colour: int(mean * 255) per channel (127 for SigLIP)."""
        return tuple(int(m * 255) for m in self.image_mean)

    @classmethod
    def from_dict(cls, d: SiglipProcessing | dict[str, Any]) -> SiglipProcessing:
        return d if isinstance(d, cls) else cls(**d)

    @classmethod
    def from_folder(cls, folder: str | Path) -> SiglipProcessing:
        """A local folder's preprocessor_config.json (no hub); the defaults when the folder has none.
        Settings this view cannot honour (no resize, a centre crop, a shortest-edge size) are errors."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        d = json.loads(path.read_text())
        if not d.get("do_resize", True) or d.get("do_center_crop", False) or d.get("do_pad", False):
            raise ValueError(f"{path}: only a plain resize to a fixed size is supported (do_resize true, "
                             "no centre crop, no padding)")
        size = d.get("size")
        if size is not None and not {"height", "width"} <= set(size):
            raise ValueError(f"{path}: size {size} is not a fixed height x width")
        names = {f.name for f in fields(cls)} - {"size"}
        return cls(size=(size["height"], size["width"]) if size is not None else None,
                   **{k: v for k, v in d.items() if k in names})


@dataclass
class SiglipConfig:
    """The image encoder: a SigLIP vision tower; X-SAM reads the second-to-last hidden layer."""

    image_size: int = 384
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    select_layer: int = -2
    # the view's processor settings; `weights.load_siglip` sets them from the checkpoint folder
    processing: SiglipProcessing = field(default_factory=SiglipProcessing)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 27 * 27 = 729


@dataclass
class SamConfig:
    """The segmentation encoder: SAM's ViT image encoder (neck unused)."""

    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (5, 11, 17, 23)
    connector_blocks: tuple[int, ...] = (12, 18, 24)  # 1-indexed blocks feeding the 1/8, 1/16, 1/32 levels
    projector_block: int = 23  # 1-indexed block feeding the segmentation projector

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # 64

    @property
    def num_tokens(self) -> int:
        return (self.grid // 2) ** 2  # after pixel shuffle 0.5: 32 * 32 = 1024


@dataclass
class LLMConfig:
    """Phi-3 (transformers Phi3ForCausalLM) sizes; vocab_size excludes the added special tokens."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0


@dataclass
class DecoderConfig:
    """Connector, Mask2Former-style pixel decoder and masked-attention transformer decoder."""

    connector_dim: int = 512  # the connector's inner width
    hidden_dim: int = 256
    num_queries: int = 200
    dec_layers: int = 10  # Mask2Former counts the initial prediction: 9 attention layers + 1
    nheads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6
    enc_dim_feedforward: int = 1024
    enc_n_points: int = 4
    pre_norm: bool = False
    num_s1_classes: int = 133  # the S1 linear head: 133 COCO panoptic classes + 1 no-object
    logit_scale_init: float = 2.659260036932778  # log(1 / 0.07)
    logit_scale_clamp: float = 500.0  # paper; the later revision clamps at 50


@dataclass
class LossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass
class XSAMConfig:
    siglip: SiglipConfig = field(default_factory=SiglipConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    num_prompt_points: int = 256  # visual-prompt sampler

    @property
    def num_visual_tokens(self) -> int:
        return self.siglip.num_tokens + self.sam.num_tokens  # 729 + 1024 = 1753

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XSAMConfig":
        sam = dict(d["sam"])
        for key in ("global_attn_indexes", "connector_blocks"):
            sam[key] = tuple(sam[key])
        siglip = dict(d["siglip"])
        if "processing" in siglip:  # absent from configs written before it existed: the defaults
            siglip["processing"] = SiglipProcessing.from_dict(siglip["processing"])
        return cls(siglip=SiglipConfig(**siglip), sam=SamConfig(**sam), llm=LLMConfig(**d["llm"]),
                   decoder=DecoderConfig(**d["decoder"]), loss=LossConfig(**d["loss"]),
                   num_prompt_points=d["num_prompt_points"])


def paper() -> XSAMConfig:
    """The published configuration (Phi-3-mini-4k + SigLIP2-so400m-patch14-384 + SAM ViT-L)."""
    return XSAMConfig()


def tiny() -> XSAMConfig:
    """Same classes and interfaces, small: 56 px SigLIP view (4x4 = 16 tokens), 128 px SAM view
    (8x8 grid -> 16 segmentation tokens), a 2-layer LLM of width 64, a 2-layer decoder."""
    return XSAMConfig(
        siglip=SiglipConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2),
        sam=SamConfig(image_size=128, patch_size=16, embed_dim=32, depth=4, num_heads=2, window_size=4,
                      global_attn_indexes=(1, 3), connector_blocks=(2, 3, 4), projector_block=3),
        llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512),
        decoder=DecoderConfig(connector_dim=32, hidden_dim=32, num_queries=8, dec_layers=4, nheads=2,
                              dim_feedforward=64, enc_layers=1, enc_dim_feedforward=64, enc_n_points=2,
                              num_s1_classes=8),
        loss=LossConfig(num_points=256),
        num_prompt_points=16,
    )


PRESETS = {"paper": paper, "tiny": tiny}


def with_overrides(cfg: XSAMConfig, overrides: dict[str, Any] | None) -> XSAMConfig:
    """`cfg` with nested fields replaced, e.g. {"llm": {"num_hidden_layers": 4}} (a paper-width model of
    reduced depth for a GPU check). An unknown section or field is an error naming it."""
    if not overrides:
        return cfg
    d = cfg.to_dict()
    for section, value in overrides.items():
        if section not in d:
            raise ValueError(f"model_overrides: unknown section {section!r} (has: {', '.join(sorted(d))})")
        if isinstance(d[section], dict):
            if not isinstance(value, dict):
                raise ValueError(f"model_overrides.{section}: expected a mapping of fields, got {value!r}")
            unknown = sorted(set(value) - set(d[section]))
            if unknown:
                raise ValueError(f"model_overrides.{section}: unknown field(s) {', '.join(unknown)}")
            d[section] = {**d[section], **value}
        else:
            d[section] = value
    return XSAMConfig.from_dict(d)
