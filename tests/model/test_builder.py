"""build_xsam from local weight folders: tiny SigLIP (HF folder), tiny Phi-3 + tokenizer (HF folder)
and a tiny original-format SAM checkpoint, loaded through the real loading code."""

import pytest
import torch

from test_weights import randomise, tiny_sam
from xsam.model.builder import WeightPaths, build_xsam
from xsam.model.config import tiny
from xsam.model.encoders import SiglipEncoder
from xsam.model.llm import XSamLLM
from xsam.model.stages import S1, S3
from xsam.model.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    cfg = tiny()
    torch.manual_seed(0)
    siglip = SiglipEncoder(cfg.siglip)
    randomise(siglip, 1)
    siglip.model.save_pretrained(root / "siglip")
    tok = build_tiny_tokenizer(root / "phi3", with_special_tokens=False)  # like a released tokenizer
    llm = XSamLLM(cfg.llm, len(tok))
    llm.save_pretrained(root / "phi3")
    sam = tiny_sam(cfg.sam)
    randomise(sam, 2)
    torch.save(sam.state_dict(), root / "sam.pth")
    return root, siglip, llm, sam


def test_build_s3_from_local_weights_reports_and_matches(weights):
    root, siglip, llm, sam = weights
    built = build_xsam("tiny", S3, WeightPaths(sam=str(root / "sam.pth"), siglip=str(root / "siglip"),
                                                llm=str(root / "phi3")))
    model = built.model
    assert set(built.reports) == {"sam", "siglip", "llm"}
    assert built.reports["sam"].ok and not built.reports["sam"].missing
    ignored = built.reports["sam"].ignored  # the neck, prompt encoder and mask decoder are unused by design
    assert any(k.startswith("image_encoder.neck") for k in ignored) and any(k.startswith("mask_decoder") for k in ignored)
    assert built.reports["siglip"].ok and not built.reports["siglip"].missing
    assert built.reports["llm"].added_rows == 3  # <SEG>, <p>, </p>
    for key, value in sam.image_encoder.state_dict().items():
        if not key.startswith("neck"):
            assert torch.equal(model.sam.state_dict()[key], value), key
    pixels = torch.randn(1, 3, 56, 56)
    assert torch.equal(model.siglip.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2],
                       siglip.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2])
    ids = torch.tensor([[1, 5, 9, 30]])
    assert torch.equal(model.llm.model(input_ids=ids).logits[..., : llm.vocab_size], llm.model(input_ids=ids).logits)
    assert set(model.special_ids) == {"<SEG>", "<p>", "</p>"} and len(set(model.special_ids.values())) == 3
    assert all(i >= llm.vocab_size for i in model.special_ids.values())
    assert built.counts["trainable"] > 0 and built.counts["frozen"] > 0


def test_build_s1_needs_no_llm_and_skips_mllm_parts(weights):
    root, *_ = weights
    built = build_xsam("tiny", S1, WeightPaths(sam=str(root / "sam.pth")))
    assert built.tokenizer is None and built.model.llm is None and built.model.siglip is None
    assert built.model.segmentor is not None


def test_s3_without_a_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="tokenizer"):
        build_xsam("tiny", S3, WeightPaths())
