"""The original X-SAM's post-processing rules on hand-made tensors with known answers.

Panoptic fusion (validity threshold, segment = won pixels, stuff merge, the upstream id-reuse
detector), the semantic resize order, the interactive score / box-IoU pick, GCG painting, the
instance top-Q default. Probabilities are fed at the output size where the rule is about fusion
only (`fuse_panoptic`), and through the full geometry elsewhere."""

import pytest
import torch
import torch.nn.functional as F

from xsam.model import postprocess as pp

L = 20.0


def _row(*values):
    """[1, n] probability map from a list (one image row)."""
    return torch.tensor([values], dtype=torch.float32)


def _stack(*rows):
    return torch.stack(rows)  # [k, 1, n]


def _cls(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


# ------------------------------------------------------------------ panoptic fusion


def test_validity_uses_score_weighted_area_and_four_fifths_passes():
    # q0 (score 1.0) covers px 0..4 at 0.9; q1 (score 0.95) covers px 4..9 at 1.0 and wins px 4
    probs = _stack(_row(.9, .9, .9, .9, .9, 0, 0, 0, 0, 0), _row(0, 0, 0, 0, 1, 1, 1, 1, 1, 1))
    r = pp.fuse_panoptic(torch.tensor([1.0, 0.95]), torch.tensor([0, 1]), probs, is_thing=[True, True])
    # q0: won 4 / own 5 = 0.8 exactly; float32(0.8) > 0.8 in double, as upstream's `.item() > 0.8`
    assert r.seg_map.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2, 2, 2]]
    assert [(s["id"], s["category_id"]) for s in r.segments] == [(1, 0), (2, 1)]
    # the same q0 with a score of 0.55: own = #(0.55 * 0.9 >= 0.5) = 0 -> not a segment, its pixels void
    r = pp.fuse_panoptic(torch.tensor([0.55, 0.95]), torch.tensor([0, 1]), probs, is_thing=[True, True])
    assert r.seg_map.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]] and len(r.segments) == 1
    # q1 takes two of q0's pixels: 3 / 5 = 0.6 < 0.8 -> q0 dropped, void
    probs2 = _stack(probs[0], _row(0, 0, 0, 1, 1, 1, 1, 1, 1, 1))
    r = pp.fuse_panoptic(torch.tensor([1.0, 0.95]), torch.tensor([0, 1]), probs2, is_thing=[True, True])
    assert r.seg_map.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]]
    assert r.accepted == [(1, 1, False)]


def test_segment_is_every_won_pixel_even_below_the_mask_threshold():
    # q0 wins px 5..6 with prob 0.3 (nobody else there): part of its segment, not of its own area
    probs = _stack(_row(1, 1, 1, 1, 1, .3, .3, 0, 0, 0), _row(0, 0, 0, 0, 0, 0, 0, 1, 1, 1))
    r = pp.fuse_panoptic(torch.tensor([0.9, 0.9]), torch.tensor([0, 1]), probs, is_thing=[True, True])
    assert r.seg_map.tolist() == [[1, 1, 1, 1, 1, 1, 1, 2, 2, 2]]  # Mask2Former style would void px 5..6


def test_stuff_queries_merge_things_do_not():
    probs = _stack(_row(1, 1, 0, 0, 0, 0), _row(0, 0, 1, 1, 0, 0), _row(0, 0, 0, 0, 1, 1))
    labels = torch.tensor([0, 0, 1])  # q0, q1: class 0; q2: class 1
    stuff = pp.fuse_panoptic(torch.tensor([.9, .8, .7]), labels, probs, is_thing=[False, True])
    assert stuff.seg_map.tolist() == [[1, 1, 1, 1, 2, 2]]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in stuff.segments] == [(1, 0, False), (2, 1, True)]
    assert stuff.segments[0]["score"] == pytest.approx(0.9)  # the first query's
    things = pp.fuse_panoptic(torch.tensor([.9, .8, .7]), labels, probs, is_thing=[True, True])
    assert things.seg_map.tolist() == [[1, 1, 2, 2, 3, 3]]


