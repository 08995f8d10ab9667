"""The auxiliary scene-from-text targets and loss of the English base (``--text-aux``)."""

import pytest

torch = pytest.importorskip("torch")


def test_scene_labels_name_layout_and_both_slots():
    from iap_rt.train.toy import scenes
    from iap_rt.train.toy.base import scene_labels

    rows = [scenes.combo_to_json(("h", ("red", "circle"), ("blue", "square"))),
            scenes.combo_to_json(("left", ("green", "cross")))]  # fmt: skip
    labels, classes = scene_labels(rows)
    assert classes == (len(scenes.LAYOUTS), 6, 4, 6, 4)
    c, s = scenes.COLOURS.index, scenes.SHAPES.index
    assert labels.tolist() == [
        [scenes.LAYOUTS.index("h"), c("red"), s("circle"), c("blue"), s("square")],
        [scenes.LAYOUTS.index("left"), c("green"), s("cross"), -1, -1],
    ]


def test_scene_loss_skips_unlabelled_entries_and_never_divides_by_zero():
    import torch.nn.functional as F

    from iap_rt.train.toy.base import scene_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g)  # heads of 2 and 3 classes
    labels = torch.tensor([[1, -1], [0, 2], [-1, -1]])
    want = (F.cross_entropy(logits[:2, :2], torch.tensor([1, 0]), reduction="sum")
            + F.cross_entropy(logits[1:2, 2:], torch.tensor([2]), reduction="sum")) / 3  # fmt: skip
    assert scene_loss(logits, labels, (2, 3)).item() == pytest.approx(want.item())
    assert scene_loss(logits, torch.full((3, 2), -1), (2, 3)).item() == 0.0
