"""What the LLM and the decoder see per training sample of a source: text tokens, labelled tokens,
decoder items. Measured on converted shards through the real formatter and tokenizer, or, before
conversion, a stated assumption per source.

    stats = measure_text(shards, "refcoco", "train", "s3", tokenizer, cfg, n=200, seed=0)

The measurement reads the first `n` samples of one seeded-random shard of the split (a random draw:
members are sorted by hashed keys) in one sequential pass over the tar, formats each with `Formatter(stage)` under a generator seeded
by (seed, position) and tokenises every example with `encode_chat` at the model's text budget - the
same calls the training loader and collator make. Per example it records:

    text tokens   ids besides the <image> placeholder (a <region> placeholder counts as the 1 token it
                  becomes); the LLM sequence is num_visual_tokens + this
    labelled      ids with a label (the LM head runs on these only)
    items         decoder items: 0 chat, 1 per-sample tasks, one per <SEG> phrase for per-phrase tasks
    conditions    <p> spans (the cosine head's classes)

Samples that format to nothing (no usable target: the loader skips them) are left out.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

import numpy as np

from xsam.data import storage
from xsam.data.schema import Sample
from xsam.data.shards import manifest_location, split_dir, split_manifest
from xsam.model.batching import text_budget
from xsam.model.config import XSAMConfig
from xsam.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, P_TOKEN, encode_chat, token_id
from xsam.model.xsam import DecodeMode
from xsam.train.formatting import Formatter


@dataclass(frozen=True)
class TextStats:
    """Per stored sample of one source. `lengths`: text tokens of each measured example (one value,
    the mean, for an assumption); the other fields are means per example."""

    examples: float  # formatted examples per sample (referring chunks give several)
    lengths: tuple[float, ...]
    labelled: float
    items: float
    conditions: float
    basis: str  # "measured: ..." or "assumed: ..."

    @property
    def text_tokens(self) -> float:
        return float(np.mean(self.lengths))

    @property
    def measured(self) -> bool:
        return self.basis.startswith("measured")


def _assumed(examples, text, labelled, items, conditions, why) -> TextStats:
    return TextStats(examples, (float(text),), labelled, items, conditions, f"assumed: {why}")


# Before conversion: per source of the paper profile, what a Phi-3 (Llama SentencePiece, ~1.3 tokens per
# English word; <p>, </p>, <SEG> one token each; ~8 tokens of chat frame per turn) example looks like.
ASSUMED: dict[str, TextStats] = {
    "llava_pretrain_558k": _assumed(1, 36, 16, 0, 0, "LCS-558K: a ~10-word instruction, a ~12-word BLIP caption"),
    "llava_v1_5_mix665k": _assumed(1, 260, 120, 0, 0, "VQA turns of ~15 tokens x ~10 and LLaVA-Instruct answers "
                                                     "of 200-400 tokens, mixed"),
    "coco_panoptic": _assumed(1, 430, 6, 1, 67, "~7 present + ~60 negative category names (randint(0, 128 - #pos))"
                                                " at ~6 tokens per '<p>name</p>, '"),
    "refcoco": _assumed(1, 75, 15, 2.5, 2.5, "2.5 objects per image, one turn each (~29 tokens: template, "
                                             "3.6-word phrase, answer)"),
    "refcoco_plus": _assumed(1, 75, 15, 2.5, 2.5, "as refcoco (3.5-word phrases)"),
    "refcocog": _assumed(1, 82, 14, 2.3, 2.3, "2.3 objects per image, 8.4-word phrases"),
    "reasonseg": _assumed(1, 63, 26, 1, 1, "~15-word query; half the reads add a ~30-word explanation"),
    "grandf": _assumed(1, 110, 82, 1, 5, "~50-word grounded caption with ~5 phrases"),
    "refcocog_gcg": _assumed(1, 82, 55, 1, 3, "~30-word caption from referring expressions, ~3 phrases"),
    "psg_gcg": _assumed(1, 82, 55, 1, 4, "~30-word scene-graph caption, ~4 phrases"),
    "flickr30k_gcg": _assumed(1, 60, 33, 1, 3, "~15-word Flickr30k caption, ~3 phrases"),
    "coco_vgd": _assumed(1, 70, 6, 1, 7, "~7 prompted categories, '<p><region></p>, ' each"),
}
# a source not in the table (e.g. the fixtures) before conversion
DEFAULT_ASSUMED = {
    "s2": _assumed(1, 36, 16, 0, 0, "no figure for this source: a short caption chat"),
    "s3": _assumed(1, 100, 30, 1, 3, "no figure for this source: a short segmentation prompt"),
}


def assumed_text(dataset: str, stage: str) -> TextStats:
    return ASSUMED.get(dataset) or DEFAULT_ASSUMED[stage]


# --------------------------------------------------------------------------- measuring
def sample_split(root: str, dataset: str, split: str, n: int, seed: int) -> list[tuple[int, Sample, bytes]]:
    """The first `n` samples of one seeded-random shard of a converted split -> [(position in the shard,
    sample, image bytes)]. Shard members are sorted by key and keys hash (dataset, split, source id), so
    the first n of a shard are a random draw from it; the tar is read sequentially and left after them."""
    directory = split_dir(root, dataset, split)
    manifest = split_manifest(root, dataset, split)
    if manifest is None:
        raise FileNotFoundError(f"{manifest_location(root, dataset, split)} does not exist: {dataset}/{split} is not converted")
    shards = [s for s in manifest.shards if s.num_samples]
    if not shards or n <= 0:
        return []
    shard = shards[int(np.random.default_rng(seed).integers(len(shards)))]
    fs, path = storage.resolve(storage.join(directory, shard.name))
    out, members, key = [], {}, None
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            k, _, ext = m.name.partition(".")
            if k != key:
                if len(out) == n:
                    break
                key, members = k, {}
            if m.isfile():
                members[ext] = tar.extractfile(m).read()
            if len(members) == 2:
                record = members.pop("json")
                ((_, image),) = members.items()
                out.append((len(out), Sample.from_json_bytes(record), image))
                members = {}
    return out


def measure_text(root: str, dataset: str, split: str, stage: str, tokenizer, cfg: XSAMConfig, n: int = 200,
                 seed: int = 0) -> TextStats:
    """Format and tokenise a seeded sample of a converted split (see the module docstring)."""
    directory = split_dir(root, dataset, split)
    manifest = split_manifest(root, dataset, split)
    label_spaces = {manifest.label_space: manifest.categories} if manifest and manifest.label_space else {}
    formatter = Formatter(stage, label_spaces, sam_size=cfg.sam.image_size)
    budget, p_id = text_budget(cfg), token_id(tokenizer, P_TOKEN)
    examples, lengths, labelled, items, conditions = [], [], [], [], []
    for position, sample, image in sample_split(root, dataset, split, n, seed):
        formatted = formatter(sample, image, np.random.default_rng([seed, position]))
        if not formatted:
            continue
        examples.append(len(formatted))
        for f in formatted:
            ids, labels = encode_chat(f.example.turns, tokenizer, budget)
            lengths.append(sum(i != IMAGE_TOKEN_INDEX for i in ids))
            labelled.append(sum(label != IGNORE_INDEX for label in labels))
            conditions.append(ids.count(p_id))
            items.append(0 if f.mode is DecodeMode.none else
                         1 if f.mode is DecodeMode.per_sample else len(f.example.masks))
    if not examples:
        raise ValueError(f"{dataset}/{split}: no sampled record formats to a {stage} example")
    return TextStats(float(np.mean(examples)), tuple(float(x) for x in lengths), float(np.mean(labelled)),
                     float(np.mean(items)), float(np.mean(conditions)),
                     f"measured: {len(examples)} samples, {len(lengths)} examples")
