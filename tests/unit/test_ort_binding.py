"""The ONNX Runtime runner's bound-buffer path (the CUDA provider's IO binding, exercised here
on CPU ``OrtValue`` objects) and the frozen-shape sessions CUDA graphs are captured from."""

import warnings

import numpy as np
import onnxruntime as ort
import pytest

from iap_rt.backends.ort import OrtBackend, OrtRunner
from iap_rt.errors import BackendUnavailableError, ConfigError
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.pipeline import Pipeline
from iap_rt.specs import NETWORKS


@pytest.fixture(scope="module")
def model():
    return ModelDir.open(default_model_dir())


def _runner(model, name, binding):
    backend = OrtBackend("cpu", threads=1)
    return OrtRunner(
        NETWORKS[name],
        model.network_path(name),
        model.dims,
        model.precision(name),
        backend.providers,
        backend.session_options,
        binding=binding,
    )


def _values(model, name, n=2, side=None):
    side = side or model.dims.latent_multiple
    return {"N": n, "B": n, "h": side, "w": side}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_bound_buffers_match_plain_run_and_are_not_aliased(model, name):
    plain, bound = _runner(model, name, None), _runner(model, name, "cpu")
    spec = NETWORKS[name]
    a = spec.dummy_inputs(
        model.dims, model.precision(name), _values(model, name), seed=1, vocab_size=20
    )
    b = spec.dummy_inputs(
        model.dims, model.precision(name), _values(model, name), seed=2, vocab_size=20
    )
    out_a = bound.run(a)
    kept = {k: v.copy() for k, v in out_a.items()}
    out_b = bound.run(b)  # same shapes: the same bound buffers are reused ...
    first_binding = bound._bound
    for k in spec.output_names:
        np.testing.assert_array_equal(out_a[k], kept[k])  # ... without overwriting a result
        np.testing.assert_allclose(out_a[k], plain.run(a)[k], rtol=0, atol=1e-6)
        np.testing.assert_allclose(out_b[k], plain.run(b)[k], rtol=0, atol=1e-6)
        if not np.array_equal(plain.run(a)[k], plain.run(b)[k]):  # (the toy VAE's std is not)
            assert not np.array_equal(out_a[k], out_b[k])
    assert bound._bound is first_binding

    # new shapes (batch 1, a larger image): re-bound, still the plain result
    values = _values(model, name, n=1, side=2 * model.dims.latent_multiple)
    c = spec.dummy_inputs(model.dims, model.precision(name), values, seed=3, vocab_size=20)
    out_c = bound.run(c)
    assert bound._bound is not first_binding
    for k in spec.output_names:
        np.testing.assert_allclose(out_c[k], plain.run(c)[k], rtol=0, atol=1e-6)


def test_frozen_shape_session_matches_dynamic_one(model):
    """The session a CUDA graph is captured from fixes N/h/w; its output must not change."""
    runner = _runner(model, "unet", None)
    values = _values(model, "unet")
    feeds = NETWORKS["unet"].dummy_inputs(model.dims, model.precision("unet"), values)
    frozen = ort.InferenceSession(
        str(model.network_path("unet")),
        runner.frozen_options({k: values[k] for k in ("N", "h", "w")}),
        providers=["CPUExecutionProvider"],
    )
    shapes = {i.name: i.shape for i in frozen.get_inputs()}
    side = model.dims.latent_multiple
    assert shapes["sample"] == [2, model.dims.latent_channels, side, side]
    np.testing.assert_allclose(
        frozen.run(None, feeds)[0], runner.run(feeds)["noise_pred"], rtol=0, atol=1e-6
    )


def test_pipeline_on_bound_buffers_matches_plain(model):
    kw = dict(steps=3, seed=0, height=32, width=32)
    plain = Pipeline(model, OrtBackend("cpu", threads=1), progress=False)
    bound = Pipeline(model, OrtBackend("cpu", threads=1), progress=False)
    for name in list(bound.runners):
        bound.runners[name] = _runner(model, name, "cpu")
    a = plain("左边有一个红色的圆", **kw).latents
    b = bound("左边有一个红色的圆", **kw).latents
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_cuda_graph_needs_the_cuda_provider(model):
    with pytest.raises(ConfigError, match="CUDA graphs need the CUDA execution provider"):
        OrtBackend("cpu", cuda_graph=True)
    backend = OrtBackend("cpu", threads=1)
    with pytest.raises(ConfigError, match="CUDA graphs"):
        OrtRunner(
            NETWORKS["unet"],
            model.network_path("unet"),
            model.dims,
            model.precision("unet"),
            backend.providers,
            backend.session_options,
            binding="cpu",
            cuda_graph=True,
        )


def test_a_cuda_session_that_falls_back_to_the_cpu_is_refused(model):
    """This CPU build of ONNX Runtime has no CUDA provider: asked for one it only warns and
    runs on the CPU (as onnxruntime-gpu does when CUDA/cuDNN do not load). The runner says so."""
    backend = OrtBackend("cpu", threads=1)
    with (
        warnings.catch_warnings(),
        pytest.raises(BackendUnavailableError, match="could not start CUDAExecutionProvider") as e,
    ):
        warnings.simplefilter("ignore")  # ONNX Runtime's own "not available" warning
        OrtRunner(
            NETWORKS["unet"],
            model.network_path("unet"),
            model.dims,
            model.precision("unet"),
            [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
            backend.session_options,
            binding="cuda",
        )
    assert "onnxruntime-gpu" in e.value.fix
