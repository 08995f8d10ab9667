"""The one owner of what a request means (iap_rt.requests): defaults from the model, every rule
once, the model's notice, and one validation per request through ``iap-rt generate``."""

import json
import logging

import numpy as np
import pytest

from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.requests import (
    DEFAULT_STEPS,
    PromptRequest,
    RequestError,
    model_defaults,
    resolve,
    trusted,
)

MODEL = ModelDir.open(default_model_dir())


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text("utf-8"))
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    (path / "manifest.json").write_text(json.dumps(m), "utf-8")


def test_unset_fields_take_the_models_defaults(model_copy):
    r = resolve(MODEL, PromptRequest("左边有一个红色的圆"))
    assert (r.steps, r.scheduler, r.guidance, r.height, r.width) == (DEFAULT_STEPS, "ddim", 3.0,
                                                                     32, 32)  # fmt: skip
    _edit_manifest(model_copy, default_scheduler="euler", default_guidance=5.0, image_size=48)
    other = ModelDir.open(model_copy)
    r = resolve(other, PromptRequest("左边有一个红色的圆"))
    assert (r.scheduler, r.guidance, r.height, r.width) == ("euler", 5.0, 48, 48)
    given = resolve(other, PromptRequest("x", guidance=0.0, steps=3, height=16, width=64,
                                         scheduler="dpm++"))  # fmt: skip
    assert (given.guidance, given.steps, given.height, given.width, given.scheduler) == (
        0.0, 3, 16, 64, "dpm++")  # fmt: skip
    assert model_defaults(other) | {"schedulers": None} == {
        "steps": 25, "guidance": 5.0, "scheduler": "euler", "height": 48, "width": 48,
        "size_multiple": 16, "schedulers": None}  # fmt: skip


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"height": 30}, "height", "multiple of 16"),
        ({"width": 0}, "width", "multiple of 16"),
        ({"steps": 0}, "steps", "from 1 to 1000"),
        ({"steps": 1001}, "steps", "from 1 to 1000"),
        ({"scheduler": "plms"}, "scheduler", "unknown scheduler"),
        ({"scheduler": False}, "scheduler", "unknown scheduler"),
        ({"guidance": float("nan")}, "guidance", "guidance must be a number"),
        ({"guidance": 101}, "guidance", "guidance must be a number"),
        ({"seed": -1}, "seed", "seed must be an integer"),
        ({"batch_size": 0}, "batch_size", "batch size"),
        ({"prompt": 3}, "prompt", "prompt must be a string"),
        ({"latents": np.zeros((1, 3, 2, 2))}, "latents", "latents of shape"),
    ],
)
def test_each_rule_names_its_field(change, field, words):
    with pytest.raises(RequestError, match=words) as e:
        resolve(MODEL, PromptRequest(**({"prompt": "x"} | change)))
    assert e.value.field == field and e.value.exit_code == 2


def test_parts_of_a_request_keep_its_images():
    r = resolve(MODEL, PromptRequest("x", seed=10, batch_size=5, latents=np.zeros((5, 3, 32, 32))))
    p = r.part(2, 3)
    assert (p.seed, p.batch_size, p.latents.shape, p.steps) == (12, 3, (3, 3, 32, 32), r.steps)
    with pytest.raises(ValueError):
        r.part(4, 2)


def test_a_request_resolved_against_the_same_model_is_trusted(model_copy):
    r = resolve(MODEL, PromptRequest("左边有一个红色的圆", seed=3))
    fields = {k: getattr(r, k) for k in ("prompt", "negative_prompt", "seed", "guidance",
                                         "batch_size", "steps", "height", "width", "scheduler")}  # fmt: skip
    again = trusted(ModelDir.open(default_model_dir()), fields, r.model_key)
    assert again == r
    _edit_manifest(model_copy, default_guidance=5.0)
    assert trusted(ModelDir.open(model_copy), fields, r.model_key) is None
    assert trusted(MODEL, fields, "") is None


def test_the_notice_names_what_the_model_draws_and_the_fix(model_copy):
    n = resolve(MODEL, PromptRequest("山水画")).notice
    assert "--model DIR" in n and "coloured shapes" in n and "左边有一个红色的圆" in n
    assert resolve(MODEL, PromptRequest("左边有一个红色的圆")).notice is None
    assert resolve(MODEL, PromptRequest("一个蓝色的十字")).notice is None
    _edit_manifest(model_copy, caption_world=None)  # a real SD model declares nothing
    assert resolve(ModelDir.open(model_copy), PromptRequest("山水画")).notice is None


def test_generate_resolves_each_request_once_and_prints_the_notice(tmp_path, run_cli, caplog):
    caplog.set_level(logging.INFO, logger="iap_rt.requests")
    prompts = tmp_path / "p.txt"
    prompts.write_text("山水画\n左边有一个红色的圆\n", "utf-8")
    r = run_cli("generate", "--prompts-file", str(prompts), "--batch-size", "3",
                "--chunk-size", "2", "--steps", "2", "--out", str(tmp_path / "o"),
                "--no-progress")  # fmt: skip
    assert r.code == 0, r.err
    resolved = [x for x in caplog.records if x.getMessage().startswith("resolved request")]
    assert len(resolved) == 2  # one per prompt, not one per chunk or per layer
    notes = [x for x in r.err.splitlines() if x.startswith("note: ")]
    assert len(notes) == 1 and "--model DIR" in notes[0]
    assert len(list((tmp_path / "o").glob("*.png"))) == 6
    r = run_cli("generate", "左边有一个红色的圆", "--steps", "2", "--out", str(tmp_path / "a.png"))
    assert r.code == 0 and "note:" not in r.err