def test_id_reuse_detector_counts_what_upstream_would_reuse():
    # stuff A, thing B, stuff A again (merge: upstream rewinds to 1), thing C: upstream gives C id 2 = B's
    accepted = [(0, True), (1, False), (0, True), (2, False)]
    assert pp.count_upstream_id_reuse(accepted) == 1
    assert pp.count_upstream_id_reuse([(0, True), (1, False), (0, True)]) == 0  # merge last: nothing new after
    assert pp.count_upstream_id_reuse([(0, True), (0, True), (1, False)]) == 0  # rewinds to the newest id
    assert pp.count_upstream_id_reuse([(0, True), (1, True), (0, True), (2, False), (3, False)]) == 1  # 3 is free
    assert pp.count_upstream_id_reuse([(0, True), (1, False), (2, False), (0, True), (3, False), (4, False)]) == 2
    assert pp.count_upstream_id_reuse([(1, False), (2, False), (1, False)]) == 0  # things never merge
    # the same sequence through the fusion: ids stay unique, the count is reported
    probs = _stack(*[_row(*[1.0 if j // 2 == i else 0.0 for j in range(8)]) for i in range(4)])
    r = pp.fuse_panoptic(torch.tensor([.9, .9, .9, .9]), torch.tensor([0, 1, 0, 2]), probs,
                         is_thing=[False, True, True])
    assert r.seg_map.tolist() == [[1, 1, 2, 2, 1, 1, 3, 3]]
    assert [s["id"] for s in r.segments] == [1, 2, 3] and r.upstream_id_reuses == 1
    assert r.accepted == [(0, 0, True), (1, 1, False), (2, 0, True), (3, 2, False)]


def test_a_mostly_background_query_still_competes_for_pixels():
    # q0: best class 0 at 0.45 (background 0.5) - kept (argmax over the K classes), it wins the left half
    # (0.45 x 1 > 0.8 x 0.5) but is no segment (0.45 x prob < 0.5 everywhere): the left half is void.
    # Mask2Former style (background queries removed first) would give the left half to q1 (prob 0.5).
    cls = _cls([[0.45, 0.05, 0.5], [0.1, 0.8, 0.1]])
    masks = torch.full((2, 4, 4), L)
    masks[0, :, 2:] = -L  # q0: left half
    masks[1, :, :2] = 0.0  # q1: prob 0.5 on the left half, 1 on the right
    r = pp.panoptic_result(cls, masks, (32, 32), (32, 32), is_thing=[True, True])
    assert [(s["id"], s["category_id"]) for s in r.segments] == [(1, 1)] and r.accepted == [(1, 1, False)]
    assert r.seg_map[:, :12].eq(0).all() and r.seg_map[:, 16:].eq(1).all()
    r = pp.panoptic_result(cls, masks, (32, 32), (32, 32), is_thing=[True, True], object_threshold=0.5)
    assert r.seg_map.eq(1).all()  # q0 below the object threshold: q1 wins everywhere, all its pixels


# ------------------------------------------------------------------ semantic resize order


def _original_semantic(mask_cls, mask_pred, scaled, orig):
    """The original's order, written out: frame (bilinear) -> sigmoid -> einsum -> crop -> bilinear -> argmax."""
    probs = mask_cls.softmax(-1)[:, :-1]
    frame = F.interpolate(mask_pred[None], size=(mask_pred.shape[1] * 8, mask_pred.shape[2] * 8), mode="bilinear",
                          align_corners=False)[0].sigmoid()
    seg = torch.einsum("qc,qhw->chw", probs, frame)[:, :scaled[0], :scaled[1]]
    return F.interpolate(seg[None], size=orig, mode="bilinear", align_corners=False)[0].argmax(0)


def test_semantic_resizes_probability_maps_not_logits():
    g = torch.Generator().manual_seed(0)
    mask_cls = torch.randn(6, 4, generator=g) * 2
    mask_pred = torch.randn(6, 8, 8, generator=g) * 6
    for scaled, orig in (((64, 48), (20, 15)), ((64, 64), (150, 150)), ((40, 64), (31, 50))):
        got = pp.semantic(mask_cls, mask_pred, scaled, orig)
        assert torch.equal(got, _original_semantic(mask_cls, mask_pred, scaled, orig))
    # the other order (logits resized to the original size first) labels some pixels differently here
    scaled, orig = (64, 48), (20, 15)
    logits_first = torch.einsum("qc,qhw->chw", mask_cls.softmax(-1)[:, :-1],
                                pp.resize_to_original(mask_pred, scaled, orig).sigmoid()).argmax(0)
    assert (logits_first != pp.semantic(mask_cls, mask_pred, scaled, orig)).any()


# ------------------------------------------------------------------ interactive


def _stripes():
    m = torch.full((3, 4, 4), -L)
    m[0] = L  # q0: the whole 32 x 32 image
    m[1, 0] = L  # q1: rows 0..7
    m[2, 2:] = L  # q2: rows 16..31
    return m


def test_mask_boxes_and_box_iou_follow_detectron2():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 5, 7] = True
    boxes = pp.mask_boxes(masks)
    assert boxes.tolist() == [[2, 1, 5, 3], [7, 5, 8, 6], [0, 0, 0, 0]]  # x0, y0, x1 + 1, y1 + 1; empty: zeros
    iou = pp.box_iou(boxes, torch.tensor([[2.0, 1.0, 5.0, 3.0], [3.0, 1.0, 5.0, 3.0]]))
    assert iou.flatten().tolist() == pytest.approx([1.0, 4 / 6, 0.0, 0.0, 0.0, 0.0])


def test_interactive_score_is_class_prob_times_mask_quality():
    masks = _stripes()
    masks[0] = 0.05  # q0 everywhere, but barely: mean in-mask prob ~0.51
    prompt = torch.zeros(32, 32, dtype=torch.bool)
    prompt[2:30, 2:30] = True  # box IoU: q0 0.77, q1 0.19, q2 0.43
    cls = _cls([[0.95, 0.05], [0.3, 0.7], [0.6, 0.4]])  # q0 0.95 x 0.51 < 0.5; q2 0.6 x ~0.99 >= 0.5
    out = pp.interactive(cls, masks, (32, 32), (32, 32), prompt)
    assert out[16:].all() and out.sum() == 16 * 32  # q2, although q0 has the better box and class prob
    masks[0] = L  # a confident q0 mask: now a candidate, and the best box
    assert pp.interactive(cls, masks, (32, 32), (32, 32), prompt).all()


def test_interactive_picks_by_box_iou_not_mask_iou():
    masks = _stripes()
    prompt = torch.zeros(32, 32, dtype=torch.bool)
    prompt[0:2, 0:2] = True
    prompt[30:32, 30:32] = True  # two dots: box = the whole image; mask IoU would favour q1
    cls = _cls([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    assert pp.interactive(cls, masks, (32, 32), (32, 32), prompt).all()  # q0: box IoU 1
    # only the best query is a candidate when nobody reaches 0.5: its mask whatever the box
    low = _cls([[0.2, 0.8], [0.45, 0.55], [0.3, 0.7]])
    out = pp.interactive(low, masks, (32, 32), (32, 32), prompt)
    assert out[:8].all() and out.sum() == 8 * 32
    # ties on box IoU (no overlap at all): the first candidate in query order
    far = torch.zeros(32, 32, dtype=torch.bool)
    far[10, 20] = True
    masks[0] = -L
    masks[0, 3] = L  # q0: rows 24..31, away from the prompt
    out = pp.interactive(cls, masks, (32, 32), (32, 32), far)
    assert out[24:].all() and out.sum() == 8 * 32
    with pytest.raises(ValueError):
        pp.interactive(_cls([[0.5, 0.3, 0.2]] * 3), masks, (32, 32), (32, 32), far)


# ------------------------------------------------------------------ gcg / instance


def test_paint_label_map_later_phrases_overwrite_and_masks_are_disjoint():
    masks = torch.zeros(3, 2, 6, dtype=torch.bool)
    masks[0, :, :4] = True
    masks[1, :, 2:5] = True
    masks[2, 0, 0] = True
    lm = pp.paint_label_map(masks)
    assert lm.tolist() == [[3, 1, 2, 2, 2, 255], [1, 1, 2, 2, 2, 255]]
    back = pp.label_map_masks(lm, 3)
    assert back.sum(0).max() == 1 and back.sum().item() == 10
    assert pp.paint_label_map(torch.zeros(0, 2, 2, dtype=torch.bool)).eq(255).all()


def test_gcg_phrase_masks_are_painted_disjoint():
    m = torch.full((2, 4, 4), -L)
    m[0, :2] = L  # rows 0..15
    m[1, 1:3] = L  # rows 8..23
    cls = _cls([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])  # phrase 0 -> q0, phrase 1 -> q1
    out = pp.gcg(cls, m, (32, 32), (32, 32))
    assert out[0, :8].all() and out[0].sum() == 8 * 32  # rows 8..15 painted over by phrase 1
    assert out[1, 8:24].all() and out[1].sum() == 16 * 32
    assert not (out[0] & out[1]).any()
    cls = _cls([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])  # both phrases pick q0: the first one is painted over
    out = pp.gcg(cls, m, (32, 32), (32, 32))
    assert not out[0].any() and out[1].sum() == 16 * 32


def test_instance_keeps_the_top_q_pairs_by_default():
    q, k = 5, 7
    cls = torch.randn(q, k + 1, generator=torch.Generator().manual_seed(1))
    masks = torch.full((q, 4, 4), L)
    res = pp.instance(cls, masks, (32, 32), (16, 16))
    assert len(res["scores"]) == q  # topk(num_queries) of the Q*K pairs, not all 35
    top = cls.softmax(-1)[:, :-1].flatten().topk(q).values
    assert sorted(res["scores"].tolist(), reverse=True) == pytest.approx((top * torch.sigmoid(torch.tensor(L))).tolist())
    assert len(pp.vgd(cls, masks, (32, 32), (16, 16))["scores"]) == q


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_post_processing_stays_on_the_input_device_and_accepts_bf16(device):
    cls = _cls([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]]).bfloat16().to(device)
    m = torch.full((2, 4, 4), -L, dtype=torch.bfloat16, device=device)
    m[0, :2], m[1, 2:] = L, L
    r = pp.panoptic_result(cls, m, (32, 32), (24, 24), is_thing=[True, False])
    assert r.seg_map.device == m.device and r.seg_map.shape == (24, 24) and len(r.segments) == 2
    assert pp.semantic(cls, m, (32, 32), (24, 24)).device == m.device
    assert pp.instance(cls, m, (32, 32), (24, 24))["masks"].device == m.device
    assert pp.gcg(cls, m, (32, 32), (24, 24)).device == m.device
    prompt = torch.zeros(24, 24, dtype=torch.bool)  # given on the CPU: moved to the masks' device
    prompt[:6] = True
    assert pp.interactive(cls[:, [0, 2]], m, (32, 32), (24, 24), prompt).device == m.device
    if device != "cpu":  # the same answers as on the CPU
        ref = pp.panoptic_result(cls.cpu(), m.cpu(), (32, 32), (24, 24), is_thing=[True, False])
        assert torch.equal(ref.seg_map, r.seg_map.cpu())
        assert [(x["id"], x["category_id"]) for x in ref.segments] == [(x["id"], x["category_id"]) for x in r.segments]
