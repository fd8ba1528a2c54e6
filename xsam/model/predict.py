"""Predict: image + task + prompt -> masks, labels, scores and an overlay picture.

    from xsam.model.predict import load_for_inference, predict, overlay
    model, tokenizer = load_for_inference("checkpoints/s3")   # the export's own tokenizer
    pred = predict(model, tokenizer, image, "referring", "the man on the left")
    overlay(image, pred).save("out.png")

    python -m xsam.model.predict --checkpoint DIR --image in.jpg --task panoptic \\
        --prompt "person,sky,grass" --out overlay.png

Segmentation tasks are teacher-forced (the answer template with <SEG> is given, one forward);
GCG decodes greedily, parses the <p>...</p> phrases, then decodes their masks (reference sec. 4-5).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xsam.model import label_chunks, postprocess
from xsam.model.batching import Example, collate_raw, text_budget
from xsam.model.preprocess import scaled_size
from xsam.model.templates import (
    gcg_question,
    generic_question,
    interactive_question,
    reasoning_question,
    referring_answer,
    referring_question,
    seg_answer,
    vgd_question,
    with_image,
)
from xsam.model.tokenizer import END_TOKEN, SEG_TOKEN, encode_prompt, parse_gcg, token_id
from xsam.model.xsam import XSAM, DecodeMode


class PredictTask(str, Enum):
    panoptic = "panoptic"
    semantic = "semantic"
    instance = "instance"
    referring = "referring"
    reasoning = "reasoning"  # ReasonSeg: the reasoning template (sentence or phrase query)
    gres = "gres"
    gcg = "gcg"
    interactive = "interactive"
    vgd = "vgd"


@dataclass
class Prediction:
    task: PredictTask
    masks: np.ndarray  # [N, H, W] bool at the original image size
    labels: list[str]
    scores: list[float]
    text: str | None = None  # GCG caption


def _categories(prompt: str | list[str] | None) -> list[str]:
    names = prompt.split(",") if isinstance(prompt, str) else list(prompt or [])
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("this task needs a prompt listing categories, e.g. 'person,sky,grass'")
    return names


def phrase_question(task: PredictTask | str, prompt: str, is_sentence: bool = True) -> str:
    """The question of a referring / gres / reasoning prediction: the templates' index 0, as training
    formatted that task (reasoning: REASONING_QUESTIONS for a sentence, the short questions for a phrase)."""
    if PredictTask(task) is PredictTask.reasoning:
        return reasoning_question(prompt, 0, is_sentence)
    return referring_question(prompt, 0)


# Every evaluation config of the paper pads the SigLIP view to a square (pad_image_to_square=True)
EVAL_SIGLIP_PAD_SQUARE = True


def _run(model: XSAM, tokenizer, example: Example, mode: DecodeMode) -> tuple[torch.Tensor, torch.Tensor]:
    """One example, teacher-forced; the model builds its views on its own device (XSAM.prepare), the
    SigLIP view padded to a square as in the paper's evaluation."""
    batch = collate_raw([example], mode, tokenizer, model.cfg)
    batch = model.prepare(batch, siglip_pad_square=EVAL_SIGLIP_PAD_SQUARE)
    _, _, out = model.decode(batch)
    return out["pred_logits"], out["pred_masks"]


