"""The device transform (xsam.model.preprocess) against the CPU references it replaces: the former
per-image `image_views` / `mask_targets` (kept below, verbatim in substance, as the reference) and
`augment.large_scale_jitter` (PIL + numpy). Masks are EQUAL; SAM views within float rounding (1e-4),
SigLIP views within 1 grey level of PIL's resize; the S1 jitter image within 1 grey level of PIL's
(PIL rounds to uint8 between its two passes).
Runs on the CPU, and on CUDA as well where one is present (same tolerances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_fixtures import generic_example, referring_example, tiny_model, tiny_tokenizer, vgd_example
from PIL import Image

from xsam.model import preprocess as P
from xsam.model.batching import collate, collate_raw
from xsam.model.xsam import DecodeMode, S1Batch
from xsam.train.augment import draw_jitter, large_scale_jitter

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [(48, 64), (64, 48), (37, 91), (128, 128), (300, 200)]  # smaller, equal to and larger than the frame
SIGLIP, SAM = 56, 128


def reference_views(image: np.ndarray, siglip_size: int, sam_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path before the device transform (per image, float, channels-last input); the SigLIP view
    as SiglipImageProcessor makes it: PIL bicubic, horizontal pass first (tests/model/test_siglip_view.py)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
    h, w = image.shape[:2]
    pil = Image.fromarray(image).resize((siglip_size, h), Image.BICUBIC)
    pil = pil.resize((siglip_size, siglip_size), Image.BICUBIC)
    sig = (torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None] / 255.0 - 0.5) / 0.5
    sh, sw = P.scaled_size((h, w), sam_size)
    sam = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    sam = (sam - torch.tensor(P.SAM_MEAN)[:, None, None]) / torch.tensor(P.SAM_STD)[:, None, None]
    return sig[0], F.pad(sam, (0, sam_size - sw, 0, sam_size - sh))[0]


def reference_masks(masks: np.ndarray, sam_size: int) -> torch.Tensor:
    h, w = masks.shape[1:]
    sh, sw = P.scaled_size((h, w), sam_size)
    m = F.interpolate(torch.from_numpy(masks.astype(np.uint8))[:, None], size=(sh, sw), mode="nearest")[:, 0]
    return F.pad(m, (0, sam_size - sw, 0, sam_size - sh)).bool()


def sample(seed: int, h: int, w: int, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image and n random masks stored as pycocotools decodes them (column-major planes)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    masks = np.stack([np.asfortranarray(rng.random((h, w)) > 0.6) for _ in range(n)])
    return image, masks


@pytest.mark.parametrize("device", DEVICES)
def test_views_and_masks_equal_the_cpu_reference(device):
    images, masks = zip(*(sample(k, h, w) for k, (h, w) in enumerate(SIZES)))
    sig, sam = P.views([P.image_tensor(im).to(device) for im in images], SIGLIP, SAM)  # batched by size
    framed = P.frame_mask_list([torch.from_numpy(m).to(device) for m in masks] + [None], SAM)
    assert sig.shape == (len(SIZES), 3, SIGLIP, SIGLIP) and sam.shape == (len(SIZES), 3, SAM, SAM)
    assert framed[-1] is None
    for b, (image, m) in enumerate(zip(images, masks)):
        ref_sig, ref_sam = reference_views(image, SIGLIP, SAM)
        # within one grey level of PIL (2/255 after the normalisation by std 0.5)
        assert torch.allclose(sig[b].cpu(), ref_sig, atol=2 / 255 + 1e-6), (b, (sig[b].cpu() - ref_sig).abs().max())
        assert torch.allclose(sam[b].cpu(), ref_sam, atol=1e-4), (b, (sam[b].cpu() - ref_sam).abs().max())
        assert framed[b].dtype == torch.bool and torch.equal(framed[b].cpu(), reference_masks(m, SAM))
        sh, sw = P.scaled_size(image.shape[:2], SAM)
        assert not sam[b, :, sh:].any() and not sam[b, :, :, sw:].any()  # padding is exactly zero


def test_same_size_images_are_resized_in_one_call_with_the_same_result():
    images = [P.image_tensor(sample(k, 40, 70)[0]) for k in range(3)] + [P.image_tensor(sample(9, 70, 40)[0])]
    sig, sam = P.views(images, SIGLIP, SAM)
    for b, im in enumerate(images):
        one_sig, one_sam = P.views([im], SIGLIP, SAM)
        assert torch.allclose(sig[b], one_sig[0], atol=1e-5) and torch.allclose(sam[b], one_sam[0], atol=1e-5)
    assert P.views(images, None, SAM)[0] is None


@pytest.mark.parametrize("device", DEVICES)
def test_jitter_crop_equals_large_scale_jitter(device):
    """S1: geometry drawn on the CPU; resize / crop / pad on the device == the PIL + numpy reference."""
    size, worst = 96, 0.0
    for seed in range(24):
        rng = np.random.default_rng(seed)
        h, w = int(rng.integers(12, 150)), int(rng.integers(12, 150))
        image, masks = sample(seed, h, w, n=4)
        ref = large_scale_jitter(image, masks, np.random.default_rng(seed), size)
        scale, crop = draw_jitter(h, w, np.random.default_rng(seed), size)  # the same one draw
        assert scale == ref.scale and crop.offset == ref.offset and crop.valid == ref.valid_size
        got = P.crop_masks(torch.from_numpy(masks).to(device), crop, size)
        assert got.dtype == torch.bool and torch.equal(got.cpu(), torch.from_numpy(ref.masks)), seed
        x = P.crop_view(P.image_tensor(image).to(device), crop, size).cpu()
        ch, cw = crop.valid
        assert not x[:, ch:].any() and not x[:, :, cw:].any()
        grey = x[:, :ch, :cw] * torch.tensor(P.SAM_STD)[:, None, None] + torch.tensor(P.SAM_MEAN)[:, None, None]
        diff = (grey - torch.from_numpy(ref.image[:ch, :cw]).permute(2, 0, 1).float()).abs().max().item()
        worst = max(worst, diff)
    assert worst <= 1.0 + 1e-3, worst  # PIL's intermediate uint8 rounding, nothing more


def test_jitter_masks_follow_torch_nearest_exact():
    """The gather convention is torch's "nearest-exact" (on a resize without crop)."""
    _, masks = sample(3, 50, 70, n=2)
    for resized in ((25, 35), (100, 140), (61, 83)):
        crop = P.ResizeCrop(resized=resized, offset=(0, 0), valid=resized)
        got = P.crop_masks(torch.from_numpy(masks), crop, 160)[:, :resized[0], :resized[1]]
        ref = F.interpolate(torch.from_numpy(masks.astype(np.uint8))[:, None], size=resized, mode="nearest-exact")
        assert torch.equal(got, ref[:, 0].bool())


