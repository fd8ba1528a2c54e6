"""Predict: image + task + prompt -> masks, labels, scores and an overlay picture.

    from xsam.model.predict import load_for_inference, predict, overlay
    model, tokenizer = load_for_inference("checkpoints/s3")   # the export's own tokenizer
    pred = predict(model, tokenizer, image, "referring", "the man on the left")
    overlay(image, pred).save("out.png")

    python -m xsam.model.predict --checkpoint DIR --image in.jpg --task panoptic \\
        --prompt "person,sky,grass" --out overlay.png [--device auto|cpu|cuda] [--dtype auto|bf16|fp32]

Segmentation tasks are teacher-forced (the answer template with <SEG> is given, one forward);
GCG decodes greedily, parses the <p>...</p> phrases, then decodes their masks (reference sec. 4-5).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xsam.logs import UserError, cli_errors
from xsam.model import label_chunks, postprocess
from xsam.model.batching import Example, collate_raw, text_budget
from xsam.model.preprocess import scaled_size
from xsam.model.templates import (
    gcg_answer,
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
from xsam.model.tokenizer import (
    END_P_TOKEN,
    END_TOKEN,
    P_TOKEN,
    encode_prompt,
    parse_gcg,
    token_id,
)
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
    skipped: str | None = None  # GCG: why the paper's protocol skips this answer (no / several <SEG>, no phrase)


def _categories(prompt: str | list[str] | None) -> list[str]:
    names = prompt.split(",") if isinstance(prompt, str) else list(prompt or [])
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UserError("this task needs a prompt listing categories (--prompt 'person,sky,grass'); got none")
    return names


def phrase_question(task: PredictTask | str, prompt: str, is_sentence: bool = True) -> str:
    """The question of a referring / gres / reasoning prediction: the templates' index 0, as training
    formatted that task (reasoning: REASONING_QUESTIONS for a sentence, the short questions for a phrase)."""
    if PredictTask(task) is PredictTask.reasoning:
        return reasoning_question(prompt, 0, is_sentence)
    return referring_question(prompt, 0)


# Every evaluation config of the paper pads the SigLIP view to a square (pad_image_to_square=True)
EVAL_SIGLIP_PAD_SQUARE = True


@dataclass
class Request:
    """One prediction, as `predict` is asked for it: prompt = categories (panoptic / semantic / instance),
    a phrase or question (referring / reasoning / gres), nothing (gcg); prompt_masks [R, H, W] bool
    (interactive / vgd); is_thing per category (panoptic); is_sentence (reasoning)."""

    task: PredictTask
    prompt: str | list[str] | None = None
    prompt_masks: np.ndarray | None = None
    is_thing: list[bool] | None = None
    is_sentence: bool = True

    def __post_init__(self):
        self.task = PredictTask(self.task)


@dataclass
class Passes:
    """The teacher-forced passes of one request on one image: one Example per pass (several only for a
    label space longer than the text budget), the decode mode, and for a generic request the label
    chunk of each pass (`label_chunks`); `merge` turns the passes' outputs into one prediction."""

    examples: list[Example]
    mode: DecodeMode
    chunks: list[list[int]] | None = None
    num_classes: int = 0

    def merge(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pass (logits [Q, k_i + 1], masks [Q, h, w]) -> (logits [Q', K + 1], masks [Q', h, w])."""
        if self.chunks is None:
            return parts[0]
        return label_chunks.merge(parts, self.chunks, self.num_classes)


def _run(model: XSAM, tokenizer, example: Example, mode: DecodeMode) -> tuple[torch.Tensor, torch.Tensor]:
    """One example, teacher-forced; the model builds its views on its own device (XSAM.prepare), the
    SigLIP view padded to a square as in the paper's evaluation."""
    batch = collate_raw([example], mode, tokenizer, model.cfg)
    batch = model.prepare(batch, siglip_pad_square=EVAL_SIGLIP_PAD_SQUARE)
    _, _, out = model.decode(batch)
    return out["pred_logits"], out["pred_masks"]


def generic_passes(cfg, tokenizer, image: np.ndarray, names: list[str]) -> Passes:
    """The generic prompt over `names`, in as many passes as the text budget needs (`label_chunks`)."""
    h, w = image.shape[:2]
    budget = text_budget(cfg)

    def turns(sub):
        return [(with_image(generic_question(sub, 0)), seg_answer(0))]

    chunks = label_chunks.chunk(names, lambda sub: label_chunks.text_tokens(turns(sub), tokenizer) <= budget)
    examples = [Example(image, turns([names[i] for i in idx]), np.zeros((0, h, w), bool), []) for idx in chunks]
    return Passes(examples, DecodeMode.per_sample, chunks, len(names))


def _generic_passes(model: XSAM, tokenizer, image: np.ndarray, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The generic prompt over `names`, one `_run` per pass -> (logits [1, Q', K + 1], masks [1, Q', h, w])."""
    p = generic_passes(model.cfg, tokenizer, image, names)
    logits, masks = p.merge([tuple(x[0] for x in _run(model, tokenizer, ex, p.mode)) for ex in p.examples])
    return logits[None], masks[None]


GENERIC = (PredictTask.panoptic, PredictTask.semantic, PredictTask.instance)
PHRASE = (PredictTask.referring, PredictTask.reasoning, PredictTask.gres)
VISUAL = (PredictTask.interactive, PredictTask.vgd)


def check_request(req: Request, size: tuple[int, int]) -> None:
    """UserError naming what a request lacks for an image of `size` (H, W): categories (panoptic /
    semantic / instance), a phrase (referring / reasoning / gres), prompt masks [R, H, W] (interactive /
    vgd). Cheap: `predict` calls it, and the command line before it loads a model."""
    task, (h, w) = req.task, size
    if task in GENERIC:
        _categories(req.prompt)
    elif task in PHRASE and not req.prompt:
        raise UserError(f"{task.value} needs a phrase or question as prompt (--prompt); got none")
    elif task in VISUAL:
        pm = req.prompt_masks
        if pm is None or len(pm) == 0:
            raise UserError(f"{task.value} needs prompt_masks [R, {h}, {w}] (--prompt-masks: a .npy of R masks "
                            f"at the image's size); got none")
        if pm.ndim != 3 or tuple(pm.shape[1:]) != (h, w):
            raise UserError(f"{task.value}: prompt_masks of shape {list(pm.shape)}; they must be [R, {h}, {w}] "
                            f"(R masks at the image's size {h}x{w})")


def passes(cfg, tokenizer, image: np.ndarray, req: Request) -> Passes:
    """The teacher-forced passes of a segmentation request (every task but GCG, see `gcg_passes`)."""
    task, (h, w) = req.task, image.shape[:2]
    check_request(req, (h, w))
    if task in GENERIC:
        return generic_passes(cfg, tokenizer, image, _categories(req.prompt))
    if task in PHRASE:
        ex = Example(image, [(with_image(phrase_question(task, str(req.prompt), req.is_sentence)),
                              referring_answer(0))], np.zeros((1, h, w), bool), [0])
        return Passes([ex], DecodeMode.per_phrase)
    if task in VISUAL:
        pm = req.prompt_masks
        question = interactive_question(0) if len(pm) == 1 else vgd_question(len(pm), 0)
        ex = Example(image, [(with_image(question), seg_answer(0))], np.zeros((0, h, w), bool), [],
                     region_masks=pm.astype(bool))
        return Passes([ex], DecodeMode.per_sample)
    raise ValueError(f"{task.value}: generation first (gcg_passes)")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def finish(req: Request, logits: torch.Tensor, masks: torch.Tensor, orig: tuple[int, int], sam_size: int
           ) -> Prediction:
    """One request's merged decoder outputs (logits [Q, K + 1], masks [Q, h, w], on any device) ->
    its Prediction at the original size `orig` (H, W); the post-processing runs where the tensors are."""
    task, (h, w) = req.task, orig
    scaled = scaled_size(orig, sam_size)
    if task in (PredictTask.panoptic, PredictTask.semantic, PredictTask.instance):
        names = _categories(req.prompt)
        if task is PredictTask.semantic:
            seg = postprocess.semantic(logits, masks, scaled, orig)
            present = sorted(int(c) for c in seg.unique())
            return Prediction(task, _np(torch.stack([seg == c for c in present])), [names[c] for c in present],
                              [1.0] * len(present))
        if task is PredictTask.panoptic:
            seg_map, segments = postprocess.panoptic(logits, masks, scaled, orig, req.is_thing or [True] * len(names))
            return Prediction(task, _np(torch.stack([seg_map == s["id"] for s in segments])) if segments
                              else np.zeros((0, h, w), bool), [names[s["category_id"]] for s in segments],
                              [float(s["score"]) for s in segments])
        res = postprocess.instance(logits, masks, scaled, orig)
        return Prediction(task, _np(res["masks"]), [names[int(c)] for c in res["labels"]], res["scores"].tolist())
    if task in (PredictTask.referring, PredictTask.reasoning, PredictTask.gres):
        fn = postprocess.gres if task is PredictTask.gres else postprocess.referring
        return Prediction(task, _np(fn(logits, masks, scaled, orig)[None]), [str(req.prompt)], [1.0])
    if task is PredictTask.interactive:
        pm = req.prompt_masks
        out = [postprocess.interactive(logits[:, [r, -1]], masks, scaled, orig,
                                       torch.from_numpy(np.ascontiguousarray(pm[r])).to(masks.device))
               for r in range(len(pm))]
        return Prediction(task, _np(torch.stack(out)), [f"region {r}" for r in range(len(out))], [1.0] * len(out))
    if task is PredictTask.vgd:
        res = postprocess.vgd(logits, masks, scaled, orig)
        return Prediction(task, _np(res["masks"]), [f"region {int(c)}" for c in res["labels"]], res["scores"].tolist())
    raise ValueError(f"{task.value}: use finish_gcg")


# ------------------------------------------------------------------------------------------- GCG
def gcg_prompt(tokenizer) -> tuple[str, list[int]]:
    """The GCG question (with the image) and the ids greedy generation continues from."""
    question = with_image(gcg_question(0))
    return question, encode_prompt(question, tokenizer)


@dataclass
class GCGParse:
    """A generated GCG answer: the caption, its phrase spans (character offsets) and the teacher-forced
    pass that decodes the phrases' masks (None when no phrase was generated)."""

    caption: str
    spans: list[tuple[int, int]]
    passes: Passes | None
    skipped: str | None = None  # the protocol's reason to skip the answer (xsam.eval.gcg.skip_reason)


def gcg_passes(image: np.ndarray, text: str) -> GCGParse:
    """Generated text (special tokens kept) -> the caption, phrases and the pass decoding their masks: the
    generated answer as it is when its tags are one balanced <p>...</p> per parsed phrase, else the parsed
    caption re-tagged (`templates.gcg_answer`), so the pass has exactly one condition per phrase."""
    from xsam.eval.gcg import skip_reason

    h, w = image.shape[:2]
    caption, spans = parse_gcg(text)
    reason = skip_reason(text)  # the paper's protocol: exactly one <SEG> and at least one <p>...</p>
    if reason is not None or not spans:
        return GCGParse(caption, [], None, skipped=reason or "no phrase")
    answer = text.split(END_TOKEN)[0].rstrip()
    tags = re.findall(r"<p>|</p>", answer)
    if tags != [P_TOKEN, END_P_TOKEN] * len(spans):  # unbalanced, nested or empty tags (free generation):
        answer = gcg_answer(caption, spans, 0)  # the parsed caption, re-tagged: one <p>...</p> per phrase
    question = with_image(gcg_question(0))
    ex = Example(image, [(question, answer)], np.zeros((len(spans), h, w), bool), list(range(len(spans))))
    return GCGParse(caption, spans, Passes([ex], DecodeMode.per_sample))


def finish_gcg(parse: GCGParse, logits: torch.Tensor | None, masks: torch.Tensor | None, orig: tuple[int, int],
               sam_size: int) -> Prediction:
    """The GCG prediction: one mask per phrase (logits [Q, P + 1], masks [Q, h, w]; None without phrases)."""
    if parse.passes is None:
        return Prediction(PredictTask.gcg, np.zeros((0, *orig), bool), [], [], text=parse.caption,
                          skipped=parse.skipped)
    out = postprocess.gcg(logits, masks, scaled_size(orig, sam_size), orig)
    return Prediction(PredictTask.gcg, _np(out), [parse.caption[s:e] for s, e in parse.spans],
                      [1.0] * len(parse.spans), text=parse.caption)


@torch.no_grad()
def predict(model: XSAM, tokenizer, image: np.ndarray, task: PredictTask | str, prompt: str | list[str] | None = None,
            prompt_masks: np.ndarray | None = None, is_thing: list[bool] | None = None,
            max_new_tokens: int = 128, is_sentence: bool = True) -> Prediction:
    """image [H, W, 3] uint8 RGB; prompt: categories (panoptic / semantic / instance), a phrase or
    question (referring / reasoning / gres), nothing (gcg); prompt_masks [R, H, W] bool (interactive / vgd).
    is_sentence: a reasoning query is a sentence (REASONING_QUESTIONS) or a phrase (the short questions).
    One request, one pass at a time (xsam.eval.engine batches many)."""
    req = Request(task, prompt, prompt_masks, is_thing, is_sentence)
    model.eval()
    orig, size = image.shape[:2], model.cfg.sam.image_size
    if req.task is not PredictTask.gcg:
        p = passes(model.cfg, tokenizer, image, req)
        logits, masks = p.merge([tuple(x[0] for x in _run(model, tokenizer, ex, p.mode)) for ex in p.examples])
        return finish(req, logits, masks, orig, size)
    # GCG: generate, parse the phrases, then decode them teacher-forced
    question, ids = gcg_prompt(tokenizer)
    batch = collate_raw([Example(image, [(question, "")])], DecodeMode.none, tokenizer, model.cfg)
    batch.input_ids = [torch.tensor(ids)]
    batch.labels = [torch.full_like(batch.input_ids[0], -100)]
    batch = model.prepare(batch, siglip_pad_square=EVAL_SIGLIP_PAD_SQUARE)
    generated = model.generate(batch, max_new_tokens, token_id(tokenizer, END_TOKEN))[0]
    parse = gcg_passes(image, tokenizer.decode(generated, skip_special_tokens=False))
    if parse.passes is None:
        return finish_gcg(parse, None, None, orig, size)
    logits, masks = _run(model, tokenizer, parse.passes.examples[0], parse.passes.mode)
    return finish_gcg(parse, logits[0], masks[0], orig, size)


def overlay(image: np.ndarray, pred: Prediction, alpha: float = 0.5) -> Image.Image:
    """The image with each mask tinted in its own colour (deterministic palette)."""
    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(0)
    for mask in pred.masks:
        colour = rng.integers(40, 256, size=3).astype(np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" / None -> cuda when a GPU is visible (e.g. the one Ray gave this actor), else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no GPU is visible to this process")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"bf16" / "fp32" / a torch dtype; "auto" / None -> bf16 on a GPU, fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def load_for_inference(checkpoint: str | Path, tokenizer: str | Path | None = None,
                       device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = "fp32"):
    """A stage export (folder or s3:// prefix, as written by xsam.model.export; read directly and
    checked complete) -> (model, tokenizer), ready for `predict`, its parameters on `device` ("auto":
    cuda when a GPU is visible) in `dtype` ("bf16" / "fp32"; "auto": bf16 on a GPU). The tokenizer is the
    export's own unless a tokenizer folder is given."""
    from transformers import AutoTokenizer

    from xsam.model.builder import build_model
    from xsam.model.checkpoint import load_stage_state
    from xsam.model.config import XSAMConfig
    from xsam.model.export import load_export, load_tokenizer
    from xsam.model.stages import S3
    from xsam.model.tokenizer import SPECIAL_TOKENS, add_special_tokens

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tok = load_tokenizer(checkpoint) if tokenizer is None else AutoTokenizer.from_pretrained(str(tokenizer))
    add_special_tokens(tok)
    state, manifest = load_export(checkpoint)
    if manifest.get("stage") != S3.name:  # an S1 / S2 export has untrained parts every task goes through
        raise UserError(f"{checkpoint}: a stage {manifest.get('stage')} export; predict and evaluate need a stage "
                         f"{S3.name} export (every task runs the LLM, the projectors and the segmentor trained in S3)")
    cfg = XSAMConfig.from_dict(manifest["config"])
    model = build_model(cfg, S3.parts, len(tok))
    missing = sorted({k.split(".", 1)[0] for k in model.state_dict()} - {k.split(".", 1)[0] for k in state})
    if missing:
        raise UserError(f"{checkpoint}: the export lacks the parts {missing} that prediction needs")
    load_stage_state(model, state)
    del state
    model.special_ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    model.siglip_pad_square = EVAL_SIGLIP_PAD_SQUARE  # the processor settings come with the export's config
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval(), tok


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 RGB; UserError naming the file when it is missing or not an image."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # writable: torch.from_numpy warns on a read-only array
    except FileNotFoundError:
        raise UserError(f"--image {path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated data
        raise UserError(f"--image {path}: not a readable image ({e})") from None


def read_prompt_masks(path: str | Path) -> np.ndarray:
    """A .npy of [R, H, W] masks -> a bool array; UserError naming the file when it cannot be read."""
    try:
        masks = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--prompt-masks {path}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"--prompt-masks {path}: not a .npy array ({e})") from None
    if masks.dtype.kind not in "biu":
        raise UserError(f"--prompt-masks {path}: dtype {masks.dtype}; masks are bool (or 0/1 integers)")
    return masks.astype(bool)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported S3 checkpoint (folder or s3:// prefix)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the export's own)")
    p.add_argument("--image", required=True)
    p.add_argument("--task", required=True, choices=[t.value for t in PredictTask])
    p.add_argument("--prompt", help="categories (comma-separated) or a referring phrase")
    p.add_argument("--prompt-masks", help=".npy file of [R, H, W] bool visual prompts")
    p.add_argument("--out", default="overlay.png")
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="parameters and activations: bf16 | fp32 (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("-v", "--verbose", action="store_true", help="a traceback with every error")
    args = p.parse_args(argv)
    with cli_errors("predict", "verbose" if args.verbose else "normal"):
        # the inputs first (cheap), then the model: a mistake is answered before minutes of loading
        image = read_image(args.image)
        prompt_masks = read_prompt_masks(args.prompt_masks) if args.prompt_masks else None
        check_request(Request(args.task, args.prompt, prompt_masks), image.shape[:2])
        if not Path(args.out).resolve().parent.is_dir():
            raise UserError(f"--out {args.out}: the folder {Path(args.out).resolve().parent} does not exist")
        model, tok = load_for_inference(args.checkpoint, args.tokenizer, device=args.device, dtype=args.dtype)
        pred = predict(model, tok, image, args.task, args.prompt, prompt_masks)
    overlay(image, pred).save(args.out)
    print(json.dumps({"task": pred.task.value, "labels": pred.labels, "scores": [round(s, 4) for s in pred.scores],
                      "areas": [int(m.sum()) for m in pred.masks], "text": pred.text, "overlay": args.out}))


if __name__ == "__main__":
    main()
