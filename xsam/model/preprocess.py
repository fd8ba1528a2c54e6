"""Image views and mask targets for the model (reference section 2, "Image views per sample"): ONE
torch transform, run on whatever device its inputs are on (the training device at the model boundary,
`XSAM.prepare`; the CPU when a caller wants views at once, `batching.collate`).

Inputs are what the loader ships: uint8 images [3, H, W] and bool masks [N, H, W] at the ORIGINAL
size (any strides: a permuted HWC decode or a column-major RLE decode is used as it is).

- SigLIP view (`siglip_view`): what transformers' SiglipImageProcessor does with the checkpoint's
  preprocessor_config.json (`SiglipProcessing`: resample, rescale factor, mean / std; SigLIP's own
  values - bicubic, 1/255, 0.5 / 0.5 - by default): resized to S x S as PIL resizes an 8-bit image
  (antialiased, horizontal pass then vertical, each rounded to 8 bits: within 1 grey level of the
  processor), rescaled, normalised (S = 384 paper). Optionally first padded to a square
  (`expand_to_square`, LLaVA's expand2square: centred on a canvas of the mean colour) - the paper's S2
  training and every evaluation; only this view, the SAM view and the targets never are.
- SAM view (`sam_view`): longest side resized to I (antialiased bilinear; I = 1024 paper), normalised
  with SAM's pixel mean / std, zero-padded bottom / right to I x I (zero in normalised space, as SAM).
- mask targets (`frame_masks`): nearest resize (torch "nearest": src = floor(dst * H / h)) to the
  same scaled size, padded with False: bool [N, I, I] in the padded SAM frame, never float (the
  matcher / criterion convert the points they sample). `scaled_size` = the image's size inside that
  frame, kept for un-padding predictions.
- S1 large-scale jitter (`crop_view`, `crop_masks`): the geometry (`ResizeCrop`, drawn on the CPU by
  `xsam.train.augment`) says resize to `resized`, keep the window `valid` at `offset`, pad to I x I.
  The image uses antialiased bilinear (PIL's BILINEAR in the CPU reference `augment.large_scale_jitter`
  rounds to uint8 between its two passes: within 2 grey levels), the masks an index gather with the
  centre convention src = floor((dst + 0.5) * H / new_H) (torch's "nearest-exact"), computed in
  float64 exactly as the CPU reference: equal masks.

Images of one size are resized in one call (`views`), masks of one size likewise (`frame_mask_list`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xsam.model.config import SiglipProcessing

SIGLIP = SiglipProcessing()  # SigLIP's processor defaults (a folder without preprocessor_config.json)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


@dataclass
class ImageViews:
    siglip: Tensor  # [3, S, S]
    sam: Tensor  # [3, I, I]
    orig_size: tuple[int, int]  # (H, W)
    scaled_size: tuple[int, int]  # (h, w) inside the padded SAM frame


@dataclass(frozen=True)
class ResizeCrop:
    """Resize to `resized` (h, w), keep the `valid` (h, w) window at `offset` (y, x), place it top-left
    in the I x I frame (S1 large-scale jitter; the plain SAM view is resized = valid, offset 0)."""

    resized: tuple[int, int]
    offset: tuple[int, int]
    valid: tuple[int, int]


def scaled_size(orig: tuple[int, int], target: int) -> tuple[int, int]:
    h, w = orig
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _normalise_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[B, 3, h, w] float32, in place: (x - mean) / std per channel. Python scalars, no constant tensor to
    copy to the device (a pageable host-to-device copy synchronises the stream)."""
    for c in range(3):
        x[:, c].sub_(mean[c]).div_(std[c])
    return x


