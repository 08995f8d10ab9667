"""Issue 16, rule 2: a call's peak memory is estimated before anything is allocated and a call
above the limit is refused with the number and the fix; large batches run in chunks, which
bounds the memory. The estimate is checked against peak RSS measured in real ONNX Runtime runs."""

import dataclasses
import json
import subprocess
import sys

import pytest

from iap_rt import memory
from iap_rt.backends.ort import OrtBackend
from iap_rt.errors import ConfigError, ResourceError
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.pipeline import Pipeline, PromptRequest

WORKER = r"""
import json, sys
from iap_rt.backends.ort import OrtBackend
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.pipeline import Pipeline
from iap_rt.requests import PromptRequest
side, images, chunk = map(int, sys.argv[1:4])
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
pipe = Pipeline(ModelDir.open(default_model_dir()), OrtBackend("cpu", threads=1), progress=False,
                chunk_size=chunk, memory_limit="off")
request = pipe.resolve(PromptRequest("左边有一个红色的圆", batch_size=images, guidance=3.0,
                                    steps=2, height=side, width=side, scheduler="ddim"))
est = pipe.estimate_memory(pipe.plan_call([request]))[0].total
pipe.generate([request])
print(json.dumps({"peak": hwm(), "estimate": est}))
"""


@pytest.fixture(scope="module")
def measured():
    """(side, images, chunk) -> peak RSS and estimate of a whole generate call, each in its own
    process (2 steps, guidance: the UNet runs twice per chunk, as in real use)."""
    out = {}
    for case in [(32, 1, 8), (128, 2, 2), (128, 12, 2), (128, 8, 8), (256, 1, 8)]:
        r = subprocess.run(
            [sys.executable, "-c", WORKER, *map(str, case)],
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        out[case] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_the_estimate_bounds_the_measured_peak_within_2_5x(measured):
    for case, m in measured.items():
        assert m["peak"] <= m["estimate"] <= 2.5 * m["peak"], (case, m)


def test_chunks_bound_the_memory_of_a_large_batch(measured):
    two, twelve, eight = measured[128, 2, 2], measured[128, 12, 2], measured[128, 8, 8]
    # 12 images in chunks of 2 need about what 2 images need; 8 in one UNet batch far more
    assert twelve["peak"] <= 1.1 * two["peak"], (twelve, two)
    assert eight["peak"] - two["peak"] >= 3 * (twelve["peak"] - two["peak"]) + 100e6
    assert eight["estimate"] > twelve["estimate"] > two["estimate"]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(ModelDir.open(default_model_dir()), OrtBackend("cpu", threads=1),
                    progress=False)  # fmt: skip


def _with_limit(pipe, limit, chunk=None):
    return Pipeline(pipe.model, pipe.backend, progress=False, memory_limit=limit,
                    chunk_size=chunk or pipe.chunk_size)  # fmt: skip


def test_refused_before_any_session_or_array_exists(pipe):
    small = _with_limit(pipe, "1MB")
    with pytest.raises(ResourceError) as e:
        small("x", steps=2, height=32, width=32)
    assert small._runners is None  # not even the sessions were created
    msg = str(e.value)
    assert "this call needs an estimated" in msg and "more than the limit of 1.0 MB" in msg
    assert "--memory-limit" in e.value.fix


def test_the_fix_names_the_largest_chunk_that_fits(pipe):
    call = memory.Call(images=8, chunk=8, guided=8, height=128, width=128)
    need = {k: pipe.estimate_memory(dataclasses.replace(call, chunk=k, guided=k))[0].total
            for k in range(1, 9)}  # fmt: skip
    limit = (need[3] + need[4]) / 2
    with pytest.raises(ResourceError) as e:
        _with_limit(pipe, limit, chunk=8).generate(
            [PromptRequest("x", batch_size=8, guidance=3.0)], steps=2, height=128, width=128
        )
    assert "--chunk-size 3" in e.value.fix
    ok = _with_limit(pipe, limit, chunk=3)
    ok.generate([PromptRequest("x", batch_size=8, guidance=3.0)], steps=1, height=128, width=128)


def test_the_fix_names_a_batch_size_when_the_outputs_do_not_fit(pipe):
    call = memory.Call(images=1, chunk=1, guided=1, height=64, width=64)
    one = pipe.estimate_memory(call)[0].total
    per_image = pipe.estimate_memory(dataclasses.replace(call, images=2))[0].total - one
    limit = one + 100 * per_image + per_image / 2
    with pytest.raises(ResourceError) as e:
        _with_limit(pipe, limit, chunk=1)("x", steps=1, height=64, width=64, batch_size=1000)
    assert "at most 101 image(s) per call (--batch-size 101)" in e.value.fix


def test_auto_is_a_fraction_of_what_this_process_can_reach(pipe, monkeypatch):
    monkeypatch.setattr(memory, "_ram_available", lambda: 50e6)
    monkeypatch.setattr(memory, "_own_rss", lambda: 100e6)
    with pytest.raises(ResourceError) as e:
        _with_limit(pipe, "auto")("x", steps=1, height=256, width=256)
    assert "(90% of the 150.0 MB of RAM this process can use)" in str(e.value)
    monkeypatch.setattr(memory, "_ram_available", lambda: None)  # cannot be told: no guard
    _with_limit(pipe, "auto")("x", steps=1, height=32, width=32)


def test_pools_follow_the_backend(pipe):
    call = memory.Call(images=2, chunk=2, guided=2, height=64, width=64)
    md = pipe.model
    cpu = memory.estimate(md, "ort", "cpu", True, call)
    cuda = memory.estimate(md, "ort", "cuda", True, call)
    trt = memory.estimate(md, "trt", "cuda:0 (GPU)", False, call)
    assert [e.pool for e in cpu] == ["RAM"]
    assert [e.pool for e in cuda] == ["RAM", "GPU memory"]
    assert sum(e.total for e in cuda) == pytest.approx(cpu[0].total)
    assert [e.pool for e in trt] == ["RAM"] and trt[0].total < cuda[1].total + cuda[0].total


def test_fp16_halves_the_activations_and_fused_attention_drops_the_scores():
    arch = memory.SD15_ARCH["unet"]
    fp32 = memory.unet_activations(arch, 2, 64, 64, 4, scores=False)
    assert memory.unet_activations(arch, 2, 64, 64, 2, scores=False) == fp32 / 2
    scores = memory.unet_activations(arch, 2, 64, 64, 4, scores=True) - fp32
    assert scores == pytest.approx(3.2 * 2 * 8 * 4096**2 * 4)  # SD 1.5's 64x64 level


def test_a_manifest_without_arch_assumes_sd15(pipe):
    m = dict(pipe.model.manifest)
    m.pop("arch")
    old = ModelDir(pipe.model.path, m)
    call = memory.Call(images=1, chunk=1, guided=1, height=32, width=32)
    assert (
        memory.estimate(old, "ort", "cpu", True, call)[0].total
        > pipe.estimate_memory(call)[0].total
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("12GB", 12e9),
        ("800MiB", 800 * 2**20),
        ("1.5t", 1.5e12),
        ("512", 512.0),
        (1e9, 1e9),
        ("auto", "auto"),
        (None, "auto"),
        ("off", None),
    ],  # fmt: skip
)
def test_parse_limit(text, value):
    assert memory.parse_limit(text) == value


@pytest.mark.parametrize("bad", ["lots", "0", "-1GB", float("nan"), float("inf"), True, "1e9"])
def test_parse_limit_refuses(bad):
    with pytest.raises(ConfigError, match="is not a size"):
        memory.parse_limit(bad)
