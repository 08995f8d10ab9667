"""A toy work dir (grid, curves, plug-in) belongs to one base: its weights, not its path."""

import json

import pytest

from iap_rt.errors import InputError
from iap_rt.train.toy.workdir import base_fingerprint, check_same_base, pin_record


def _base(root, unet=b"unet-weights", text=b"text-weights"):
    for sub, data in (("unet", unet), ("text_encoder", text)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "model.safetensors").write_bytes(data)
    return root


def test_first_use_records_the_base_and_the_same_weights_pass(tmp_path):
    base, work = _base(tmp_path / "b"), tmp_path / "w"
    work.mkdir()
    check_same_base(work, base)
    assert json.loads((work / "base.json").read_text())["sha256"] == base_fingerprint(base)
    copy = _base(tmp_path / "elsewhere")  # same weights at another path: the same base
    assert check_same_base(work, copy) == base_fingerprint(base)


def test_a_retrained_base_at_the_same_path_is_refused(tmp_path):
    base, work = _base(tmp_path / "b"), tmp_path / "w"
    work.mkdir()
    check_same_base(work, base)
    _base(base, text=b"retrained")
    with pytest.raises(InputError, match="another base"):
        check_same_base(work, base)


def test_results_without_a_recorded_base_are_refused(tmp_path):
    base, work = _base(tmp_path / "b"), tmp_path / "w"
    work.mkdir()
    (work / "english.json").write_text("{}")
    with pytest.raises(InputError, match="fresh --work"):
        check_same_base(work, base)
    assert not (work / "base.json").exists()


def test_a_directory_without_weights_is_named(tmp_path):
    with pytest.raises(Exception, match="no unet/ or text_encoder/"):
        base_fingerprint(tmp_path)


def test_a_pinned_record_compared_whole_refuses_any_change(tmp_path):
    own, results = tmp_path / "finetuned.json", tmp_path / "english.json"
    kw = {"key": None, "refuse": "another fine-tune", "unpinned": results, "legacy": "older"}
    pin_record(own, {"from": "b", "steps": 10}, **kw)
    results.write_text("{}")
    pin_record(own, {"from": "b", "steps": 10}, **kw)  # the same producer: results may mix
    with pytest.raises(InputError, match="another fine-tune"):
        pin_record(own, {"from": "b", "steps": 11}, **kw)
    own.unlink()
    with pytest.raises(InputError, match="older"):  # results, but nothing says whose
        pin_record(own, {"from": "b", "steps": 10}, **kw)