# --------------------------------------------------------------------------- one size at a time
def expand_to_square(images: Tensor, fill: Sequence[int]) -> Tensor:
    """[B, C, H, W] (one size) -> [B, C, M, M], M = max(H, W): the images centred on a canvas of `fill`
    (one value per channel), at row (M - H) // 2 or column (M - W) // 2 as LLaVA's expand2square pastes
    them. A square batch is returned as it is."""
    b, c, h, w = images.shape
    if h == w:
        return images
    m = max(h, w)
    out = torch.empty(b, c, m, m, dtype=images.dtype, device=images.device)
    for ch in range(c):  # Python scalars: no constant tensor to copy to the device
        out[:, ch].fill_(fill[ch])
    y, x = (m - h) // 2, (m - w) // 2
    out[:, :, y:y + h, x:x + w] = images
    return out


def pil_resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """[B, C, H, W] float holding 8-bit values -> [B, C, h, w] float holding 8-bit values, resized as
    PIL resizes an 8-bit image: separable antialiased filter (torch's antialias=True kernels are PIL's),
    the horizontal pass first, each pass rounded and clamped to 0..255 (the clamp between the passes
    matters where the cubic overshoots at edges). An axis already at its size is not filtered."""
    h, w = size
    if x.shape[-1] != w:
        x = F.interpolate(x, size=(x.shape[-2], w), mode=mode, align_corners=False, antialias=True)
        x = x.add_(0.5).floor_().clamp_(0, 255)
    if x.shape[-2] != h:
        x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=True).add_(0.5).floor_()
        x = x.clamp_(0, 255)
    return x


def siglip_view(images: Tensor, size: int, processing: SiglipProcessing = SIGLIP,
                pad_square: bool = False) -> Tensor:
    """[B, 3, H, W] uint8 (one size) -> [B, 3, S, S] float32, as SiglipImageProcessor with `processing`
    (on processor(expand2square(image)) when pad_square): resize to S x S, rescale, normalise."""
    if processing.size is not None and processing.size != (size, size):
        raise ValueError(f"the SigLIP processor resizes to {processing.size}, the encoder takes {(size, size)}")
    if pad_square:
        images = expand_to_square(images, processing.pad_fill)
    x = pil_resize(images.float(), (size, size), processing.mode)
    if processing.do_rescale:
        x.mul_(processing.rescale_factor)
    if processing.do_normalize:
        _normalise_(x, processing.image_mean, processing.image_std)
    return x


