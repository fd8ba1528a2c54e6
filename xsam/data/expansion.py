"""How many training records the X-SAM recipe makes of one stored sample, and which record is which.

A stored sample is one image. The original's referring datasets (RefSegDataset, branch AAAI26_Archive)
expand an image into several training records at load time, and the balancer then sees the EXPANDED
length of each dataset; the project keeps one stored sample per image and expands on read:

- referring_seg / gres: each referring object of the image keeps its sentences lowercased, deduplicated
  and sorted (`referring_objects`). With S_j the sentences of object j, the image gives
  ``min(prod_j |S_j|, sum_j |S_j|)`` records (the first ``sum_j |S_j|`` elements of
  ``itertools.product(S_1, S_2, ...)``); record k carries EVERY object of the image, object j with
  sentence ``combination(sizes, k)[j]``, as one multi-turn conversation (no chunking).
- every other task: one record per sample (ReasonSeg: all queries of the image are turns of its one
  record; generic, GCG, VGD, chat: one record per image).

`num_records` is what the converter sums into the manifest (``Manifest.num_records``), so training can
hand the per-dataset expansion ``num_records / num_samples`` to `xsam.train.sampling.Schedule` and its
r_d = max(1, sqrt(t / f_d)) sees the f_d of the original. The formatter draws k in [0, num_records)
per read (`xsam.train.formatting`).

Objects: a ReferringExpression with at least one segment and one non-empty sentence (after the prompt
markers are removed, `clean`); gres expressions without a target are not objects (as the original).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from xsam.data.schema import Sample, Task

# bump when the expansion rule changes: the converter's fingerprint carries it (manifests re-count)
EXPANSION_VERSION = 1

MARKER_RE = re.compile(r"<image>|<region>|<SEG>|<p>|</p>")  # the prompt markers (xsam.model.tokenizer)
_EXPANDED = frozenset({Task.referring_seg, Task.gres})


def clean(text: str) -> str:
    """Source text for a template: prompt markers removed, outer whitespace stripped."""
    return MARKER_RE.sub("", text).strip()


def referring_objects(sample: Sample) -> list[tuple[list[str], list[int]]]:
    """[(sentences, segment_ids)] per object, sentences cleaned, lowercased, deduplicated, sorted."""
    out = []
    for ref in sample.referring:
        sentences = sorted({c.lower() for c in (clean(s) for s in ref.sentences) if c})
        if ref.segment_ids and sentences:
            out.append((sentences, list(ref.segment_ids)))
    return out


def count(sizes: Sequence[int]) -> int:
    """Records of an image whose objects have `sizes` sentences each: min(prod, sum); 0 without objects."""
    if not sizes:
        return 0
    return min(math.prod(sizes), sum(sizes))


def combination(sizes: Sequence[int], k: int) -> tuple[int, ...]:
    """The k-th element of ``itertools.product(*(range(n) for n in sizes))`` (last index fastest)."""
    total = math.prod(sizes)
    if not 0 <= k < total:
        raise ValueError(f"record {k} out of range for sentence counts {list(sizes)}")
    out = []
    for n in reversed(sizes):
        k, r = divmod(k, n)
        out.append(r)
    return tuple(reversed(out))


def num_records(sample: Sample) -> int:
    """Training records of one stored sample (1 for every task but referring / gres)."""
    if sample.task in _EXPANDED:
        return count([len(s) for s, _ in referring_objects(sample)])
    return 1
