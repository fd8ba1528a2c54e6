"""Evaluation overlays people can read: ground truth and prediction side by side, for one sample.

    png = sample_overlay(bench, sample, image, queries, preds)   # PNG bytes (PIL only)

The picture: a title (benchmark, sample, the shown request: the referring sentence, the category count,
the prompt type), two panels - GROUND TRUTH (left) and PREDICTION (right) - each the image scaled so its
long side is `PANEL` px (512) with every mask tinted and outlined in its label's colour and the label
written on the mask (predictions with their score), and a legend under the panels: one swatch per
label, the same colour on both sides. Visual prompts (interactive / VGD) are drawn as white outlines on
both panels.

What is shown is the sample's FIRST query (deterministic): its ground truth by task
- generic (panoptic / semantic / instance), GCG: every segment, named by its category (GCG: "segment k");
- referring / gres / reasoning: the union of the query's target segments, named by the sentence;
- interactive: the prompted segment, named by its category;
- VGD: the prompt type's ground truth (`instance.vgd_ground_truth`), named by category; the predicted
  "region k" labels are mapped back to the category of the k-th prompt, as scoring does.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xsam.data import masks as rle
from xsam.data.schema import Sample, Task

PANEL = 512  # long side of each panel, px
PAD, TITLE_H, CAPTION_H, LEGEND_ROW = 12, 30, 24, 22
ALPHA = 0.5
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
            (0, 0, 128), (128, 128, 128)]

Region = tuple[np.ndarray, str]  # (bool mask [H, W], label)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's scalable embedded font (needs FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _short(text: str, n: int = 48) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _cat_names(bench) -> dict[int, str]:
    return {int(c["id"]): str(c["name"]) for c in (bench.categories or [])}


def ground_truth(bench, sample: Sample, query) -> tuple[list[Region], str]:
    """The ground-truth regions shown for `query` and the title's description of the request."""
    names = _cat_names(bench)
    by_id = {s.id: s for s in sample.segments}

    def seg(s, label=None) -> Region:
        return rle.decode(s.mask).astype(bool), label or names.get(s.category_id, f"category {s.category_id}")

    task = bench.task
    if task in (Task.referring_seg, Task.gres, Task.reasoning_seg):
        shape = (sample.image.height, sample.image.width)
        union = np.zeros(shape, bool)
        for i in query.target or []:
            union |= rle.decode(by_id[i].mask).astype(bool)
        text = _short(query.request.prompt or "", 40)
        return ([(union, text)] if union.any() else []), f'"{_short(query.request.prompt or "", 90)}"'
    if task is Task.interactive:
        segment_id, ptype = query.target
        return [seg(by_id[segment_id])], f"{getattr(ptype, 'value', ptype)} prompt"
    if task is Task.vgd:
        from xsam.eval.instance import vgd_ground_truth

        ptype, cats = query.target
        regions = [(rle.decode(g["mask"]).astype(bool), names.get(g["category_id"], str(g["category_id"])))
                   for g in vgd_ground_truth(sample, ptype)]
        return regions, f"{ptype.value} prompts, {len(cats)} categories"
    if task is Task.gcg:
        return [seg(s, f"segment {k}") for k, s in enumerate(sample.segments)], \
            _short(sample.gcg.caption, 90) if sample.gcg else "grounded caption"
    n = len(bench.categories or [])
    return [seg(s) for s in sample.segments], f"{task.value}, {n} categories"


def prediction(bench, query, pred) -> list[Region]:
    """The predicted regions with their labels (VGD "region k" -> the k-th prompt's category), score appended."""
    names = _cat_names(bench)
    out = []
    for k, mask in enumerate(pred.masks):
        label = pred.labels[k] if k < len(pred.labels) else ""
        if bench.task is Task.vgd and label.startswith("region "):
            _, cats = query.target
            label = names.get(cats[int(label.split()[-1])], label)
        elif bench.task in (Task.referring_seg, Task.gres, Task.reasoning_seg):
            label = _short(query.request.prompt or "", 40)
        out.append((np.asarray(mask, bool), label))
    return out