def _resize_normalise(images: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, 3, H, W] uint8 -> [B, 3, h, w] float32, antialiased bilinear, SAM-normalised."""
    x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return _normalise_(x, SAM_MEAN, SAM_STD)


def sam_view(images: Tensor, size: int) -> Tensor:
    """[B, 3, H, W] uint8 (one size) -> [B, 3, I, I] float32: longest side to I, normalise, zero pad."""
    sh, sw = scaled_size(tuple(images.shape[-2:]), size)
    return F.pad(_resize_normalise(images, (sh, sw)), (0, size - sw, 0, size - sh))


def frame_masks(masks: Tensor, size: int) -> Tensor:
    """[N, H, W] bool -> [N, I, I] bool in the padded SAM frame (nearest resize, zero pad)."""
    n, h, w = masks.shape
    sh, sw = scaled_size((h, w), size)
    out = torch.zeros(n, size, size, dtype=torch.bool, device=masks.device)
    if n:  # uint8: interpolate has no bool kernel; bool -> uint8 is a view
        out[:, :sh, :sw] = F.interpolate(masks.view(torch.uint8)[:, None], size=(sh, sw), mode="nearest")[:, 0] != 0
    return out


def nearest_exact_index(src: int, dst: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """Source indices [count] long of destination pixels start.. of a src -> dst nearest resize with the
    centre convention, floor((dst + 0.5) * src / dst), computed on `device` in float64 (IEEE: the same
    bits as augment's numpy CPU reference)."""
    idx = ((torch.arange(start, start + count, dtype=torch.float64, device=device) + 0.5) * (src / dst)).long()
    return idx.clamp_(max=src - 1)


def crop_view(image: Tensor, crop: ResizeCrop, size: int) -> Tensor:
    """[3, H, W] uint8 -> [3, I, I] float32: resize to crop.resized, keep the window, normalise, zero pad."""
    (oy, ox), (ch, cw) = crop.offset, crop.valid
    x = _resize_normalise(image[None], crop.resized)[0, :, oy:oy + ch, ox:ox + cw]
    return F.pad(x, (0, size - cw, 0, size - ch))


def crop_masks(masks: Tensor, crop: ResizeCrop, size: int) -> Tensor:
    """[N, H, W] bool -> [N, I, I] bool: the nearest-exact resize of the window only (an index gather)."""
    n, h, w = masks.shape
    (nh, nw), (oy, ox), (ch, cw) = crop.resized, crop.offset, crop.valid
    rows = nearest_exact_index(h, nh, oy, ch, masks.device)
    cols = nearest_exact_index(w, nw, ox, cw, masks.device)
    out = torch.zeros(n, size, size, dtype=torch.bool, device=masks.device)
    if n:
        out[:, :ch, :cw] = masks.index_select(1, rows).index_select(2, cols)
    return out


# --------------------------------------------------------------------------- a batch of sizes
def _by_shape(tensors: Sequence[Tensor | None]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, t in enumerate(tensors):
        if t is not None:
            groups.setdefault(tuple(t.shape[-2:]), []).append(k)
    return groups


def views(images: Sequence[Tensor], siglip_size: int | None, sam_size: int, *,
          siglip_processing: SiglipProcessing = SIGLIP,
          siglip_pad_square: bool = False) -> tuple[Tensor | None, Tensor]:
    """B x [3, H_b, W_b] uint8 -> (SigLIP [B, 3, S, S] or None when siglip_size is None, SAM [B, 3, I, I]),
    float32 on the images' device; images of one size go through one resize call. The SigLIP view follows
    `siglip_processing`, padded to a square first when `siglip_pad_square` (`siglip_view`)."""
    sam: list[Tensor | None] = [None] * len(images)
    sig: list[Tensor | None] = [None] * len(images)
    for idx in _by_shape(images).values():
        x = torch.stack([images[k] for k in idx])
        for k, v in zip(idx, sam_view(x, sam_size)):
            sam[k] = v
        if siglip_size is not None:
            for k, v in zip(idx, siglip_view(x, siglip_size, siglip_processing, siglip_pad_square)):
                sig[k] = v
    return (torch.stack(sig) if siglip_size is not None else None), torch.stack(sam)


def frame_mask_list(masks: Sequence[Tensor | None], size: int) -> list[Tensor | None]:
    """Several [N_k, H_k, W_k] bool (or None) -> [N_k, I, I] bool; masks of one size in one call."""
    out: list[Tensor | None] = list(masks)
    for idx in _by_shape(masks).values():
        framed = frame_masks(torch.cat([masks[k] for k in idx]) if len(idx) > 1 else masks[idx[0]], size)
        for k, part in zip(idx, framed.split([len(masks[k]) for k in idx])):
            out[k] = part
    return out


# --------------------------------------------------------------------------- numpy entry points (CPU)
def image_tensor(image: np.ndarray) -> Tensor:
    """[H, W, 3] uint8 RGB -> [3, H, W] uint8 (a view; a copy only of a read-only array, which torch cannot view)."""
    return torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)


def image_views(image: np.ndarray, siglip_size: int, sam_size: int, *,
                siglip_processing: SiglipProcessing = SIGLIP, siglip_pad_square: bool = False) -> ImageViews:
    """image: [H, W, 3] uint8 RGB -> the two normalised views, on the CPU."""
    sig, sam = views([image_tensor(image)], siglip_size, sam_size, siglip_processing=siglip_processing,
                     siglip_pad_square=siglip_pad_square)
    h, w = image.shape[:2]
    return ImageViews(siglip=sig[0], sam=sam[0], orig_size=(h, w), scaled_size=scaled_size((h, w), sam_size))


def mask_targets(masks: np.ndarray, sam_size: int) -> Tensor:
    """[N, H, W] bool -> [N, I, I] bool in the padded SAM frame, on the CPU."""
    return frame_masks(torch.from_numpy(masks.astype(bool, copy=False)), sam_size)
