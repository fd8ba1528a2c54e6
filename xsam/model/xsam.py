"""X-SAM: the composed model (reference section 1, "How the LLM conditions the decoder").

    image --SigLIP--> [B, 729, 1152] --image_projector--> [B, 729, D]   \\
    image --SAM ViT--> blocks {12, 18, 24, 23}                           > <image> = 1753 tokens -> LLM
             block 23 --seg_projector (pixel shuffle 0.5)--> [B, 1024, D] /
             blocks 12/18/24 --connector--> 1/8, 1/16, 1/32 --pixel decoder--> mask features (stride 8)
    LLM last hidden --llm_to_decoder--> 256:  <SEG> state biases the queries,
                                              <p>...</p> spans -> condition embeddings (+ latent background)
    masked-attention decoder --cosine classifier--> [N, Q, K+1] logits, [N, Q, I/8, I/8] masks

Parts are injected: a stage builds only what it uses (S1: SAM + segmentor; S2: the MLLM parts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial

import torch
from torch import Tensor, nn

from xsam.model import preprocess
from xsam.model.config import SiglipProcessing, XSAMConfig
from xsam.model.connector import SegConnector
from xsam.model.criterion import SetCriterion
from xsam.model.encoders import SamEncoder, SiglipEncoder
from xsam.model.heads import CosineClassifier, LatentBackground, LinearClassifier
from xsam.model.llm import XSamLLM, expand_visual, pad_batch, seg_positions, span_average
from xsam.model.matcher import HungarianMatcher
from xsam.model.pixel_decoder import PixelDecoder
from xsam.model.projectors import MLPProjector, SegProjector
from xsam.model.prompt_sampler import VisualPromptSampler
from xsam.model.transformer_decoder import MaskedAttentionDecoder


class DecodeMode(str, Enum):
    """How a single-task batch is decoded (the training loader sets it from the sample's task)."""

    none = "none"  # chat: LM loss only
    per_sample = "per_sample"  # generic / open-vocab / GCG / VGD / interactive: one pass per image
    per_phrase = "per_phrase"  # referring / reasoning / gRefCOCO (paper): one pass per <SEG>


@dataclass
class XSAMBatch:
    """A batch of B images. Token sequences keep their placeholders (-200 image, -300 region).

    targets: one dict per decoder item - per image (per_sample) or per <SEG> in batch order
    (per_phrase) - with labels [N] (condition indices) and masks [N, ., .] bool.

    Two forms. RAW, what the loader ships (`images` set, pixels None): images B x [3, H_b, W_b] uint8 and
    every mask (regions, targets) bool at its image's ORIGINAL size. PREPARED (`prepared`, called by
    `XSAM.prepare` at the model boundary; `images` None): the float32 views and every mask bool
    [., I, I] in the padded SAM frame, all on one device.
    """

    mode: DecodeMode
    sam_pixels: Tensor | None = None  # [B, 3, I, I] float32 (prepared)
    siglip_pixels: Tensor | None = None  # [B, 3, S, S] float32 (prepared)
    input_ids: list[Tensor] = field(default_factory=list)  # B x [T_b]
    labels: list[Tensor] = field(default_factory=list)  # B x [T_b]
    # B x [R_b, I, I] bool; raw: [R_b, Hc, Wc], region r's prompt in the top-left window of its SOURCE
    # image's frame ([H_s, W_s]; no sources: Hc, Wc = H_b, W_b), framed with that image's geometry
    region_masks: list[Tensor | None] = field(default_factory=list)
    # VGD: a prompt may come from another image of the batch; B x [R_b] long image index (empty list or
    # None: own image; -1: no prompt, a zero region token)
    region_sources: list[Tensor | None] = field(default_factory=list)
    targets: list[dict[str, Tensor]] = field(default_factory=list)
    images: list[Tensor] | None = None  # raw: B x [3, H_b, W_b] uint8 at the original size

    @property
    def raw(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else self.sam_pixels.shape[0]

    def prepared(self, siglip_size: int | None, sam_size: int, device: torch.device | str | None = None, *,
                 siglip_processing: SiglipProcessing = preprocess.SIGLIP,
                 siglip_pad_square: bool = False) -> XSAMBatch:
        """Raw -> prepared on `device` (default: the images' device); no SigLIP view when siglip_size is
        None, else one made with `siglip_processing`, padded to a square first when `siglip_pad_square`
        (`preprocess.siglip_view`). A prepared batch is returned as it is."""
        if not self.raw:
            return self
        dev = torch.device(device) if device is not None else self.images[0].device
        sig, sam = preprocess.views([_on(im, dev) for im in self.images], siglip_size, sam_size,
                                    siglip_processing=siglip_processing, siglip_pad_square=siglip_pad_square)
        regions, framed = _frame_regions([_on(m, dev) for m in self.region_masks], self.region_sources,
                                         [im.shape[-2:] for im in self.images],
                                         [_on(t["masks"], dev) for t in self.targets], sam_size)
        return replace(self, sam_pixels=sam, siglip_pixels=sig, images=None,
                       input_ids=[_on(t, dev) for t in self.input_ids], labels=[_on(t, dev) for t in self.labels],
                       region_masks=regions, region_sources=[_on(t, dev) for t in self.region_sources],
                       targets=[{**t, "labels": _on(t["labels"], dev), "masks": m}
                                for t, m in zip(self.targets, framed)])


@dataclass
class S1Batch:
    """An S1 batch: SAM views and targets whose labels index the label space (no text).

    RAW (`images` set): images B x [3, H_b, W_b] uint8, target masks [N, H_b, W_b] bool at the original
    size and `crops` the large-scale-jitter geometry of each image (None: the plain SAM view).
    PREPARED (`prepared`): sam_pixels and target masks [N, I, I] bool in the padded SAM frame."""

    sam_pixels: Tensor | None = None  # [B, 3, I, I] float32 (prepared)
    targets: list[dict[str, Tensor]] = field(default_factory=list)
    images: list[Tensor] | None = None  # raw: B x [3, H_b, W_b] uint8
    crops: list[preprocess.ResizeCrop | None] = field(default_factory=list)  # raw, one per image

    @property
    def raw(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else self.sam_pixels.shape[0]

    def prepared(self, sam_size: int, device: torch.device | str | None = None) -> S1Batch:
        if not self.raw:
            return self
        dev = torch.device(device) if device is not None else self.images[0].device
        pixels = torch.empty(len(self.images), 3, sam_size, sam_size, device=dev)
        targets = []
        for b, (image, crop, t) in enumerate(zip(self.images, self.crops, self.targets, strict=True)):
            image, masks = _on(image, dev), _on(t["masks"], dev)
            if crop is None:
                pixels[b] = preprocess.sam_view(image[None], sam_size)[0]
                masks = preprocess.frame_masks(masks, sam_size)
            else:
                pixels[b] = preprocess.crop_view(image, crop, sam_size)
                masks = preprocess.crop_masks(masks, crop, sam_size)
            targets.append({**t, "labels": _on(t["labels"], dev), "masks": masks})
        return S1Batch(sam_pixels=pixels, targets=targets)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    """To `device` (asynchronous from pinned host memory; a no-op when already there)."""
    return None if t is None else t.to(device, non_blocking=True)


def _frame_regions(regions: list[Tensor | None], sources: list[Tensor | None], sizes: list[tuple[int, int]],
                   targets: list[Tensor], size: int) -> tuple[list[Tensor | None], list[Tensor]]:
    """Raw region masks B x [R_b, Hc, Wc] (and target masks [N, H_b, W_b]) -> [R_b, I, I] (and [N, I, I])
    bool in the padded SAM frame. Region r of image b is framed with the geometry of its SOURCE image
    s = sources[b][r] (own image when there are no sources or s < 0): its [H_s, W_s] window is resized
    and padded exactly as image s's own masks are. sizes: B x (H_b, W_b). Masks of one size, regions and
    targets alike, go through one resize call (`preprocess.frame_mask_list`)."""
    pieces, plans = [], []  # plans[b]: None or [(piece index, region indices)]
    for b, m in enumerate(regions):
        if m is None:
            plans.append(None)
            continue
        src = sources[b].tolist() if sources and sources[b] is not None else [b] * len(m)
        groups: dict[tuple[int, int], list[int]] = {}
        for r, s in enumerate(src):
            groups.setdefault(tuple(sizes[s if s >= 0 else b]), []).append(r)
        plan = []
        for (h, w), idx in groups.items():
            plan.append((len(pieces), idx))
            pieces.append(m[:, :h, :w] if len(idx) == len(m) else m[idx, :h, :w])
        plans.append(plan)
    framed = preprocess.frame_mask_list(pieces + list(targets), size)
    out: list[Tensor | None] = []
    for b, plan in enumerate(plans):
        if plan is None:
            out.append(None)
        elif len(plan) == 1 and len(plan[0][1]) == len(regions[b]):
            out.append(framed[plan[0][0]])
        else:
            x = torch.zeros(len(regions[b]), size, size, dtype=torch.bool, device=regions[b].device)
            for k, idx in plan:
                x[idx] = framed[k]
            out.append(x)
    return out, framed[len(pieces):]


@dataclass
class ImageFeatures:
    """The text-independent part of the model for B images (`XSAM.encode`), reused by every query of
    an image: visual [B, 729 + 1024, D] LLM visual tokens, seg_map [B, g/2, g/2, D] the segmentation
    token map (visual prompts are sampled on it), mask_features [B, C, I/8, I/8] and multi_scale
    3 x [B, C, h_l, w_l] (coarse -> fine) from the pixel decoder."""

    visual: Tensor
    seg_map: Tensor
    mask_features: Tensor
    multi_scale: list[Tensor]


class Segmentor(nn.Module):
    """Connector + pixel decoder + masked-attention decoder, with both classification heads."""

    def __init__(self, cfg: XSAMConfig):
        super().__init__()
        d = cfg.decoder
        self.blocks = cfg.sam.connector_blocks
        self.connector = SegConnector(cfg.sam.embed_dim, d.connector_dim)
        self.pixel_decoder = PixelDecoder(self.connector.out_channels, d)
        self.decoder = MaskedAttentionDecoder(d)
        self.s1_head = LinearClassifier(d.hidden_dim, d.num_s1_classes)
        self.cosine_head = CosineClassifier(d.hidden_dim, d.logit_scale_init, d.logit_scale_clamp)
        self.background = LatentBackground(d.hidden_dim)

    def features(self, sam_feats: dict[int, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """SAM block outputs -> (mask_features [B, D, I/8, I/8], multi-scale [B, D, h, w] coarse->fine)."""
        return self.pixel_decoder(self.connector([sam_feats[b] for b in self.blocks]))

    def decode(self, mask_features: Tensor, multi_scale: list[Tensor], classify, query_bias: Tensor | None) -> dict:
        return self.decoder(multi_scale, mask_features, classify=classify, query_bias=query_bias)

    def cosine(self, queries: Tensor, cond: Tensor, cond_mask: Tensor) -> Tensor:
        return self.cosine_head(queries, cond, cond_mask, self.background.vector)


class XSAM(nn.Module):
    def __init__(self, cfg: XSAMConfig, sam: SamEncoder, segmentor: Segmentor | None = None,
                 siglip: SiglipEncoder | None = None, llm: XSamLLM | None = None):
        super().__init__()
        self.cfg = cfg
        self.sam = sam
        self.segmentor = segmentor
        self.siglip = siglip
        self.llm = llm
        if llm is not None:
            dim = cfg.llm.hidden_size
            self.image_projector = MLPProjector(cfg.siglip.hidden_size, dim)
            self.seg_projector = SegProjector(cfg.sam.embed_dim, dim)
            self.llm_to_decoder = MLPProjector(dim, cfg.decoder.hidden_dim, hidden_dim=cfg.decoder.hidden_dim)
        self.prompt_sampler = VisualPromptSampler(cfg.num_prompt_points)
        lc = cfg.loss
        self.criterion = SetCriterion(HungarianMatcher(lc.class_weight, lc.mask_weight, lc.dice_weight, lc.num_points), lc)
        self.special_ids: dict[str, int] = {}  # "<SEG>", "<p>", "</p>" -> id, set by the builder
        # SigLIP view padded to a square (expand2square) when `prepare` is not told: the training recipe
        # sets the stage's TrainConfig.siglip_pad_square (S2 on, S3 off); predict / evaluation pass True
        self.siglip_pad_square = False

    def enable_activation_checkpointing(self) -> None:
        """Recompute activations in the backward pass: SAM blocks, SigLIP layers, LLM layers."""
        self.sam.gradient_checkpointing = True
        if self.siglip is not None:
            self.siglip.gradient_checkpointing = True
        if self.llm is not None:
            self.llm.enable_gradient_checkpointing()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point parameters (bf16 under DeepSpeed bf16 / a bf16 load)."""
        return self.sam.pos_embed.dtype

    def to_model_dtype(self, pixels: Tensor | None) -> Tensor | None:
        """Image tensors enter the model in its parameters' dtype, on its device (the model boundary:
        training, predict and evaluation all pass here). Masks and targets are never cast: they stay
        bool / uint8 until the loss, which samples them in fp32."""
        if pixels is None:
            return None
        return pixels.to(device=self.sam.pos_embed.device, dtype=self.compute_dtype)

    def prepare(self, batch: XSAMBatch | S1Batch, siglip_pad_square: bool | None = None) -> XSAMBatch | S1Batch:
        """The model boundary for images: a raw batch (uint8 images, masks at the original size) ->
        views + SAM-frame targets on the model's device (views float32; `to_model_dtype` casts them
        where they enter). The SigLIP view follows the encoder's processor settings
        (`siglip.cfg.processing`, from its checkpoint folder) and is padded to a square when
        `siglip_pad_square` (None: `self.siglip_pad_square`). A prepared batch (pixels present) passes through."""
        if not batch.raw:
            return batch
        device = self.sam.pos_embed.device
        with torch.no_grad():
            if isinstance(batch, S1Batch):
                return batch.prepared(self.cfg.sam.image_size, device)
            if self.siglip is None:
                return batch.prepared(None, self.cfg.sam.image_size, device)
            pad = self.siglip_pad_square if siglip_pad_square is None else siglip_pad_square
            return batch.prepared(self.siglip.cfg.image_size, self.cfg.sam.image_size, device,
                                  siglip_processing=self.siglip.cfg.processing, siglip_pad_square=pad)

    def unused_prefixes(self) -> tuple[str, ...]:
        """Parameters that exist for checkpoint compatibility but never feed an output."""
        return tuple(f"siglip.{p}" for p in self.siglip.unused_prefixes()) if self.siglip is not None else ()

    # -- S1: the segmentor alone, linear 134-way head ---------------------------------------------
    def forward_s1(self, sam_pixels: Tensor, targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict]:
        mask_features, multi_scale = self.segmentor.features(self.sam.features(self.to_model_dtype(sam_pixels)))
        outputs = self.segmentor.decode(mask_features, multi_scale, self.segmentor.s1_head, None)
        losses = self.criterion(outputs, targets)
        losses["total"] = sum(losses.values())
        return losses, outputs

    # -- S2 / S3 -----------------------------------------------------------------------------------
    def visual_tokens(self, siglip_pixels: Tensor, sam_feats: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
        """-> (visual tokens [B, 729 + 1024, D], the segmentation token map [B, g/2, g/2, D])."""
        image_tokens = self.image_projector(self.siglip(self.to_model_dtype(siglip_pixels)))
        seg_map = self.seg_projector.forward_map(sam_feats[self.cfg.sam.projector_block])
        return torch.cat([image_tokens, seg_map.flatten(1, 2)], dim=1), seg_map

    def embed_inputs(self, batch: XSAMBatch, sam_feats: dict[int, Tensor]):
        """Expand every sample's placeholders (visual tokens, sampled region features) and pad
        -> (inputs_embeds [B, T', D], labels [B, T'], token_ids [B, T'], attention_mask [B, T'])."""
        visual, seg_map = self.visual_tokens(batch.siglip_pixels, sam_feats)
        return self._embed(visual, seg_map, batch.input_ids, batch.labels, batch.region_masks, batch.region_sources)

    def _embed(self, visual: Tensor, seg_map: Tensor, input_ids: list[Tensor], labels: list[Tensor],
               region_masks: list[Tensor | None] | None, region_sources: list[Tensor | None] | None,
               generators: list[torch.Generator | None] | None = None):
        """Sequence b's placeholders from visual[b] [Nv, D] and its regions sampled on seg_map [., g', g', D]
        (seg_map[b], or seg_map[s] for a region of source image s) -> `pad_batch` of the sequences.
        generators: per sequence, the generator of its prompt-point draws (None: the global one)."""
        embed = self.llm.input_embeddings()
        sequences = []
        for b in range(len(input_ids)):
            regions = None
            gen = generators[b] if generators else None
            if region_masks and region_masks[b] is not None and len(region_masks[b]):
                masks = region_masks[b]
                sources = region_sources[b] if region_sources else None
                if sources is None:
                    regions = self.prompt_sampler(seg_map[b], masks, gen)
                else:  # region r from image sources[r]'s token map; -1 (no prompt): a zero token, as X-SAM
                    src = sources.tolist()
                    regions = seg_map.new_zeros(len(src), seg_map.shape[-1])
                    for j in sorted(set(src) - {-1}):
                        idx = [r for r, s in enumerate(src) if s == j]
                        regions[idx] = self.prompt_sampler(seg_map[j], masks[idx], gen)
            sequences.append(expand_visual(input_ids[b], labels[b], embed, visual[b], regions))
        return pad_batch(sequences)

    def run_llm(self, batch: XSAMBatch, sam_feats: dict[int, Tensor]):
        """-> (lm_loss, hidden [B, T', D], token_ids [B, T'] with -200 at visual positions)."""
        embeds, labels, token_ids, attention_mask = self.embed_inputs(batch, sam_feats)
        lm_loss, hidden = self.llm(embeds, attention_mask, labels)
        return lm_loss, hidden, token_ids

    def conditions(self, hidden: Tensor, token_ids: Tensor, mode: DecodeMode):
        """Project the LLM states and gather what the decoder needs.

        -> (item_image [N] long: the image of each decoder item, query_bias [N, 256],
            cond [N, K, 256], cond_mask [N, K] bool)."""
        proj = self.llm_to_decoder(hidden)  # [B, T', 256]
        seg, p, end_p = self.special_ids["<SEG>"], self.special_ids["<p>"], self.special_ids["</p>"]
        spans = [span_average(proj[b], token_ids[b], p, end_p) for b in range(proj.shape[0])]
        segs = [seg_positions(token_ids[b], seg) for b in range(proj.shape[0])]
        if mode is DecodeMode.per_sample:
            for b, s in enumerate(segs):
                if len(s) == 0 or len(spans[b]) == 0:
                    raise ValueError(f"sample {b} of a segmentation batch has no <SEG> or no <p>...</p> span")
            item_image = torch.arange(proj.shape[0], device=proj.device)
            query_bias = torch.stack([proj[b, s[0]] for b, s in enumerate(segs)])
            k = max(len(s) for s in spans)
            cond = proj.new_zeros(len(spans), k, proj.shape[-1])
            cond_mask = torch.zeros(len(spans), k, dtype=torch.bool, device=proj.device)
            for b, s in enumerate(spans):
                cond[b, : len(s)] = s
                cond_mask[b, : len(s)] = True
            return item_image, query_bias, cond, cond_mask
        # per_phrase: one decoder item per <SEG>; every phrase of the batch is a class (cross-sample negatives)
        item_image = torch.cat([torch.full((len(s),), b, dtype=torch.long, device=proj.device)
                                for b, s in enumerate(segs)])
        query_bias = torch.cat([proj[b, s] for b, s in enumerate(segs)])
        all_spans = torch.cat(spans)
        if len(all_spans) != len(query_bias):
            raise ValueError(f"{len(all_spans)} <p> spans but {len(query_bias)} <SEG> tokens in a per-phrase batch")
        n = len(query_bias)
        cond = all_spans[None].expand(n, -1, -1)
        return item_image, query_bias, cond, torch.ones(n, n, dtype=torch.bool, device=proj.device)

    def decode(self, batch: XSAMBatch) -> tuple[Tensor | None, Tensor, dict | None]:
        """-> (lm_loss, hidden [B, T', D], decoder outputs for the batch's decoder items or None)."""
        batch = self.prepare(batch)
        sam_feats = self.sam.features(self.to_model_dtype(batch.sam_pixels))
        lm_loss, hidden, token_ids = self.run_llm(batch, sam_feats)
        if batch.mode is DecodeMode.none:
            return lm_loss, hidden, None
        item_image, query_bias, cond, cond_mask = self.conditions(hidden, token_ids, batch.mode)
        mask_features, multi_scale = self.segmentor.features(sam_feats)
        mask_features = mask_features.index_select(0, item_image)
        multi_scale = [m.index_select(0, item_image) for m in multi_scale]
        classify = partial(self.segmentor.cosine, cond=cond, cond_mask=cond_mask)
        return lm_loss, hidden, self.segmentor.decode(mask_features, multi_scale, classify, query_bias)

    def forward(self, batch: XSAMBatch | S1Batch) -> tuple[dict[str, Tensor], dict | None]:
        """Teacher-forced training step: total = LM cross-entropy + segmentation losses
        (an S1Batch: the segmentor's losses with the linear head). A raw batch is prepared first."""
        batch = self.prepare(batch)
        if isinstance(batch, S1Batch):
            return self.forward_s1(batch.sam_pixels, batch.targets)
        lm_loss, hidden, outputs = self.decode(batch)
        losses: dict[str, Tensor] = {"lm": lm_loss if lm_loss is not None else hidden.sum() * 0}
        if outputs is not None:
            losses.update(self.criterion(outputs, batch.targets))
        losses["total"] = sum(losses.values())
        return losses, outputs

    # -- inference from cached image features (the evaluation engine) -------------------------------
    @torch.no_grad()
    def encode(self, sam_pixels: Tensor, siglip_pixels: Tensor) -> ImageFeatures:
        """Everything of B images that does not depend on the text, ONCE per image: sam_pixels
        [B, 3, I, I], siglip_pixels [B, 3, S, S] (prepared views) -> ImageFeatures. SAM, SigLIP and the
        projectors run on the batch; the connector + pixel decoder image by image (their 3x3
        convolutions are not batch-invariant in fp32: per image they give what `decode` gives)."""
        sam_feats = self.sam.features(self.to_model_dtype(sam_pixels))
        visual, seg_map = self.visual_tokens(siglip_pixels, sam_feats)
        per_image = [self.segmentor.features({k: v[b:b + 1] for k, v in sam_feats.items()})
                     for b in range(sam_pixels.shape[0])]
        return ImageFeatures(visual, seg_map, torch.cat([m for m, _ in per_image]),
                             [torch.cat(level) for level in zip(*(ms for _, ms in per_image))])

    @torch.no_grad()
    def item_conditions(self, feats: ImageFeatures, image_of: Tensor, input_ids: list[Tensor],
                        region_masks: list[Tensor | None] | None = None,
                        generators: list[torch.Generator | None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The LLM over N teacher-forced sequences on cached image features, ONE decoder item per sequence
        with its own conditions (its <p>...</p> spans, its first <SEG>): what `decode` conditions a
        per_sample batch of one sequence (or a per_phrase batch of one single-phrase sequence) on.

        image_of [N] long: the image of each sequence in `feats`; input_ids N x [T_n] (whole chats,
        placeholders in); region_masks N x ([R_n, I, I] bool, padded SAM frame) or None; generators: per
        sequence, for its prompt-point draws (None: the global generator).
        -> (query_bias [N, C], cond [N, K_max, C], cond_mask [N, K_max] bool)."""
        visual = feats.visual.index_select(0, image_of)
        seg_map = feats.seg_map.index_select(0, image_of)
        labels = [torch.full_like(t, -100) for t in input_ids]
        embeds, _, token_ids, attention_mask = self._embed(visual, seg_map, input_ids, labels, region_masks, None,
                                                           generators)
        _, hidden = self.llm(embeds, attention_mask, None)
        _, query_bias, cond, cond_mask = self.conditions(hidden, token_ids, DecodeMode.per_sample)
        return query_bias, cond, cond_mask

    @torch.no_grad()
    def decode_items(self, feats: ImageFeatures, image_of: Tensor, query_bias: Tensor, cond: Tensor,
                     cond_mask: Tensor) -> dict:
        """The mask decoder for N items over their images' cached features (expanded along the batch dim)
        -> dict(pred_logits [N, Q, K_max + 1] (padded classes PADDED_CLASS_LOGIT, background last),
        pred_masks [N, Q, I/8, I/8])."""
        mask_features = feats.mask_features.index_select(0, image_of)
        multi_scale = [m.index_select(0, image_of) for m in feats.multi_scale]
        classify = partial(self.segmentor.cosine, cond=cond, cond_mask=cond_mask)
        out = self.segmentor.decode(mask_features, multi_scale, classify, query_bias)
        return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}

    @torch.no_grad()
    def generate_features(self, feats: ImageFeatures, image_of: Tensor, input_ids: list[Tensor],
                          max_new_tokens: int, eos_id: int) -> list[list[int]]:
        """Greedy continuation of N prompts (input_ids N x [T_n], prompt only) over cached image
        features, batched across the N with one KV cache (`XSamLLM.generate_greedy`)."""
        visual = feats.visual.index_select(0, image_of)
        seg_map = feats.seg_map.index_select(0, image_of)
        labels = [torch.full_like(t, -100) for t in input_ids]
        embeds, _, _, attention_mask = self._embed(visual, seg_map, input_ids, labels, None, None)
        return self.llm.generate_greedy(embeds, attention_mask, max_new_tokens, eos_id)

    @torch.no_grad()
    def generate(self, batch: XSAMBatch, max_new_tokens: int, eos_id: int) -> list[list[int]]:
        """Greedy continuation of each sample's prompt (its input_ids hold the prompt only)."""
        batch = self.prepare(batch)
        embeds, _, _, attention_mask = self.embed_inputs(batch, self.sam.features(self.to_model_dtype(batch.sam_pixels)))
        return self.llm.generate_greedy(embeds, attention_mask, max_new_tokens, eos_id)
