"""The lr multiplier of `recipe.lr_lambda`, at exact steps (issue 10, T9: the reference S1 schedule,
mmengine LinearLR(start_factor=1e-5, end=0.03 * 36 epochs) then MultiStepLR(milestones=[24, 30]) from
the warmup's end, both iteration based)."""

from __future__ import annotations

import pytest

from xsam.train.config import TrainConfig
from xsam.train.recipe import lr_lambda


def _s1(**kw) -> TrainConfig:
    return TrainConfig(stage="s1", schedule="multistep", milestones=[24, 30], gamma=0.1, warmup_ratio=0.03, **kw)


def test_multistep_with_linear_warmup_from_start_factor():
    # 36 epochs x 100 steps: warmup on steps 0..107 (w = 108) from 1e-5 to 1 at step 107 (mmengine
    # total_iters = w - 1); the milestones count from step 108: x0.1 at 108 + 2400, x0.01 at 108 + 3000
    f = lr_lambda(_s1(warmup_start_factor=1e-5), total_steps=3600, steps_per_epoch=100)
    assert f(0) == pytest.approx(1e-5)
    assert f(53) == pytest.approx(1e-5 + (1 - 1e-5) * 53 / 107)
    assert f(107) == pytest.approx(1.0)
    assert f(108) == 1.0 and f(2507) == 1.0
    assert f(2508) == pytest.approx(0.1) and f(3107) == pytest.approx(0.1)
    assert f(3108) == pytest.approx(0.01) and f(3599) == pytest.approx(0.01)


def test_warmup_then_milestones_counted_from_its_end():
    # 50 steps/epoch x 10 epochs, w = 15: warmup steps 0..14 (1 at step 14), milestone 2 epochs after step 15
    cfg = TrainConfig(stage="s1", schedule="multistep", milestones=[2], gamma=0.5, warmup_ratio=0.03,
                      warmup_start_factor=0.1)
    f = lr_lambda(cfg, total_steps=500, steps_per_epoch=50)
    assert f(0) == pytest.approx(0.1) and f(14) == pytest.approx(1.0)
    assert f(15) == 1.0 and f(114) == 1.0 and f(115) == 0.5


def test_multistep_without_start_factor_has_no_warmup():
    f = lr_lambda(_s1(), total_steps=3600, steps_per_epoch=100)
    assert f(0) == 1.0 and f(107) == 1.0 and f(2399) == 1.0 and f(2400) == pytest.approx(0.1)