def _generic_passes(model: XSAM, tokenizer, image: np.ndarray, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The generic prompt over `names`, in as many passes as the text budget needs (`label_chunks`)
    -> (logits [1, Q', K + 1], masks [1, Q', h, w]); one pass when the list fits."""
    h, w = image.shape[:2]
    budget = text_budget(model.cfg)

    def turns(sub):
        return [(with_image(generic_question(sub, 0)), seg_answer(0))]

    chunks = label_chunks.chunk(names, lambda sub: label_chunks.text_tokens(turns(sub), tokenizer) <= budget)
    parts = []
    for idx in chunks:
        ex = Example(image, turns([names[i] for i in idx]), np.zeros((0, h, w), bool), [])
        logits, masks = _run(model, tokenizer, ex, DecodeMode.per_sample)
        parts.append((logits[0], masks[0]))
    logits, masks = label_chunks.merge(parts, chunks, len(names))
    return logits[None], masks[None]


@torch.no_grad()
def predict(model: XSAM, tokenizer, image: np.ndarray, task: PredictTask | str, prompt: str | list[str] | None = None,
            prompt_masks: np.ndarray | None = None, is_thing: list[bool] | None = None,
            max_new_tokens: int = 128, is_sentence: bool = True) -> Prediction:
    """image [H, W, 3] uint8 RGB; prompt: categories (panoptic / semantic / instance), a phrase or
    question (referring / reasoning / gres), nothing (gcg); prompt_masks [R, H, W] bool (interactive / vgd).
    is_sentence: a reasoning query is a sentence (REASONING_QUESTIONS) or a phrase (the short questions)."""
    task = PredictTask(task)
    model.eval()
    h, w = image.shape[:2]
    orig, scaled = (h, w), scaled_size((h, w), model.cfg.sam.image_size)
    if task in (PredictTask.panoptic, PredictTask.semantic, PredictTask.instance):
        names = _categories(prompt)
        logits, masks = _generic_passes(model, tokenizer, image, names)
        if task is PredictTask.semantic:
            seg = postprocess.semantic(logits[0], masks[0], scaled, orig)
            present = sorted(int(c) for c in seg.unique())
            return Prediction(task, np.stack([(seg == c).numpy() for c in present]), [names[c] for c in present],
                              [1.0] * len(present))
        if task is PredictTask.panoptic:
            seg_map, segments = postprocess.panoptic(logits[0], masks[0], scaled, orig,
                                                     is_thing or [True] * len(names))
            return Prediction(task, np.stack([(seg_map == s["id"]).numpy() for s in segments]) if segments
                              else np.zeros((0, h, w), bool), [names[s["category_id"]] for s in segments],
                              [float(s["score"]) for s in segments])
        res = postprocess.instance(logits[0], masks[0], scaled, orig)
        return Prediction(task, res["masks"].numpy(), [names[int(c)] for c in res["labels"]],
                          res["scores"].tolist())
    if task in (PredictTask.referring, PredictTask.reasoning, PredictTask.gres):
        if not prompt:
            raise ValueError(f"{task.value} needs a phrase or question as prompt")
        ex = Example(image, [(with_image(phrase_question(task, str(prompt), is_sentence)), referring_answer(0))],
                     np.zeros((1, h, w), bool), [0])
        logits, masks = _run(model, tokenizer, ex, DecodeMode.per_phrase)
        fn = postprocess.gres if task is PredictTask.gres else postprocess.referring
        return Prediction(task, fn(logits[0], masks[0], scaled, orig)[None].numpy(), [str(prompt)], [1.0])
    if task in (PredictTask.interactive, PredictTask.vgd):
        if prompt_masks is None or len(prompt_masks) == 0:
            raise ValueError(f"{task.value} needs prompt_masks [R, H, W]")
        question = interactive_question(0) if len(prompt_masks) == 1 else vgd_question(len(prompt_masks), 0)
        ex = Example(image, [(with_image(question), seg_answer(0))], np.zeros((0, h, w), bool), [],
                     region_masks=prompt_masks.astype(bool))
        logits, masks = _run(model, tokenizer, ex, DecodeMode.per_sample)
        if task is PredictTask.interactive:
            out = [postprocess.interactive(logits[0][:, [r, -1]], masks[0], scaled, orig,
                                           torch.from_numpy(prompt_masks[r])) for r in range(len(prompt_masks))]
            return Prediction(task, torch.stack(out).numpy(), [f"region {r}" for r in range(len(out))],
                              [1.0] * len(out))
        res = postprocess.vgd(logits[0], masks[0], scaled, orig)
        return Prediction(task, res["masks"].numpy(), [f"region {int(c)}" for c in res["labels"]],
                          res["scores"].tolist())
    # GCG: generate, parse the phrases, then decode them teacher-forced
    question = with_image(gcg_question(0))
    batch = collate_raw([Example(image, [(question, "")])], DecodeMode.none, tokenizer, model.cfg)
    batch.input_ids = [torch.tensor(encode_prompt(question, tokenizer))]
    batch.labels = [torch.full_like(batch.input_ids[0], -100)]
    batch = model.prepare(batch, siglip_pad_square=EVAL_SIGLIP_PAD_SQUARE)
    generated = model.generate(batch, max_new_tokens, token_id(tokenizer, END_TOKEN))[0]
    text = tokenizer.decode(generated, skip_special_tokens=False)
    caption, spans = parse_gcg(text)
    if not spans:
        return Prediction(task, np.zeros((0, h, w), bool), [], [], text=caption)
    answer = text.split(END_TOKEN)[0].rstrip()
    if SEG_TOKEN not in answer:  # the phrases decode from the <SEG> state: close the answer if generation did not
        answer = f"{answer} {seg_answer(0)}"
    ex = Example(image, [(question, answer)], np.zeros((len(spans), h, w), bool), list(range(len(spans))))
    logits, masks = _run(model, tokenizer, ex, DecodeMode.per_sample)
    out = postprocess.gcg(logits[0], masks[0], scaled, orig)
    return Prediction(task, out.numpy(), [caption[s:e] for s, e in spans], [1.0] * len(spans), text=caption)


def overlay(image: np.ndarray, pred: Prediction, alpha: float = 0.5) -> Image.Image:
    """The image with each mask tinted in its own colour (deterministic palette)."""
    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(0)
    for mask in pred.masks:
        colour = rng.integers(40, 256, size=3).astype(np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def load_for_inference(checkpoint: str | Path, tokenizer: str | Path | None = None):
    """A stage export (folder or s3:// prefix, as written by xsam.model.export; read directly and
    checked complete) -> (model, tokenizer), ready for `predict`. The tokenizer is the export's own
    unless a tokenizer folder is given."""
    from transformers import AutoTokenizer

    from xsam.model.builder import build_model
    from xsam.model.checkpoint import load_stage_state
    from xsam.model.config import XSAMConfig
    from xsam.model.export import load_export, load_tokenizer
    from xsam.model.stages import S3
    from xsam.model.tokenizer import SPECIAL_TOKENS, add_special_tokens

    tok = load_tokenizer(checkpoint) if tokenizer is None else AutoTokenizer.from_pretrained(str(tokenizer))
    add_special_tokens(tok)
    state, manifest = load_export(checkpoint)
    if manifest.get("stage") != S3.name:  # an S1 / S2 export has untrained parts every task goes through
        raise ValueError(f"{checkpoint}: a stage {manifest.get('stage')} export; predict and evaluate need a stage "
                         f"{S3.name} export (every task runs the LLM, the projectors and the segmentor trained in S3)")
    cfg = XSAMConfig.from_dict(manifest["config"])
    model = build_model(cfg, S3.parts, len(tok))
    missing = sorted({k.split(".", 1)[0] for k in model.state_dict()} - {k.split(".", 1)[0] for k in state})
    if missing:
        raise ValueError(f"{checkpoint}: the export lacks the parts {missing} that prediction needs")
    load_stage_state(model, state)
    model.special_ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    model.siglip_pad_square = EVAL_SIGLIP_PAD_SQUARE  # the processor settings come with the export's config
    return model.eval(), tok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported S3 checkpoint (folder or s3:// prefix)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the export's own)")
    p.add_argument("--image", required=True)
    p.add_argument("--task", required=True, choices=[t.value for t in PredictTask])
    p.add_argument("--prompt", help="categories (comma-separated) or a referring phrase")
    p.add_argument("--prompt-masks", help=".npy file of [R, H, W] bool visual prompts")
    p.add_argument("--out", default="overlay.png")
    args = p.parse_args(argv)
    model, tok = load_for_inference(args.checkpoint, args.tokenizer)
    image = np.asarray(Image.open(args.image).convert("RGB"))
    prompt_masks = np.load(args.prompt_masks) if args.prompt_masks else None
    pred = predict(model, tok, image, args.task, args.prompt, prompt_masks)
    overlay(image, pred).save(args.out)
    print(json.dumps({"task": pred.task.value, "labels": pred.labels, "scores": [round(s, 4) for s in pred.scores],
                      "areas": [int(m.sum()) for m in pred.masks], "text": pred.text, "overlay": args.out}))


if __name__ == "__main__":
    main()
