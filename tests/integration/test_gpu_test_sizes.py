"""The GPU tests' sizes, checked here on the CPU: every request tests/gpu/test_trt_gpu.py
feeds passes the runtime's input check and is covered by the profile of an engine built
(for real, by TensorRT-RTX without a GPU) with the config that test builds, and the request
it expects refused is not. Sizes that assume SD's VAE factor of 8 fail this on the embedded
model (factor 1, latents in multiples of 16)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tensorrt_rtx", reason="engine builds need tensorrt-rtx-cu13")

from iap_rt import enginedir as ed  # noqa: E402
from iap_rt.engines.config import EngineConfig  # noqa: E402
from iap_rt.engines.stage import build_engines  # noqa: E402
from iap_rt.modeldir import ModelDir, default_model_dir  # noqa: E402
from iap_rt.specs import CORE_NETWORKS, NETWORKS  # noqa: E402

GPU_TEST = Path(__file__).parents[1] / "gpu" / "test_trt_gpu.py"


@pytest.fixture(scope="module")
def gpu_test():
    spec = importlib.util.spec_from_file_location("gpu_test_trt_gpu", GPU_TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _engines(model_dir: Path, config: EngineConfig) -> dict[str, list[dict]]:
    build_engines(model_dir, config, echo=lambda _m: None)
    md = ModelDir.open(model_dir)
    out: dict[str, list[dict]] = {}
    for d in md.engines_dir.iterdir():
        for sc in ed.sidecars(d):
            side = json.loads(sc.read_text())
            out.setdefault(side["network"], []).append(side["profile"]["axes"])
    return out


def _covered(md: ModelDir, engines, net: str, vals: dict) -> bool:
    """What the TensorRT runner does with a request: check the feeds, then find an engine."""
    feeds = NETWORKS[net].dummy_inputs(md.dims, md.precision(net), vals, seed=0, vocab_size=100)
    got = NETWORKS[net].check_feeds(feeds, md.dims, md.precision(net))
    return any(ed.profile_covers(axes, got) for axes in engines[net])


def _copy(tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(default_model_dir(), dst, ignore=shutil.ignore_patterns("engines"))
    return dst


def test_static_engines_cover_every_request_of_the_gpu_tests(gpu_test, tmp_path):
    dst = _copy(tmp_path)
    md = ModelDir.open(dst)
    engines = _engines(dst, EngineConfig(flavour="tensorrt_rtx"))
    vals = gpu_test.values(md)
    assert set(vals) == set(CORE_NETWORKS) and set(engines) == set(md.networks)
    for net, v in vals.items():
        assert _covered(md, engines, net, v), (net, v, engines[net])
    # what the old sizes asked for (a 128-pixel image at SD's factor 8: 16x16 latents)
    assert not _covered(md, engines, "unet", {"N": 2, "h": 16, "w": 16})


def test_dynamic_profile_serves_what_the_gpu_test_expects(gpu_test, tmp_path):
    dst = _copy(tmp_path)
    md = ModelDir.open(dst)
    options, served, refused = gpu_test.dynamic_case(md)
    engines = _engines(dst, EngineConfig(flavour="tensorrt_rtx", networks="unet", **options))
    assert len(engines["unet"]) == 1
    for v in served:
        assert _covered(md, engines, "unet", v), (v, engines["unet"])
    assert not _covered(md, engines, "unet", refused)