# --------------------------------------------------------------------------- batches at the model boundary
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def s3_model(tok):
    return tiny_model(tok)


def _tensors(x):
    """Every tensor of a batch (any nesting), in a fixed order."""
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for k in sorted(x):
            yield from _tensors(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "__dataclass_fields__"):
        for k in x.__dataclass_fields__:
            yield from _tensors(getattr(x, k))


@pytest.mark.parametrize("maker,mode", [(generic_example, DecodeMode.per_sample),
                                        (referring_example, DecodeMode.per_phrase),
                                        (vgd_example, DecodeMode.per_sample)])
def test_raw_batch_ships_compact_and_prepares_to_the_collated_batch(tok, s3_model, maker, mode):
    cfg, model = s3_model
    examples = [maker(1), maker(2)]
    raw = collate_raw(examples, mode, tok, cfg)
    assert raw.raw and raw.sam_pixels is None and len(raw) == 2
    assert all(im.dtype == torch.uint8 and im.shape == (3, *ex.image.shape[:2]) for im, ex in zip(raw.images, examples))
    for m in [t["masks"] for t in raw.targets] + [m for m in raw.region_masks if m is not None]:
        assert m.dtype == torch.bool and m.shape[1:] == examples[0].image.shape[:2]  # original size
    assert not any(t.is_floating_point() for t in _tensors(raw))  # nothing float is shipped

    prepared = model.prepare(raw)
    expected = collate(examples, mode, tok, cfg)  # the CPU fallback
    assert not prepared.raw and prepared.images is None and not expected.raw
    assert torch.equal(prepared.sam_pixels, expected.sam_pixels)
    assert torch.equal(prepared.siglip_pixels, expected.siglip_pixels)
    for a, b in zip(prepared.targets, expected.targets, strict=True):
        assert a["masks"].dtype == torch.bool and a["masks"].shape[1:] == (cfg.sam.image_size,) * 2
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])
    for a, b in zip(prepared.region_masks, expected.region_masks, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert model.prepare(prepared) is prepared  # a prepared batch passes through


def test_forward_on_a_raw_batch_equals_forward_on_the_collated_one(tok, s3_model):
    cfg, model = s3_model
    examples = [vgd_example(1), vgd_example(2)]  # regions and targets
    torch.manual_seed(0)  # the criterion's point sampling
    loss_raw, _ = model(collate_raw(examples, DecodeMode.per_sample, tok, cfg))
    torch.manual_seed(0)
    loss_prepared, _ = model(collate(examples, DecodeMode.per_sample, tok, cfg))
    assert {k: v.item() for k, v in loss_raw.items()} == {k: v.item() for k, v in loss_prepared.items()}


def test_raw_s1_batch_prepares_on_the_model_device(tok):
    cfg, model = tiny_model(None, "s1")
    image, masks = sample(5, 60, 90, n=2)
    _, crop = draw_jitter(60, 90, np.random.default_rng(1), cfg.sam.image_size)
    raw = S1Batch(images=[P.image_tensor(image), P.image_tensor(image)],
                  targets=[{"labels": torch.tensor([0, 1]), "masks": torch.from_numpy(masks)}] * 2, crops=[crop, None])
    prepared = model.prepare(raw)
    size = cfg.sam.image_size
    assert prepared.sam_pixels.shape == (2, 3, size, size) and len(prepared) == 2 and not prepared.raw
    assert torch.equal(prepared.targets[0]["masks"], P.crop_masks(torch.from_numpy(masks), crop, size))
    assert torch.equal(prepared.targets[1]["masks"], reference_masks(masks, size))  # no crop: the plain SAM view
    assert torch.allclose(prepared.sam_pixels[1], reference_views(image, 8, size)[1], atol=1e-4)
    losses, _ = model(raw)
    assert torch.isfinite(losses["total"])
