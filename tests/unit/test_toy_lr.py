"""The toy base's learning-rate schedule: warm-up, constant, linear cool-down."""

import pytest

from iap_rt.train.toy.base import learning_rate
from iap_rt.train.toy.base_model import BaseConfig


def test_without_decay_the_schedule_is_warmup_then_constant_to_the_end():
    cfg = BaseConfig(lr=1e-3, warmup_steps=100, lr_decay_fraction=0.0)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-5)
    assert learning_rate(cfg, 49, 0.1) == pytest.approx(5e-4)
    assert learning_rate(cfg, 99, 0.2) == pytest.approx(1e-3)
    assert learning_rate(cfg, 5000, 0.999) == pytest.approx(1e-3)  # no decay


def test_decay_cools_linearly_to_zero_over_the_final_fraction():
    cfg = BaseConfig(lr=1e-3, warmup_steps=10, lr_decay_fraction=0.25)
    assert learning_rate(cfg, 500, 0.5) == pytest.approx(1e-3)
    assert learning_rate(cfg, 500, 0.75) == pytest.approx(1e-3)
    assert learning_rate(cfg, 500, 0.875) == pytest.approx(5e-4)
    assert learning_rate(cfg, 500, 1.0) == 0.0
    assert learning_rate(cfg, 500, 1.3) == 0.0  # past the budget (a resumed run): never negative
    assert learning_rate(cfg, 0, 0.9) == pytest.approx(1e-4 * 0.4)  # warm-up and decay multiply


def test_the_base_cools_down_by_default_and_changes_still_apply():
    cfg = BaseConfig()
    # the shipped base's recipe: cool down over the last 30 %, EMA over ~200 steps
    assert (cfg.lr_decay_fraction, cfg.ema_decay) == (0.3, 0.995)
    assert learning_rate(cfg, 5000, 0.85) == pytest.approx(cfg.lr * 0.5)
    assert BaseConfig(lr_decay_fraction=0.0).lr_decay_fraction == 0.0