def _scaled(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def _edge(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _anchor(mask: np.ndarray) -> tuple[int, int] | None:
    """A point inside the mask near its centroid (x, y), None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return int(xs[k]), int(ys[k])


def _panel(image: np.ndarray, regions: list[Region], colours: dict[str, tuple], size: tuple[int, int],
           prompts: list[np.ndarray], scores: list[float] | None, font) -> Image.Image:
    base = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)).astype(np.float32)
    scaled = [(_scaled(m, size), label) for m, label in regions]
    for m, label in scaled:
        c = np.array(colours[label], np.float32)
        base[m] = (1 - ALPHA) * base[m] + ALPHA * c
        base[_edge(m)] = c
    for p in prompts:
        base[_edge(_scaled(p, size))] = 255.0
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for k, (m, label) in enumerate(scaled):
        at = _anchor(m)
        if at is None:
            continue
        text = label if scores is None else f"{label} {scores[k]:.2f}"
        box = draw.textbbox(at, text, font=font, anchor="mm")
        draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
        draw.text(at, text, fill=colours[label], font=font, anchor="mm")
    return out


def render(image: np.ndarray, gt: list[Region], pred: list[Region], title: str,
           scores: list[float] | None = None, prompts: list[np.ndarray] | None = None) -> Image.Image:
    """The side-by-side picture of `image` [H, W, 3] uint8 with ground-truth and predicted regions."""
    h, w = image.shape[:2]
    s = PANEL / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    labels = list(dict.fromkeys([label for _, label in gt] + [label for _, label in pred]))
    colours = {label: _PALETTE[k % len(_PALETTE)] for k, label in enumerate(labels)}
    font, small = _font(15), _font(13)
    left = _panel(image, gt, colours, size, prompts or [], None, small)
    right = _panel(image, pred, colours, size, prompts or [], scores, small)
    width = 2 * size[0] + 3 * PAD
    # legend: swatch + label, wrapped to the canvas width
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, row, x = [], [], PAD
    for label in labels or ["(no regions)"]:
        wlab = 18 + int(probe.textlength(label, font=font)) + 16
        if row and x + wlab > width - PAD:
            rows.append(row)
            row, x = [], PAD
        row.append((x, label))
        x += wlab
    rows.append(row)
    height = TITLE_H + CAPTION_H + size[1] + PAD + len(rows) * LEGEND_ROW + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 7), _short(title, 120), fill=(0, 0, 0), font=font)
    y0 = TITLE_H + CAPTION_H
    draw.text((PAD, TITLE_H + 3), f"ground truth ({len(gt)})", fill=(0, 0, 0), font=font)
    draw.text((2 * PAD + size[0], TITLE_H + 3), f"prediction ({len(pred)})", fill=(0, 0, 0), font=font)
    canvas.paste(left, (PAD, y0))
    canvas.paste(right, (2 * PAD + size[0], y0))
    y = y0 + size[1] + PAD
    for r in rows:
        for x, label in r:
            if label in colours:
                draw.rectangle((x, y + 3, x + 13, y + 16), fill=colours[label], outline=(0, 0, 0))
            draw.text((x + 18, y + 2), label, fill=(0, 0, 0), font=font)
        y += LEGEND_ROW
    return canvas


def sample_overlay(bench, sample: Sample, image: np.ndarray, queries: list, preds: list[Any]) -> bytes | None:
    """PNG bytes of the overlay of the sample's first query (module docstring); None without a query."""
    if not queries:
        return None
    query, pred = queries[0], preds[0]
    gt, what = ground_truth(bench, sample, query)
    prompts = list(query.request.prompt_masks) if query.request.prompt_masks is not None else []
    title = f"{bench.name}  {sample.provenance.source_id}: {what}"
    picture = render(image, gt, prediction(bench, query, pred), title, scores=list(pred.scores), prompts=prompts)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()
