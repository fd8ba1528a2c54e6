"""A tiny X-SAM overfits a two-image batch of each segmentation task (seeded, CPU)."""

import pytest
import torch

from model_fixtures import gcg_example, generic_example, referring_example, tiny_model, tiny_tokenizer, vgd_example
from xsam.model.batching import collate
from xsam.model.xsam import DecodeMode

TASKS = {
    "generic": (generic_example, DecodeMode.per_sample),
    "referring": (referring_example, DecodeMode.per_phrase),
    "gcg": (gcg_example, DecodeMode.per_sample),
    "vgd": (vgd_example, DecodeMode.per_sample),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tiny_model_overfits_two_images(tok, task):
    maker, mode = TASKS[task]
    cfg, model = tiny_model(tok, "s3", seed=0)
    batch = collate([maker(1), maker(2)], mode, tok, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    torch.manual_seed(0)
    history = []
    for _ in range(200):
        losses, _ = model(batch)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first = sum(h["total"] for h in history[:5]) / 5
    last = sum(h["total"] for h in history[-5:]) / 5
    assert last <= 0.2 * first, (task, first, last)
    seg_first = sum(h["loss_mask"] + h["loss_dice"] for h in history[:5])
    seg_last = sum(h["loss_mask"] + h["loss_dice"] for h in history[-5:])
    assert seg_last <= 0.5 * seg_first, (task, seg_first, seg_last)
    assert history[-1]["lm"] < 0.25 * history[0]["lm"]
