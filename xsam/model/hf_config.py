"""The export's config.json as a transformers config: `AutoConfig.from_pretrained(export_dir)` works.

    import xsam.model.hf_config          # registers model_type "xsam" with AutoConfig (also done by
                                         # importing xsam.model.export, which writes / reads exports)
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained("runs/xsam-s3/export")     # an XSAMPretrainedConfig
    cfg.stage, cfg.llm["hidden_size"], cfg.xsam_config()        # the sizes; the library's XSAMConfig

The export writes config.json with model_type "xsam", architectures ["XSAM"], the stage and every size of
the preset at the top level (siglip / sam / llm / decoder / loss / num_prompt_points, as
`xsam.model.config.XSAMConfig.to_dict()`), the dtype and the special-token ids (xsam.model.export).
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from xsam.model.config import XSAMConfig

MODEL_TYPE = "xsam"
SECTIONS = ("siglip", "sam", "llm", "decoder", "loss")


class XSAMPretrainedConfig(PretrainedConfig):
    """transformers' view of an X-SAM export's config.json (model_type "xsam"); the sizes stay the
    nested sections of XSAMConfig (`xsam_config()` rebuilds it)."""

    model_type = MODEL_TYPE

    def __init__(self, stage: str | None = None, num_prompt_points: int = 256, **kwargs):
        self.stage = stage
        self.num_prompt_points = num_prompt_points
        for section in SECTIONS:
            setattr(self, section, kwargs.pop(section, None))
        super().__init__(**kwargs)

    def xsam_config(self) -> XSAMConfig:
        """The library's XSAMConfig of these sizes; an export without them is an error naming the section."""
        missing = [s for s in SECTIONS if getattr(self, s) is None]
        if missing:
            raise ValueError(f"config.json (model_type {MODEL_TYPE!r}) lacks the sections {missing}")
        return XSAMConfig.from_dict({s: getattr(self, s) for s in SECTIONS}
                                    | {"num_prompt_points": self.num_prompt_points})


AutoConfig.register(MODEL_TYPE, XSAMPretrainedConfig, exist_ok=True)
