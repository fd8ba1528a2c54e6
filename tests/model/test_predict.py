"""predict(): a tiny model trained on one referring example finds its box again, through the Python
API and the command line (exported checkpoint -> load_for_inference -> overlay PNG)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from model_fixtures import boxes_image, referring_example, tiny_model, tiny_tokenizer
from PIL import Image

from xsam.model import templates as T
from xsam.model.batching import collate
from xsam.model.checkpoint import save_stage_checkpoint
from xsam.model.predict import PredictTask, overlay, phrase_question, predict
from xsam.model.stages import S3
from xsam.model.templates import referring_question, seg_answer, with_image
from xsam.model.xsam import DecodeMode


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tok = tiny_tokenizer(folder)
    cfg, model = tiny_model(tok, "s3", seed=0)
    ex = referring_example(1)
    ex.turns = [(with_image(referring_question("the box", 0)), seg_answer(0))]  # what predict() asks
    batch = collate([ex], DecodeMode.per_phrase, tok, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    for _ in range(150):
        losses, _ = model(batch)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    return model.eval(), tok, ex, folder, cfg


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_predict_referring_finds_the_trained_box(trained):
    model, tok, ex, _, _ = trained
    pred = predict(model, tok, ex.image, PredictTask.referring, "the box")
    assert pred.masks.shape == (1, *ex.image.shape[:2]) and pred.masks.dtype == bool
    assert _iou(pred.masks[0], ex.masks[0]) > 0.7
    png = overlay(ex.image, pred)
    assert png.size == (ex.image.shape[1], ex.image.shape[0])
    assert not np.array_equal(np.asarray(png), ex.image)  # the mask is drawn


def test_every_task_returns_masks_at_the_original_size(trained):
    model, tok, _, _, _ = trained
    image, masks = boxes_image(7, h=37, w=53)
    for task, kwargs in [("panoptic", {"prompt": "red box,blue box"}), ("semantic", {"prompt": "red box,blue box"}),
                         ("instance", {"prompt": "red box,blue box"}), ("gres", {"prompt": "the box"}),
                         ("reasoning", {"prompt": "What holds things?"}),
                         ("interactive", {"prompt_masks": masks[:1]}), ("vgd", {"prompt_masks": masks}),
                         ("gcg", {"max_new_tokens": 8})]:
        pred = predict(model, tok, image, task, **kwargs)
        assert pred.masks.ndim == 3 and pred.masks.shape[1:] == (37, 53), task
        assert len(pred.labels) == len(pred.scores) == len(pred.masks), task


def test_reasoning_is_asked_with_the_reasoning_template():
    """ReasonSeg predictions ask what training asked (index 0 of the reasoning lists), not the referring one."""
    q = "What can hold water?"
    assert phrase_question("reasoning", q) == T.REASONING_QUESTIONS[0].format(query=q)
    assert phrase_question("reasoning", "the cup", is_sentence=False) == T.REASONING_SHORT_QUESTIONS[0].format(
        query="the cup")
    assert phrase_question("referring", "The Cup") == T.REFERRING_QUESTIONS[0].format(phrase="the cup")
    assert phrase_question("gres", "the cup") == phrase_question("referring", "the cup")


def test_predict_command_line(trained, tmp_path):
    model, tok, ex, _, cfg = trained
    save_stage_checkpoint(model, S3, cfg, tmp_path / "ckpt", tokenizer=tok)  # the CLI uses the export's tokenizer
    Image.fromarray(ex.image).save(tmp_path / "in.png")
    out = subprocess.run([sys.executable, "-m", "xsam.model.predict", "--checkpoint", str(tmp_path / "ckpt"),
                          "--image", str(tmp_path / "in.png"), "--task", "referring",
                          "--prompt", "the box", "--out", str(tmp_path / "o.png"), "--device", "cpu", "--dtype", "fp32"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["labels"] == ["the box"] and abs(result["areas"][0] - int(ex.masks[0].sum())) < 0.3 * ex.masks[0].sum()
    assert Image.open(tmp_path / "o.png").size == (ex.image.shape[1], ex.image.shape[0])


def test_an_s1_export_is_refused_with_a_clear_error(tmp_path):
    """An S1 export has no trained LLM: predict / evaluate refuse it instead of running random weights."""
    from xsam.model.predict import load_for_inference
    from xsam.model.stages import S1

    tok = tiny_tokenizer(tmp_path / "tok")
    cfg, model = tiny_model(None, "s1", seed=0)
    save_stage_checkpoint(model, S1, cfg, tmp_path / "s1", tokenizer=tok)
    with pytest.raises(ValueError, match=r"a stage s1 export; predict and evaluate need a stage s3 export"):
        load_for_inference(tmp_path / "s1")


def test_load_for_inference_on_a_device_in_bf16(trained, tmp_path):
    """--device / --dtype: the export loads in bf16 (CPU here; auto = cuda when a GPU is visible) and predicts."""
    from xsam.model.predict import load_for_inference, resolve_device, resolve_dtype

    model, tok, ex, _, cfg = trained
    save_stage_checkpoint(model, S3, cfg, tmp_path / "ckpt", tokenizer=tok)
    bf16, tok2 = load_for_inference(tmp_path / "ckpt", device="cpu", dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in bf16.parameters())
    pred = predict(bf16, tok2, ex.image, "referring", "the box")
    assert pred.masks.shape == (1, *ex.image.shape[:2]) and _iou(pred.masks[0], ex.masks[0]) > 0.5
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no GPU"):
            resolve_device("cuda")
