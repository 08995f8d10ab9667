"""The shipped attribute checker (numpy inference) on fresh synthetic images."""

from __future__ import annotations

import numpy as np

from iap_rt.train.toy.checker import HEADS, Checker, synthetic_set


def test_checker_accuracy_on_fresh_images():
    imgs, labels = synthetic_set(240, seed=777)  # every combination twice
    preds = Checker().predict(imgs)
    ok = np.array(
        [[p[k] == HEADS[k][labels[i, j]] for j, k in enumerate(HEADS)] for i, p in enumerate(preds)]
    )
    assert ok.all(1).mean() >= 0.98, ok.mean(0)
