"""One ONNX Runtime session per network per use: the input signature is read from the ONNX
file without weights (:mod:`iap_rt.onnxsig`), never from a session opened only to ask it;
``ort-graph`` opens the graph session of its shapes on first use and nothing at load.
Sessions are counted by wrapping ``onnxruntime.InferenceSession``; the CUDA-graph path runs
against a fake CUDA session (this machine's ONNX Runtime has no CUDA provider)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from iap_rt.backends.ort import OrtBackend, OrtRunner
from iap_rt.errors import ArtifactError, ArtifactMismatchError
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.onnxsig import read_inputs
from iap_rt.pipeline import Pipeline
from iap_rt.specs import NETWORKS

CUDA = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model():
    return ModelDir.open(default_model_dir())


@pytest.fixture
def sessions(monkeypatch):
    """Every InferenceSession created from now on: (path, providers), real CPU sessions."""
    created, real = [], ort.InferenceSession

    def counting(path, sess_options=None, providers=None, **kw):
        created.append((str(path), providers))
        return real(path, sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    return created


# ---- the signature, read from the file -----------------------------------------------------
@pytest.mark.parametrize("name", list(NETWORKS))
def test_signature_from_the_file_equals_onnx_runtimes(model, name):
    path = model.network_path(name)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = {i.name: i.type for i in session.get_inputs()}
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    assert read_inputs(path) == {k: np.dtype(types[v]) for k, v in want.items()}


def _external_model(tmp_path, initializer_as_input: bool):
    """fp16 ``x`` and int64 ``ids`` in, a weight stored as external data beside the file,
    optionally also listed as a graph input (old exporters did)."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float16), "weight")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
    ]
    if initializer_as_input:
        inputs.append(helper.make_tensor_value_info("weight", TensorProto.FLOAT16, [4, 4]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"], name="mm")],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])],
        [w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    return path


@pytest.mark.parametrize("initializer_as_input", [False, True])
def test_signature_skips_initializers_and_never_reads_the_weights(tmp_path, initializer_as_input):
    path = _external_model(tmp_path, initializer_as_input)
    (tmp_path / "m.onnx.data").unlink()  # the weights are not needed to read the signature
    assert read_inputs(path) == {"x": np.dtype(np.float16), "ids": np.dtype(np.int64)}


def test_a_truncated_file_is_an_artifact_error(model, tmp_path):
    data = model.network_path("unet").read_bytes()
    bad = tmp_path / "unet.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        read_inputs(bad)


def test_a_wrong_precision_is_refused_before_any_session(model, sessions):
    with pytest.raises(ArtifactMismatchError, match="do not match the fp16 shape contract"):
        OrtRunner(
            NETWORKS["unet"], model.network_path("unet"), model.dims, "fp16", ["CPUExecutionProvider"],
            OrtBackend("cpu", threads=1).session_options,
        )  # fmt: skip
    assert sessions == []


# ---- sessions per use ------------------------------------------------------------------------
def test_ort_opens_one_session_per_network(model, sessions):
    pipe = Pipeline(model, OrtBackend("cpu", threads=1), progress=False)
    pipe.runners  # noqa: B018 - load
    assert len(sessions) == 3  # at load: one per network
    pipe("左边有一个红色的圆", steps=2, seed=0, height=32, width=32)
    assert sorted(p.rsplit("/", 1)[1] for p, _ in sessions) == [
        "text_encoder.onnx", "unet.onnx", "vae_decoder.onnx"
    ]  # fmt: skip
    assert all(r.sessions_opened == 1 for r in pipe.runners.values())


def test_cpu_sessions_share_one_arena_and_the_vae_keeps_no_memory_pattern(model, sessions):
    """The runtime's CPU rules (bench/results/vae_gap_sd15_cpu.json): one arena for every
    session of the process, and no memory pattern for the networks run once per image."""
    pipe = Pipeline(model, OrtBackend("cpu", threads=1), progress=False)
    opts = {n: r.session.get_session_options() for n, r in pipe.runners.items()}
    assert all(o.get_session_config_entry("session.use_env_allocators") == "1"
               for o in opts.values())  # fmt: skip
    assert not opts["vae_decoder"].enable_mem_pattern
    assert opts["unet"].enable_mem_pattern and opts["text_encoder"].enable_mem_pattern
    alone = Pipeline(model, OrtBackend("cpu", threads=1, shared_arena=False), progress=False)
    shared = pipe("左边有一个红色的圆", steps=2, seed=3, height=32, width=32).images
    own = alone("左边有一个红色的圆", steps=2, seed=3, height=32, width=32).images
    assert np.array_equal(shared, own)  # where the memory comes from changes no result
    with pytest.raises(RuntimeError):  # the opt-out sets nothing
        alone.runners["unet"].session.get_session_options().get_session_config_entry(
            "session.use_env_allocators"
        )


def test_an_ort_that_cannot_share_an_arena_keeps_one_per_session(model, monkeypatch, caplog):
    from iap_rt.backends import ort as ort_backend

    def refuse(*a, **k):
        raise RuntimeError("no env allocators here")

    monkeypatch.setattr(ort_backend, "_SHARED_ARENA", [])  # this process: not yet registered
    monkeypatch.setattr(ort, "create_and_register_allocator", refuse)
    pipe = Pipeline(model, OrtBackend("cpu", threads=1), progress=False)
    images = pipe("左边有一个红色的圆", steps=2, seed=3, height=32, width=32).images
    assert images.shape == (1, 32, 32, 3)
    assert "cannot share one CPU arena" in caplog.text
    with pytest.raises(RuntimeError):  # not asked for: the sessions' own arenas
        pipe.runners["unet"].session.get_session_options().get_session_config_entry(
            "session.use_env_allocators"
        )


class _FakeCudaSession:
    """A session that claims the CUDA provider (on a real CPU session underneath is not
    needed: IO binding is faked) and optionally refuses the graph capture at run time."""

    refuse_graph = False

    def __init__(self, path, options=None, providers=None, **kw):
        self.providers = providers
        self.graph = any(isinstance(p, tuple) and p[1].get("enable_cuda_graph") for p in providers)
        _FakeCudaSession.created.append(self)

    def get_providers(self):
        return [p[0] if isinstance(p, tuple) else p for p in self.providers]

    def io_binding(self):
        class Binding:
            def bind_ortvalue_input(self, name, value): ...

            def bind_ortvalue_output(self, name, value): ...

        return Binding()

    def run_with_iobinding(self, binding):
        if self.graph and self.refuse_graph:
            raise RuntimeError("CUDA graph capture failed: a node runs on the CPU")


@pytest.fixture
def fake_cuda(monkeypatch):
    _FakeCudaSession.created, _FakeCudaSession.refuse_graph = [], False
    monkeypatch.setattr(ort, "InferenceSession", _FakeCudaSession)
    real_value = ort.OrtValue.ortvalue_from_shape_and_type

    def on_cpu(shape, dtype, device="cpu", device_id=0):  # the CUDA buffers, in host memory
        assert device == "cuda"
        return real_value(shape, dtype, "cpu", 0)

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", on_cpu)
    return _FakeCudaSession


def _graph_runner(model, name="unet"):
    return OrtRunner(
        NETWORKS[name], model.network_path(name), model.dims, model.precision(name), CUDA,
        OrtBackend("cpu", threads=1).session_options, binding="cuda", cuda_graph=True,
    )  # fmt: skip


def _unet_feeds(model, seed):
    side = model.dims.latent_multiple
    return NETWORKS["unet"].dummy_inputs(
        model.dims, model.precision("unet"), {"N": 2, "h": side, "w": side}, seed=seed
    )


def test_ort_graph_opens_nothing_at_load_and_one_graph_session_per_shape(model, fake_cuda):
    runner = _graph_runner(model)
    assert fake_cuda.created == []  # the signature came from the file
    for seed in range(3):
        runner.run(_unet_feeds(model, seed))
    assert len(fake_cuda.created) == 1 and fake_cuda.created[0].graph
    assert runner.cuda_graph_error is None and runner.session is None


def test_a_refused_capture_costs_one_plain_session_once(model, fake_cuda):
    fake_cuda.refuse_graph = True
    runner = _graph_runner(model)
    for seed in range(3):
        runner.run(_unet_feeds(model, seed))
    assert [s.graph for s in fake_cuda.created] == [True, False]  # no retry of the graph
    assert "capture failed" in runner.cuda_graph_error
