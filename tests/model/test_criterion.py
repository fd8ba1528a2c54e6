"""SetCriterion on hand-made cases, PointRend point selection, and num_masks across 2 real processes."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xsam.model.config import LossConfig
from xsam.model.criterion import SetCriterion, count_masks, dice_loss, sigmoid_ce_loss
from xsam.model.matcher import HungarianMatcher
from xsam.model.point_sampling import point_sample, uncertain_points_with_randomness

H = 128  # target resolution
h = 16  # prediction resolution (stride 8)
L = 50.0  # "huge" logit


def _targets():
    """2 targets: top-left quarter (class 0), bottom half (class 1)."""
    tm = torch.zeros(2, H, H)
    tm[0, : H // 2, : H // 2] = 1
    tm[1, H // 2:, :] = 1
    return {"labels": torch.tensor([0, 1]), "masks": tm.bool()}


def _perfect(k_plus_1=3):
    """3 queries: q0 = target 1, q2 = target 0, q1 = background; huge logits everywhere."""
    tm = _targets()["masks"].float()
    low = F.interpolate(tm[None], size=(h, h), mode="nearest")[0]
    masks = torch.full((1, 3, h, h), -L)
    masks[0, 0] = low[1] * 2 * L - L
    masks[0, 2] = low[0] * 2 * L - L
    logits = torch.full((1, 3, k_plus_1), -L)
    logits[0, 0, 1] = L
    logits[0, 2, 0] = L
    logits[0, 1, -1] = L
    return logits, masks


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_loss_functions_exact_values():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    sig = torch.sigmoid(logits)
    bce = -(labels * sig.log() + (1 - labels) * (1 - sig).log())
    assert sigmoid_ce_loss(logits, labels, 4.0).item() == pytest.approx(bce.mean(1).sum().item() / 4, rel=1e-5)
    dice = 1 - (2 * (sig * labels).sum(1) + 1) / (sig.sum(1) + labels.sum(1) + 1)
    assert dice_loss(logits, labels, 4.0).item() == pytest.approx(dice.sum().item() / 4, rel=1e-5)
    perfect = labels * 100 - 50
    assert sigmoid_ce_loss(perfect, labels, 1.0).item() < 1e-12
    assert dice_loss(perfect, labels, 1.0).item() < 1e-6


def test_perfect_prediction_small_and_wrong_prediction_large():
    crit = SetCriterion.from_config(LossConfig(num_points=256))
    logits, masks = _perfect()
    good = crit({"pred_logits": logits, "pred_masks": masks}, [_targets()], generator=_gen())
    bad = crit({"pred_logits": -logits, "pred_masks": -masks}, [_targets()], generator=_gen())
    assert good["loss_ce"].item() < 1e-6
    # mask / dice: only the one-target-pixel band of soft (bilinear) labels along the boundaries is
    # left, and uncertainty sampling puts 75% of the points near boundaries: ~2% of the maximum
    # weighted dice (5.0) and ~1% of the wrong prediction's BCE remain
    assert good["loss_dice"].item() < 0.15 and good["loss_dice"].item() < 0.1 * bad["loss_dice"].item()
    assert good["loss_mask"].item() < 0.02 * bad["loss_mask"].item()
    assert bad["loss_ce"].item() > 10 and bad["loss_dice"].item() > 1.0 and bad["loss_mask"].item() > 20


def test_empty_target_mask_perfect_prediction_is_near_zero():
    # a target with no boundary at all (empty mask) predicted as -L everywhere: nothing soft left
    crit = SetCriterion.from_config(LossConfig(num_points=256))
    logits = torch.tensor([[[L, -L], [-L, L]]])
    masks = torch.stack([torch.full((h, h), -L), torch.full((h, h), L)])[None]
    target = {"labels": torch.tensor([0]), "masks": torch.zeros(1, H, H, dtype=torch.bool)}
    out = crit({"pred_logits": logits, "pred_masks": masks}, [target], generator=_gen())
    assert out["loss_ce"].item() < 1e-6 and out["loss_mask"].item() < 1e-6 and out["loss_dice"].item() < 1e-6


def test_background_weight_only_part():
    # matched queries perfect, the unmatched query uniform over the 3 classes: only its
    # background term (weight 0.1) remains in the weighted mean
    crit = SetCriterion.from_config(LossConfig(num_points=64))
    logits, masks = _perfect()
    logits[0, 1] = 0.0
    out = crit({"pred_logits": logits, "pred_masks": masks}, [_targets()], generator=_gen())
    expected = 2.0 * (0.1 * math.log(3)) / (1.0 + 1.0 + 0.1)
    assert out["loss_ce"].item() == pytest.approx(expected, rel=1e-5)


def test_ce_equals_manual_weighted_ce():
    _, masks = _perfect()  # masks make the matching unambiguous: q0 <-> t1, q2 <-> t0
    logits = torch.randn(1, 3, 3, generator=_gen(3))
    crit = SetCriterion(HungarianMatcher(cost_class=0.0, num_points=64), LossConfig(num_points=64))
    out = crit({"pred_logits": logits, "pred_masks": masks}, [_targets()], generator=_gen())
    logp = logits[0].log_softmax(-1)
    target_class = [1, 2, 0]  # q1 unmatched -> background (index 2)
    w = [1.0, 0.1, 1.0]
    manual = -sum(wi * logp[q, c] for q, (c, wi) in enumerate(zip(target_class, w))) / sum(w)
    assert out["loss_ce"].item() == pytest.approx(2.0 * manual.item(), rel=1e-5)
    # and the 0.1 matters: unweighted CE differs
    assert abs(out["loss_ce"].item() - 2.0 * F.cross_entropy(logits[0], torch.tensor(target_class)).item()) > 1e-4


def test_aux_losses_with_suffixes_and_weights():
    logits, masks = _perfect()
    logits = logits + torch.randn(1, 3, 3, generator=_gen(1)) * 30
    masks = masks + torch.randn(1, 3, h, h, generator=_gen(2)) * 30
    outputs = {"pred_logits": logits, "pred_masks": masks,
               "aux_outputs": [{"pred_logits": logits, "pred_masks": masks} for _ in range(2)]}
    torch.manual_seed(5)
    weighted = SetCriterion.from_config(LossConfig(num_points=128))(outputs, [_targets()])
    assert set(weighted) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert weighted["loss_ce_0"].item() == pytest.approx(weighted["loss_ce"].item(), rel=1e-6)
    assert weighted["loss_ce_1"].item() == pytest.approx(weighted["loss_ce"].item(), rel=1e-6)
    # the same global seed -> the same points: unit weights give exactly 1/2, 1/5, 1/5 of the losses
    unit = LossConfig(class_weight=1.0, mask_weight=1.0, dice_weight=1.0, num_points=128)
    torch.manual_seed(5)
    plain = SetCriterion(HungarianMatcher(2.0, 5.0, 5.0, num_points=128), unit)(outputs, [_targets()])
    for key in weighted:
        factor = 2.0 if key.startswith("loss_ce") else 5.0
        assert weighted[key].item() == pytest.approx(factor * plain[key].item(), rel=1e-5)


def test_num_masks_normalisation_and_empty_images():
    logits, masks = _perfect()
    logits = logits + torch.randn(1, 3, 3, generator=_gen(1)) * 30
    masks = masks + torch.randn(1, 3, h, h, generator=_gen(2)) * 30
    crit = SetCriterion.from_config(LossConfig(num_points=128))
    one = crit({"pred_logits": logits, "pred_masks": masks}, [_targets()], generator=_gen(9))
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, H)}
    two = crit({"pred_logits": logits.repeat(2, 1, 1), "pred_masks": masks.repeat(2, 1, 1, 1)},
               [_targets(), empty], generator=_gen(9))
    # an image without targets adds no mask term and does not change num_masks (= 2)
    assert two["loss_mask"].item() == pytest.approx(one["loss_mask"].item(), rel=1e-6)
    assert two["loss_dice"].item() == pytest.approx(one["loss_dice"].item(), rel=1e-6)
    assert count_masks([_targets(), empty, _targets()]) == 4.0
    assert count_masks([empty]) == 1.0  # clamped
    # loss_masks is a sum over masks divided by num_masks
    idx = crit.matcher(logits, masks, [_targets()])
    a = crit.loss_masks(masks, [_targets()], idx, 1.0, generator=_gen(4))
    b = crit.loss_masks(masks, [_targets()], idx, 4.0, generator=_gen(4))
    assert a[0].item() == pytest.approx(4 * b[0].item(), rel=1e-6)
    assert a[1].item() == pytest.approx(4 * b[1].item(), rel=1e-6)


def test_no_targets_at_all_gives_zero_mask_losses_with_graph():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    masks = torch.randn(2, 3, h, h, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, H)}
    out = SetCriterion.from_config(LossConfig(num_points=32))({"pred_logits": logits, "pred_masks": masks},
                                                              [empty, empty])
    assert out["loss_mask"].item() == 0.0 and out["loss_dice"].item() == 0.0
    # every query's target is background: CE = mean(-log p_bg) * 2
    assert out["loss_ce"].item() == pytest.approx(2.0 * -logits.log_softmax(-1)[..., -1].mean().item(), rel=1e-5)
    sum(out.values()).backward()
    assert masks.grad is not None and torch.all(masks.grad == 0)
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gradients_reach_predictions_and_k_varies():
    crit = SetCriterion.from_config(LossConfig(num_points=64))
    for k_plus_1 in (3, 6):
        logits = torch.randn(1, 3, k_plus_1, requires_grad=True)
        masks = torch.randn(1, 3, h, h, requires_grad=True)
        out = crit({"pred_logits": logits, "pred_masks": masks}, [_targets()])
        sum(out.values()).backward()
        assert logits.grad.abs().sum() > 0 and masks.grad.abs().sum() > 0


def test_uncertainty_sampling_deterministic_and_focused():
    # logits = 100 * (x - 0.5): uncertainty -|logit| is highest on the vertical line x = 0.5
    xs = (torch.arange(64) + 0.5) / 64
    logits = (100 * (xs - 0.5)).expand(64, 64)[None, None].repeat(2, 1, 1, 1)
    p = 400
    a = uncertain_points_with_randomness(logits, p, 3.0, 0.75, generator=_gen(11))
    b = uncertain_points_with_randomness(logits, p, 3.0, 0.75, generator=_gen(11))
    c = uncertain_points_with_randomness(logits, p, 3.0, 0.75, generator=_gen(12))
    assert a.shape == (2, p, 2) and torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = uncertain_points_with_randomness(logits, p)
    torch.manual_seed(3)
    assert torch.equal(d, uncertain_points_with_randomness(logits, p))
    assert a.min() >= 0 and a.max() <= 1
    n_imp = int(0.75 * p)
    imp, rnd = a[:, :n_imp], a[:, n_imp:]
    # the 300 most uncertain of 1200 uniform candidates: |x - 0.5| < ~1/8; the random rest ~ 1/4 on average
    assert (imp[..., 0] - 0.5).abs().max() < 0.15
    assert (rnd[..., 0] - 0.5).abs().mean() > 0.18
    # read back: the importance points all sit where |logit| is small (100 * 0.15 = 15)
    vals = point_sample(logits, imp)[:, 0].abs()
    assert vals.max() < 16.0


# ---------------------------------------------------------------- 2 real processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    n = 1 if rank == 0 else 3  # rank 0: 1 target, rank 1: 3 targets -> num_masks = (1 + 3) / 2 = 2
    g = torch.Generator().manual_seed(100 + rank)
    tm = torch.rand(n, 32, 32, generator=g) > 0.5
    target = {"labels": torch.randint(0, 2, (n,), generator=g), "masks": tm}
    outputs = {"pred_logits": torch.randn(1, 4, 3, generator=g), "pred_masks": torch.randn(1, 4, 8, 8, generator=g)}
    crit = SetCriterion.from_config(LossConfig(num_points=64))
    local = crit(outputs, [target], generator=torch.Generator().manual_seed(7))  # no process group yet
    local_count = count_masks([target])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        count = count_masks([target])
        shared = crit(outputs, [target], generator=torch.Generator().manual_seed(7))
    finally:
        dist.destroy_process_group()
    torch.save({"local_count": local_count, "count": count, "local": {k: v.item() for k, v in local.items()},
                "shared": {k: v.item() for k, v in shared.items()}}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(60)
def test_num_masks_all_reduced_across_two_processes(tmp_path):
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank, n in ((0, 1), (1, 3)):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["local_count"] == float(n)
        assert r["count"] == 2.0
        assert r["shared"]["loss_ce"] == pytest.approx(r["local"]["loss_ce"], rel=1e-6)
        for key in ("loss_mask", "loss_dice"):  # same points, divided by 2 instead of n
            assert r["shared"][key] == pytest.approx(r["local"][key] * n / 2.0, rel=1e-5)
