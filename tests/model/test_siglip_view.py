"""The SigLIP view (`preprocess.siglip_view`) against transformers' own SiglipImageProcessor built from a
local preprocessor_config.json (no hub): within 1 grey level (1/255 in [0, 1] pixel units) of the
processor, with and without LLaVA's expand2square in front (the paper: S2 training and every evaluation
pad, S3 training does not); the processor settings travel from the checkpoint folder to the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_fixtures import referring_example, tiny_model, tiny_tokenizer
from PIL import Image
from transformers import SiglipImageProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from xsam.model import preprocess as P
from xsam.model.batching import collate_raw
from xsam.model.config import SiglipConfig, SiglipProcessing, XSAMConfig, tiny
from xsam.model.encoders import SiglipEncoder
from xsam.model.predict import predict
from xsam.model.weights import WeightLoadError, load_siglip
from xsam.model.xsam import DecodeMode
from xsam.train.config import load_profile, profile_path

SIGLIP_JSON = {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
               "do_resize": True, "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
               "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5]}
# other settings, to see that they are read, not assumed: CLIP's mean / std, bilinear
CLIP_JSON = {**SIGLIP_JSON, "resample": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711]}
PROCESSORS = {"torchvision": SiglipImageProcessor, "pil": SiglipImageProcessorPil}
ONE_LEVEL = 1 / 255 + 1e-6  # in [0, 1] pixel units


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """[h, w, 3] uint8, photo-like: smooth gradients, fine texture, hard edges (cubic overshoot) and thin lines."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 100 * np.sin(xx / 37 + yy / 53), 128 + 90 * np.cos(yy / 29 - xx / 71), xx * 255 / w], -1)
    img += rng.normal(0, 12, img.shape)  # texture
    img[h // 3:h // 2, w // 4:w // 2] = (250, 10, 30)  # a saturated block
    img[(xx - 2 * w / 3) ** 2 + (yy - h / 2) ** 2 < (min(h, w) / 6) ** 2] = (5, 240, 250)  # a disc
    img[h // 6:h // 6 + 2] = 0  # a thin black line
    img[:, w // 5] = 255  # a one-pixel white line
    return img.clip(0, 255).astype(np.uint8)


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's / xtuner's expand2square (what the paper's datasets call before the processor)."""
    w, h = image.size
    if w == h:
        return image
    out = Image.new(image.mode, (max(w, h),) * 2, fill)
    out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def folder(tmp_path, settings: dict):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    return tmp_path


def pixels01(x: torch.Tensor, p: SiglipProcessing) -> torch.Tensor:
    """Undo the normalisation and the rescale: [3, S, S] -> [0, 1] pixel units."""
    return x * torch.tensor(p.image_std)[:, None, None] + torch.tensor(p.image_mean)[:, None, None]


def ours(image: np.ndarray, p: SiglipProcessing, pad: bool) -> torch.Tensor:
    return P.siglip_view(P.image_tensor(image)[None], 384, p, pad_square=pad)[0]


@pytest.mark.parametrize("backend", sorted(PROCESSORS))
@pytest.mark.parametrize("settings", [SIGLIP_JSON, CLIP_JSON], ids=["siglip", "clip-bilinear"])
@pytest.mark.parametrize("hw,pad", [((333, 517), False), ((333, 517), True), ((517, 333), True)],
                         ids=["wide", "wide-pad", "tall-pad"])
def test_siglip_view_equals_the_processor(tmp_path, backend, settings, hw, pad):
    src = folder(tmp_path, settings)
    proc = PROCESSORS[backend].from_pretrained(str(src))
    p = SiglipProcessing.from_folder(src)
    image = photo(*hw)
    pil = Image.fromarray(image)
    if pad:
        pil = expand2square(pil, tuple(int(m * 255) for m in proc.image_mean))
    ref = proc(pil, return_tensors="pt")["pixel_values"][0]
    got = ours(image, p, pad)
    assert got.shape == ref.shape == (3, 384, 384) and got.dtype == torch.float32
    diff = (pixels01(got, p) - pixels01(ref, p)).abs().max().item()
    print(f"{backend} resample={settings['resample']} {hw} pad={pad}: max |diff| = {diff * 255:.3f} / 255")
    assert diff <= ONE_LEVEL, diff * 255


@pytest.mark.parametrize("hw", [(517, 333), (150, 211), (211, 150), (1000, 700), (400, 390)])
def test_passes_go_horizontal_first_as_the_checkpoints_pillow(hw):
    """PIL (before Pillow 13, which picks the order per shape) and torch's uint8 kernel behind the
    torchvision processor filter horizontally first, rounding to 8 bits in between: Pillow's one-axis
    resizes done in that order are the reference (1 level); the torchvision processor rounds its 16-bit
    weights on its own, within 2 levels."""
    p = SiglipProcessing()
    image = photo(*hw, seed=hw[0])
    pil = Image.fromarray(image)
    two_pass = pil.resize((384, hw[0]), Image.BICUBIC).resize((384, 384), Image.BICUBIC)
    ref = torch.from_numpy(np.array(two_pass)).permute(2, 0, 1) / 255
    got = pixels01(ours(image, p, False), p)
    assert (got - ref).abs().max().item() <= ONE_LEVEL
    tv = SiglipImageProcessor(size={"height": 384, "width": 384})(pil, return_tensors="pt")["pixel_values"][0]
    assert (got - pixels01(tv, p)).abs().max().item() <= 2 * ONE_LEVEL


def test_pad_off_leaves_a_non_square_image_unpadded():
    p = SiglipProcessing()
    image = photo(333, 517)
    plain, padded = ours(image, p, False), ours(image, p, True)
    # padded: the bands above and below the image are the canvas colour (int(0.5 * 255) = 127)
    band = 384 * ((517 - 333) // 2) // 517 - 2
    assert torch.allclose(pixels01(padded[:, :band], p), torch.tensor(127 / 255), atol=1e-6)
    assert (pixels01(plain[:, :band], p) - 127 / 255).abs().max() > 0.3  # unpadded: the image fills the view
    square = photo(300, 300)
    assert torch.equal(ours(square, p, False), ours(square, p, True))  # a square image is never padded


def test_expand_to_square_centres_like_expand2square():
    image = photo(7, 12)
    got = P.expand_to_square(P.image_tensor(image)[None], (1, 2, 3))[0]
    ref = torch.from_numpy(np.array(expand2square(Image.fromarray(image), (1, 2, 3)))).permute(2, 0, 1)
    assert torch.equal(got, ref)
    tall = photo(12, 7)
    got = P.expand_to_square(P.image_tensor(tall)[None], (9, 8, 7))[0]
    ref = torch.from_numpy(np.array(expand2square(Image.fromarray(tall), (9, 8, 7)))).permute(2, 0, 1)
    assert torch.equal(got, ref)


def test_batched_views_equal_one_image_at_a_time():
    p = SiglipProcessing()
    images = [P.image_tensor(photo(90, 140, seed=k)) for k in range(3)] + [P.image_tensor(photo(140, 90, seed=5))]
    sig, _ = P.views(images, 56, 64, siglip_processing=p, siglip_pad_square=True)
    for b, im in enumerate(images):
        assert torch.equal(sig[b], P.siglip_view(im[None], 56, p, pad_square=True)[0])


def test_processing_from_a_folder(tmp_path):
    assert SiglipProcessing.from_folder(tmp_path) == SiglipProcessing()  # no preprocessor_config.json: SigLIP's
    d = SiglipProcessing()
    assert (d.image_mean, d.image_std, d.resample, d.rescale_factor, d.pad_fill) == \
        ((0.5,) * 3, (0.5,) * 3, 3, 1 / 255, (127, 127, 127))
    p = SiglipProcessing.from_folder(folder(tmp_path, CLIP_JSON))
    assert p.size == (384, 384) and p.mode == "bilinear" and p.image_mean == tuple(CLIP_JSON["image_mean"])
    assert p.pad_fill == (122, 116, 104)
    cfg = XSAMConfig(siglip=SiglipConfig(processing=p))
    assert XSAMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # travels with exported configs
    old = cfg.to_dict()
    del old["siglip"]["processing"]  # a config written before the field existed
    assert XSAMConfig.from_dict(old).siglip.processing == SiglipProcessing()
    with pytest.raises(ValueError, match="not supported"):
        SiglipProcessing.from_folder(folder(tmp_path, {**SIGLIP_JSON, "resample": 1}))
    with pytest.raises(ValueError, match="fixed height x width"):
        SiglipProcessing.from_folder(folder(tmp_path, {**SIGLIP_JSON, "size": {"shortest_edge": 384}}))


def test_load_siglip_carries_the_folders_processor_to_the_views(tmp_path):
    cfg = tiny()
    src = SiglipEncoder(cfg.siglip)
    src.model.save_pretrained(tmp_path)
    settings = {**CLIP_JSON, "size": {"height": cfg.siglip.image_size, "width": cfg.siglip.image_size}}
    folder(tmp_path, settings)
    dst = SiglipEncoder(cfg.siglip)
    assert load_siglip(dst, tmp_path).ok
    assert dst.cfg.processing == SiglipProcessing.from_folder(tmp_path) and cfg.siglip.processing.mode == "bilinear"
    folder(tmp_path, SIGLIP_JSON)  # 384 x 384 for a 56 px encoder
    with pytest.raises(WeightLoadError, match="resizes to"):
        load_siglip(SiglipEncoder(tiny().siglip), tmp_path)


@pytest.mark.parametrize("profile", ["local", "paper", "single-node-8gpu"])
def test_per_stage_pad_square_defaults(profile):
    path = profile_path(profile)
    assert {s: load_profile(path, s).siglip_pad_square for s in ("s1", "s2", "s3")} == \
        {"s1": False, "s2": True, "s3": False}
    assert load_profile(path, "s2", ["siglip_pad_square=false"]).siglip_pad_square is False
    assert load_profile(path, "s3", ["siglip_pad_square=true"]).siglip_pad_square is True


def test_eval_path_pads_and_training_default_does_not(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    cfg, model = tiny_model(tok, "s3")
    model.eval()
    seen = []
    model.siglip.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    image = photo(48, 80)
    predict(model, tok, image, "referring", "the thing")  # what xsam.eval.benchmark and pipelines/evaluate run
    size, p = cfg.siglip.image_size, model.siglip.cfg.processing
    padded = P.siglip_view(P.image_tensor(image)[None], size, p, pad_square=True)[0]
    plain = P.siglip_view(P.image_tensor(image)[None], size, p, pad_square=False)[0]
    assert len(seen) == 1 and torch.equal(seen[0][0], padded) and not torch.allclose(padded, plain)
    assert model.siglip_pad_square is False  # the training default (the recipe sets the stage's value)
    raw = collate_raw([referring_example(1)], DecodeMode.per_phrase, tok, cfg)
    ex_image = P.image_tensor(referring_example(1).image)[None]
    assert torch.equal(model.prepare(raw).siglip_pixels, P.siglip_view(ex_image, size, p))
    assert torch.equal(model.prepare(raw, siglip_pad_square=True).siglip_pixels,
                       P.siglip_view(ex_image, size, p, pad_square=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("pad", [False, True])
def test_the_device_view_equals_the_cpu_view(pad):
    """One transform on every device: CUDA's kernels may round a tie the other way (1 grey level)."""
    p = SiglipProcessing()
    images = [P.image_tensor(photo(333, 517, seed=k)) for k in range(2)] + [P.image_tensor(photo(517, 333))]
    cpu, _ = P.views(images, 384, 64, siglip_processing=p, siglip_pad_square=pad)
    gpu, _ = P.views([im.cuda() for im in images], 384, 64, siglip_processing=p, siglip_pad_square=pad)
    assert gpu.device.type == "cuda"
    assert (pixels01(gpu.cpu(), p) - pixels01(cpu, p)).abs().max().item() <= ONE_LEVEL
