"""The toy bases' learning-rate schedule: warm-up, constant, optional linear cool-down."""

import pytest

from iap_rt.train.toy.base import BaseConfig, learning_rate
from iap_rt.train.toy2.base import base_config


def test_v1_schedule_is_warmup_then_constant_to_the_end():
    cfg = BaseConfig(lr=1e-3, warmup_steps=100)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-5)
    assert learning_rate(cfg, 49, 0.1) == pytest.approx(5e-4)
    assert learning_rate(cfg, 99, 0.2) == pytest.approx(1e-3)
    assert learning_rate(cfg, 5000, 0.999) == pytest.approx(1e-3)  # no decay: v1's base


def test_decay_cools_linearly_to_zero_over_the_final_fraction():
    cfg = BaseConfig(lr=1e-3, warmup_steps=10, lr_decay_fraction=0.25)
    assert learning_rate(cfg, 500, 0.5) == pytest.approx(1e-3)
    assert learning_rate(cfg, 500, 0.75) == pytest.approx(1e-3)
    assert learning_rate(cfg, 500, 0.875) == pytest.approx(5e-4)
    assert learning_rate(cfg, 500, 1.0) == 0.0
    assert learning_rate(cfg, 500, 1.3) == 0.0  # past the budget (a resumed run): never negative
    assert learning_rate(cfg, 0, 0.9) == pytest.approx(1e-4 * 0.4)  # warm-up and decay multiply


def test_v2_base_cools_down_and_changes_still_apply():
    cfg = base_config()
    assert cfg.lr_decay_fraction > 0 and cfg.ema_decay < BaseConfig().ema_decay
    assert base_config(lr_decay_fraction=0.0).lr_decay_fraction == 0.0
