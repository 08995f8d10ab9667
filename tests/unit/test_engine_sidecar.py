"""Engine sidecars, safe loading and the TensorRT backend's data path, without TensorRT or
a GPU. Every sidecar field is checked against the model/TensorRT/GPU and the engine file's
size and sha256 against the sidecar before anything reaches TensorRT's deserializer. The
runtime then runs against a simulated TensorRT + CUDA (host memory standing in for device
memory): buffers allocated once at the profile's largest shapes and bound once, one shared
activation buffer sized to the largest engine, copies of the right sizes, engine choice by
profile, CUDA-graph capture and replay of the UNet step, everything freed on close."""

from __future__ import annotations

import ctypes
import hashlib
import json
import types

import numpy as np
import pytest

from iap_rt import cuda as cudart
from iap_rt import enginedir as ed
from iap_rt.backends import trt as rt
from iap_rt.errors import (
    ArtifactError,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    BackendUnavailableError,
    ConfigError,
)
from iap_rt.modeldir import ModelDir
from iap_rt.specs import DERIVED_AXES, NETWORKS, spec_hash

RTX_VERSION = "1.7.1.116"
RTX_4090 = cudart.GpuInfo(0, "NVIDIA GeForce RTX 4090", (8, 9))
LABELS = {"text_encoder": "N1-2", "unet": "N2_h64_w64", "vae_decoder": "B1_h64_w64",
          "vae_encoder": "B1_h64_w64"}  # fmt: skip


def write_engine(model_dir, network, tag="tensorrt_rtx-portable", payload=None, **fields):
    """A fake engine file + a sidecar that is correct for the model unless ``fields`` say."""
    md = ModelDir.open(model_dir)
    d = model_dir / "engines" / tag
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{network}.{LABELS[network]}"
    data = payload if payload is not None else f"engine bytes of {network}".encode() * 100
    (d / f"{stem}.plan").write_bytes(data)
    sc = {
        "format": ed.SIDECAR_FORMAT,
        "format_version": ed.SIDECAR_VERSION,
        "network": network,
        "engine_file": f"{stem}.plan",
        "engine_bytes": len(data),
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "spec_hash": spec_hash(),
        "precision": md.precision(network),
        "onnx_file": md.manifest["networks"][network]["file"],
        "onnx_sha256": md.manifest["networks"][network]["sha256"],
        "flavour": "tensorrt_rtx",
        "trt_version": RTX_VERSION,
        "target": {"gpu_tag": tag, "compute_capabilities": [], "gpu_name": None},
        "profile": {"axes": {"N": [2, 2, 2], "h": [64, 64, 64], "w": [64, 64, 64]}},
        "rebuild_args": "--height 512 --width 512 --batch 1",
        **fields,
    }
    (d / f"{stem}.json").write_text(json.dumps(sc))
    return d / f"{stem}.json", sc


@pytest.fixture
def engines(model_copy):
    """A model copy with a consistent fake engine set for TensorRT-RTX 1.7."""
    paths = {n: write_engine(model_copy, n) for n in NETWORKS}
    return model_copy, paths


class FakeTrt(types.SimpleNamespace):
    """Just enough of a TensorRT module for load() to reach the deserializer."""


class FakeCudart:
    """No CUDA calls: these tests end before load() touches device memory."""

    def set_device(self, index):
        pass


@pytest.fixture
def fake_machine(monkeypatch):
    """An RTX 4090 with TensorRT-RTX 1.7 installed. ``calls`` records the bytes handed to
    the deserializer, which returns ``result`` (a stand-in engine; None = TensorRT refused)."""

    class Logger:
        WARNING = 2

        def __init__(self, *_):
            pass

    fake = FakeTrt(__version__=RTX_VERSION, Logger=Logger, Runtime=lambda logger: object())
    machine = types.SimpleNamespace(calls=[], result=object())
    monkeypatch.setattr(cudart, "gpu_info", lambda index=0: RTX_4090)
    monkeypatch.setattr(ed, "installed_flavours", lambda: ["tensorrt_rtx"])
    monkeypatch.setattr(ed, "import_trt", lambda flavour: fake)
    monkeypatch.setattr(cudart, "CudaRuntime", FakeCudart)

    def spy(runtime, data):
        machine.calls.append(bytes(data))
        return machine.result

    monkeypatch.setattr(rt, "_deserialize", spy)
    return machine


# ---- sidecar fields -------------------------------------------------------------------
def test_consistent_sidecar_has_no_problems(engines):
    model_dir, paths = engines
    md = ModelDir.open(model_dir)
    for side, sc in paths.values():
        assert (
            ed.sidecar_problems(sc, md, flavour="tensorrt_rtx", version=RTX_VERSION, gpu=RTX_4090)
            == []
        )
        assert ed.engine_file_problem(ed.engine_path(side, sc), sc) is None


@pytest.mark.parametrize(
    "field, value, gpu, words",
    [
        ("trt_version", "1.6.0.1", RTX_4090, ["trt_version", "1.6.0.1", RTX_VERSION]),
        ("flavour", "tensorrt", RTX_4090, ["flavour", "'tensorrt'", "tensorrt_rtx"]),
        ("precision", "fp16", RTX_4090, ["precision", "fp16", "fp32"]),
        ("onnx_sha256", "0" * 64, RTX_4090, ["onnx_sha256", "re-exported"]),
        ("spec_hash", "f" * 64, RTX_4090, ["spec_hash", "shape contract"]),
        ("format_version", 99, RTX_4090, ["format_version", "99"]),
        (
            "target",
            {"gpu_tag": "tensorrt_rtx-sm86", "compute_capabilities": ["8.6"], "gpu_name": None},
            RTX_4090,
            ["compute_capability", "8.6", "8.9", "RTX 4090"],
        ),
        (None, None, cudart.GpuInfo(0, "NVIDIA GeForce RTX 2080 Ti", (7, 5)),
         ["compute_capability", "portable", "7.5"]),
    ],
)  # fmt: skip
def test_mismatch_names_field_and_rebuild_command(engines, field, value, gpu, words):
    model_dir, paths = engines
    side, sc = paths["unet"]
    if field:
        sc = {**sc, field: value}
    with pytest.raises(ArtifactMismatchError) as e:
        ed.check_sidecar(
            sc, side, ModelDir.open(model_dir), flavour="tensorrt_rtx", version=RTX_VERSION,
            gpu=gpu,
        )  # fmt: skip
    for w in words:
        assert w in e.value.message
    assert "unet.N2_h64_w64.plan" in e.value.message
    fix = e.value.fix
    assert f"iap-rt engines build --model {model_dir}" in fix
    assert "--networks unet" in fix and "--height 512 --width 512 --batch 1" in fix
    assert fix.endswith("--force")


def test_every_differing_field_reported_at_once(engines):
    model_dir, paths = engines
    side, sc = paths["vae_decoder"]
    sc = {**sc, "trt_version": "9", "precision": "fp16", "onnx_sha256": "x"}
    problems = ed.sidecar_problems(
        sc, ModelDir.open(model_dir), flavour="tensorrt_rtx", version=RTX_VERSION, gpu=RTX_4090
    )
    assert [p.split(":")[0] for p in problems] == ["precision", "onnx_sha256", "trt_version"]


def test_changed_external_data_is_a_mismatch(engines):
    """A UNet past 2 GB keeps its weights in ``unet.onnx.data``: their hash counts too."""
    model_dir, paths = engines
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["networks"]["unet"].update(external_data="unet.onnx.data", data_sha256="a" * 64)
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    md = ModelDir.open(model_dir, verify=False)  # the data file is named, not written
    _, sc = paths["unet"]
    problems = ed.sidecar_problems(
        {**sc, "onnx_data_sha256": "b" * 64}, md, flavour=None, version=None, gpu=None
    )
    assert len(problems) == 1 and problems[0].startswith("onnx_data_sha256")
    assert "unet.onnx.data" in problems[0]
    ok = ed.sidecar_problems({**sc, "onnx_data_sha256": "a" * 64}, md, flavour=None,
                             version=None, gpu=None)  # fmt: skip
    assert ok == []


def test_full_tensorrt_engine_must_match_compute_capability(engines):
    model_dir, _ = engines
    h100 = cudart.GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0))
    tag = ed.gpu_tag("tensorrt", h100)
    assert tag == "tensorrt-sm90-nvidia-h100-80gb-hbm3"
    side, sc = write_engine(
        model_dir, "unet", tag=tag, flavour="tensorrt", trt_version="10.13.0.35",
        target={"gpu_tag": tag, "compute_capabilities": ["9.0"], "gpu_name": h100.name},
    )  # fmt: skip
    md = ModelDir.open(model_dir)
    ok = ed.sidecar_problems(sc, md, flavour="tensorrt", version="10.13.0.35", gpu=h100)
    assert ok == []
    a100 = cudart.GpuInfo(0, "NVIDIA A100-SXM4-80GB", (8, 0))
    bad = ed.sidecar_problems(sc, md, flavour="tensorrt", version="10.13.0.35", gpu=a100)
    assert len(bad) == 1 and bad[0].startswith("compute_capability")


def test_gpu_tags_and_engine_dir_ranking(engines, model_copy):
    assert ed.gpu_tag("tensorrt_rtx", None) == "tensorrt_rtx-portable"
    assert ed.gpu_tag("tensorrt_rtx", None, ("8.6", "8.9")) == "tensorrt_rtx-sm86-sm89"
    with pytest.raises(BackendUnavailableError, match="needs|only on a machine"):
        ed.gpu_tag("tensorrt", None)
    write_engine(model_copy, "unet", tag="tensorrt_rtx-sm86-sm89")
    md = ModelDir.open(model_copy)
    assert ed.find_engine_dir(md, "tensorrt_rtx", RTX_4090).name == "tensorrt_rtx-sm86-sm89"
    ada_less = cudart.GpuInfo(0, "NVIDIA RTX A6000", (8, 6))
    assert ed.find_engine_dir(md, "tensorrt_rtx", ada_less).name == "tensorrt_rtx-sm86-sm89"
    blackwell = cudart.GpuInfo(0, "NVIDIA GeForce RTX 5090", (12, 0))
    assert ed.find_engine_dir(md, "tensorrt_rtx", blackwell).name == "tensorrt_rtx-portable"
    turing = cudart.GpuInfo(0, "NVIDIA GeForce RTX 2080", (7, 5))
    assert ed.find_engine_dir(md, "tensorrt_rtx", turing) is None
    assert ed.find_engine_dir(md, "tensorrt", RTX_4090) is None


def test_profile_labels_and_coverage():
    axes = {"N": [2, 2, 8], "h": [32, 64, 96], "w": [64, 64, 64]}
    assert ed.profile_label(axes) == "N2-8_h32-96_w64"
    assert ed.profile_covers(axes, {"N": 4, "h": 96, "w": 64})
    assert not ed.profile_covers(axes, {"N": 4, "h": 97, "w": 64})
    assert not ed.profile_covers(axes, {"N": 1, "h": 64, "w": 64})


# ---- engine files -----------------------------------------------------------------------
def test_truncated_corrupt_and_missing_engine_detected(engines):
    model_dir, paths = engines
    md = ModelDir.open(model_dir)
    side, sc = paths["unet"]
    plan = ed.engine_path(side, sc)
    good = plan.read_bytes()
    assert ed.read_verified_engine(side, sc, md) == good

    plan.write_bytes(good[:-10])  # truncated (a killed copy)
    with pytest.raises(ArtifactMismatchError, match="truncated or was replaced") as e:
        ed.read_verified_engine(side, sc, md)
    assert "engines build" in e.value.fix

    plan.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # same size, bit flip
    with pytest.raises(ArtifactMismatchError, match="corrupt: its sha256 differs"):
        ed.read_verified_engine(side, sc, md)

    plan.unlink()
    with pytest.raises(ArtifactNotFoundError, match="is missing"):
        ed.read_verified_engine(side, sc, md)


def test_corrupt_or_foreign_sidecar(engines):
    model_dir, paths = engines
    side, _ = paths["text_encoder"]
    side.write_text("{half a json")
    with pytest.raises(ArtifactError, match="corrupt"):
        ed.read_sidecar(side, model_dir)
    side.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not an iap-rt engine sidecar"):
        ed.read_sidecar(side, model_dir)


# ---- loading: checks first, TensorRT last --------------------------------------------------
def test_load_refuses_corrupt_engine_before_deserializing(engines, fake_machine):
    model_dir, paths = engines
    side, sc = paths["vae_decoder"]
    plan = ed.engine_path(side, sc)
    data = plan.read_bytes()
    plan.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ArtifactMismatchError, match="vae_decoder.B1_h64_w64.plan is corrupt"):
        rt.TensorRTBackend().load(ModelDir.open(model_dir))
    # text encoder and unet come first and are fine; the corrupt VAE never reached TensorRT
    assert len(fake_machine.calls) == 2
    assert plan.read_bytes() not in fake_machine.calls


@pytest.mark.parametrize("field, value", [("trt_version", "1.6.0.1"), ("precision", "fp16")])
def test_load_refuses_mismatched_sidecar_before_deserializing(engines, fake_machine, field, value):
    model_dir, _ = engines
    write_engine(model_dir, "text_encoder", **{field: value})
    with pytest.raises(ArtifactMismatchError, match=field) as e:
        rt.TensorRTBackend().load(ModelDir.open(model_dir))
    assert fake_machine.calls == []
    assert "iap-rt engines build" in e.value.fix


def test_load_hands_verified_bytes_to_tensorrt_and_reports_refusal(engines, fake_machine):
    model_dir, paths = engines
    fake_machine.result = None  # what deserialize_cuda_engine returns when it refuses
    with pytest.raises(ArtifactMismatchError, match="could not deserialize"):
        rt.TensorRTBackend().load(ModelDir.open(model_dir))
    side, sc = paths["text_encoder"]
    assert fake_machine.calls == [ed.engine_path(side, sc).read_bytes()]


def test_load_without_engines_for_this_gpu(model_copy, fake_machine):
    with pytest.raises(ArtifactNotFoundError, match="no engines for this GPU") as e:
        rt.TensorRTBackend().load(ModelDir.open(model_copy))
    assert "iap-rt engines build --model" in e.value.fix and "--backend ort" in e.value.fix


def test_load_without_gpu(engines, monkeypatch):
    monkeypatch.setattr(cudart, "gpu_info", lambda index=0: None)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        rt.TensorRTBackend().load(ModelDir.open(engines[0]))


def test_engines_usable(engines, fake_machine, monkeypatch):
    model_dir, paths = engines
    md = ModelDir.open(model_dir)
    assert ed.engines_usable(md) is True
    assert ed.engines_usable(model_dir) is True  # a path works too
    write_engine(model_dir, "unet", trt_version="1.0.0.0")
    assert ed.engines_usable(md) is False
    write_engine(model_dir, "unet")
    side, sc = paths["unet"]
    ed.engine_path(side, sc).write_bytes(b"short")
    assert ed.engines_usable(md) is False
    monkeypatch.setattr(cudart, "gpu_info", lambda index=0: None)
    write_engine(model_dir, "unet")
    assert ed.engines_usable(md) is False


def test_unknown_flavour_is_a_config_error():
    with pytest.raises(ConfigError, match="flavour"):
        rt.TensorRTBackend(flavour="tensorrt-llm")


# ---- the data path, on a simulated TensorRT + CUDA ----------------------------------------
AXES = {
    "text_encoder": {"N": [1, 2, 2]},
    "unet": {"N": [2, 2, 4], "h": [4, 8, 8], "w": [4, 8, 8]},
    "vae_decoder": {"B": [1, 1, 2], "h": [4, 8, 8], "w": [4, 8, 8]},
    "vae_encoder": {"B": [1, 1, 2], "h": [4, 8, 8], "w": [4, 8, 8]},
}
DEVICE_MEMORY = {"text_encoder": 1000, "unet": 5000, "vae_decoder": 3000, "vae_encoder": 2000}


class FakeCuda:
    """Host buffers as "device" memory; a stream capture records enqueued work."""

    H2D, D2H = 1, 2

    def __init__(self):
        self.mem: dict[int, ctypes.Array] = {}
        self.freed: list[int] = []
        self.capturing: list | None = None
        self.graphs: dict[int, list] = {}
        self.launches = 0
        self.streams_destroyed: list[int] = []

    def set_device(self, index):
        assert index == 0

    def malloc(self, n):
        buf = ctypes.create_string_buffer(int(n))
        self.mem[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def free(self, ptr):
        if ptr:
            self.freed.append(ptr)

    def stream(self):
        return 7

    def destroy_stream(self, stream):
        self.streams_destroyed.append(stream)

    def sync(self, stream):
        assert stream == 7

    def copy(self, dst, src, nbytes, kind, stream):
        assert stream == 7 and kind in (self.H2D, self.D2H)
        ctypes.memmove(dst, src, nbytes)

    def begin_capture(self, stream):
        self.capturing = []

    def end_capture(self, stream):
        graph, self.capturing = self.capturing, None
        self.graphs[id(graph)] = graph
        return id(graph)

    def instantiate(self, graph):
        return graph + 1

    def launch(self, graph_exec, stream):
        self.launches += 1
        for work in self.graphs[graph_exec - 1]:
            work()

    def destroy_graph(self, graph, graph_exec):
        self.graphs.pop(graph, None)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addr, self.executed = engine, {}, {}, 0
        self.device_memory = None

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        ok = all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        self.shapes[name] = tuple(shape)
        return ok

    def _values(self):
        vals = {}
        for t in self.engine.spec.inputs:
            for axis, size in zip(t.axes, self.shapes[t.name]):
                key = DERIVED_AXES.get(axis, axis)
                vals[key] = size // 8 if axis in DERIVED_AXES else size
        return vals

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        t = next(t for t in self.engine.spec.outputs if t.name == name)
        return t.shape(self.engine.dims, self._values())

    def set_tensor_address(self, name, ptr):
        assert name not in self.addr, "bound twice"
        self.addr[name] = ptr

    def set_device_memory(self, ptr, size):
        assert size >= self.engine.device_memory_size_v2
        self.device_memory = ptr

    def _array(self, name, shape):
        dtype = self.engine.dtypes[name]
        n = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(self.addr[name]), dtype).reshape(
            shape
        )

    def execute_async_v3(self, stream):
        def work():
            self.executed += 1
            x = {t.name: self._array(t.name, self.shapes[t.name]) for t in self.engine.spec.inputs}
            for t in self.engine.spec.outputs:
                out = self._array(t.name, self.get_tensor_shape(t.name))
                out[...] = self.engine.compute(x, out.shape)

        cuda = self.engine.cuda
        if cuda.capturing is not None:
            cuda.capturing.append(work)
        else:
            work()
        return True


class FakeEngine:
    """An engine that computes a simple known function of its inputs."""

    def __init__(self, net, md, cuda):
        self.spec, self.dims, self.cuda = NETWORKS[net], md.dims, cuda
        precision = md.precision(net)
        lo = {a: v[0] for a, v in AXES[net].items()}
        op = {a: v[1] for a, v in AXES[net].items()}
        hi = {a: v[2] for a, v in AXES[net].items()}
        self.profile = self.spec.profile(md.dims, lo, op, hi)
        self.dtypes = {t.name: t.numpy_dtype(precision) for t in self.spec.tensors()}
        self.names = [t.name for t in self.spec.tensors()]
        self.device_memory_size_v2 = DEVICE_MEMORY[net]
        self.num_io_tensors = len(self.names)
        self.contexts = []
        self.net = net

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.spec.input_names else "out"

    def get_tensor_profile_shape(self, name, index):
        return self.profile[name]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_runtime_config(self):
        return FakeRuntimeConfig(self)

    def create_execution_context(self, config):
        if not isinstance(config, str):  # a runtime config (TensorRT-RTX, TensorRT >= 10.11)
            self.runtime_config, config = config, self.strategy
        assert config == "user-managed"
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]

    def compute(self, x, shape):
        if self.net == "unet":
            return x["sample"] * 2 + x["timestep"][:, None, None, None]
        if self.net == "text_encoder":
            return np.broadcast_to(x["input_ids"][..., None], shape)
        return np.broadcast_to(x["latent_sample"].mean(axis=(1, 2, 3))[:, None, None, None], shape)


class FakeRuntimeCache:
    """TensorRT-RTX's runtime cache: the bytes it was loaded from + kernels "compiled" since."""

    def __init__(self):
        self.kernels: list[str] = []

    def deserialize(self, blob):
        text = bytes(blob).decode()
        if not text.startswith("cache:"):
            return False  # another GPU/driver/version: TensorRT-RTX refuses it
        self.kernels = [k for k in text[len("cache:") :].split(",") if k]
        return True

    def serialize(self):
        return ("cache:" + ",".join(self.kernels)).encode()


class FakeRuntimeConfig:
    def __init__(self, engine):
        self.engine, self.cuda_graph_strategy = engine, "disabled"
        self.dynamic_shapes_kernel_specialization_strategy = "lazy"
        self.runtime_cache = None

    def set_execution_context_allocation_strategy(self, strategy):
        self.engine.strategy = strategy

    def create_runtime_cache(self):
        self.engine.caches_created = getattr(self.engine, "caches_created", 0) + 1
        return FakeRuntimeCache()

    def set_runtime_cache(self, cache):
        self.runtime_cache = cache
        cache.kernels.append(f"{self.engine.net}-kernel")  # JIT-compiled on first use
        return True


FULL_TRT_TAG = ed.gpu_tag("tensorrt", RTX_4090)


@pytest.fixture
def sim(model_copy, monkeypatch):
    """The embedded model with fake engines on a simulated RTX 4090 with TensorRT-RTX
    installed (and engines for full TensorRT too, used where a test installs it)."""
    for net in NETWORKS:
        write_engine(model_copy, net, profile={"axes": AXES[net]})
        write_engine(
            model_copy, net, tag=FULL_TRT_TAG, profile={"axes": AXES[net]}, flavour="tensorrt",
            trt_version=RTX_VERSION,
            target={"gpu_tag": FULL_TRT_TAG, "compute_capabilities": ["8.9"],
                    "gpu_name": RTX_4090.name},
        )  # fmt: skip
    md = ModelDir.open(model_copy)
    cuda = FakeCuda()
    fake_trt = types.SimpleNamespace(
        __version__=RTX_VERSION,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, *a: None}),
        Runtime=lambda logger: object(),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user-managed"),
        TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
        nptype=lambda dtype: dtype,
        CudaGraphStrategy=types.SimpleNamespace(WHOLE_GRAPH_CAPTURE="whole-graph"),
        DynamicShapesKernelSpecializationStrategy=types.SimpleNamespace(
            LAZY="lazy", EAGER="eager", NONE="none"
        ),
    )
    engines = {}

    def deserialize(runtime, data):
        net = next(n for n in NETWORKS if f"engine bytes of {n}".encode() in data)
        engines[net] = FakeEngine(net, md, cuda)
        return engines[net]

    monkeypatch.setattr(cudart, "gpu_info", lambda index=0: RTX_4090)
    monkeypatch.setattr(ed, "installed_flavours", lambda: ["tensorrt_rtx"])
    monkeypatch.setattr(ed, "import_trt", lambda flavour: fake_trt)
    monkeypatch.setattr(cudart, "CudaRuntime", lambda: cuda)
    monkeypatch.setattr(rt, "_deserialize", deserialize)
    return types.SimpleNamespace(md=md, cuda=cuda, engines=engines)


def test_buffers_shared_memory_and_results(sim):
    backend = rt.TensorRTBackend()
    runners = backend.load(sim.md)
    d = sim.md.dims
    C, S, D, f = d.latent_channels, d.text_max_length, d.cross_attention_dim, d.vae_scale_factor
    assert backend.device == f"cuda:0 ({RTX_4090.name}, tensorrt_rtx {RTX_VERSION})"
    # one shared activation buffer, sized to the largest engine, given to every context
    shared = [c.device_memory for e in sim.engines.values() for c in e.contexts]
    assert len(set(shared)) == 1 and len(sim.cuda.mem[shared[0]]) == max(DEVICE_MEMORY.values())
    # every I/O buffer bound once, at the profile's largest shape
    unet_ctx = sim.engines["unet"].contexts[0]
    assert len(sim.cuda.mem[unet_ctx.addr["sample"]]) == 4 * C * 8 * 8 * 4  # N4 C h8 w8 fp32
    assert len(sim.cuda.mem[unet_ctx.addr["noise_pred"]]) == 4 * C * 8 * 8 * 4

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, C, 6, 4), dtype=np.float32)  # smaller than the max
    ts = np.array([10.0, 20.0], np.float32)
    ehs = rng.standard_normal((2, S, D), dtype=np.float32)
    out = runners["unet"].run({"sample": sample, "timestep": ts, "encoder_hidden_states": ehs})
    np.testing.assert_array_equal(out["noise_pred"], sample * 2 + ts[:, None, None, None])

    ids = rng.integers(0, 100, (1, S))
    emb = runners["text_encoder"].run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert emb["text_embeddings"].shape == (1, S, D)
    np.testing.assert_array_equal(emb["text_embeddings"][0, :, 5], ids[0])

    z = rng.standard_normal((1, C, 8, 8), dtype=np.float32)
    img = runners["vae_decoder"].run({"latent_sample": z})["image"]
    assert img.shape == (1, 3, 8 * f, 8 * f) and np.allclose(img, z.mean())

    with pytest.raises(ArtifactMismatchError, match="no unet engine covers") as e:
        big = np.zeros((2, C, 16, 16), np.float32)
        runners["unet"].run({"sample": big, "timestep": ts, "encoder_hidden_states": ehs})
    assert str(sim.md.path) in e.value.fix

    allocated = set(sim.cuda.mem)
    backend.close()
    assert set(sim.cuda.freed) == allocated and sim.cuda.streams_destroyed == [7]


def test_rtx_cuda_graph_uses_its_built_in_capture(sim):
    backend = rt.TensorRTBackend(cuda_graph=True)
    backend.load(sim.md)
    assert sim.engines["unet"].runtime_config.cuda_graph_strategy == "whole-graph"
    assert sim.engines["vae_decoder"].runtime_config.cuda_graph_strategy == "disabled"
    assert not any(e.manual_graph for e in backend._engines)
    backend.close()


def test_full_tensorrt_cuda_graph_captures_once_per_shape_and_replays(sim, monkeypatch):
    monkeypatch.setattr(ed, "installed_flavours", lambda: ["tensorrt"])
    backend = rt.TensorRTBackend(cuda_graph=True)
    runners = backend.load(sim.md)
    assert backend.flavour == "tensorrt"
    unet = next(e for e in backend._engines if e.sidecar["network"] == "unet")
    assert unet.manual_graph and unet.path.parent.name == FULL_TRT_TAG
    ctx = unet.context
    d = sim.md.dims
    C, S, D = d.latent_channels, d.text_max_length, d.cross_attention_dim
    ehs = np.zeros((2, S, D), np.float32)
    for step in range(4):
        sample = np.full((2, C, 8, 8), step, np.float32)
        ts = np.array([step, step], np.float32)
        out = runners["unet"].run({"sample": sample, "timestep": ts, "encoder_hidden_states": ehs})
        np.testing.assert_array_equal(out["noise_pred"], sample * 2 + step)
    # step 0 runs directly, then captures; steps 1-3 replay the graph
    assert sim.cuda.launches == 3 and ctx.executed == 4
    sample = np.ones((2, C, 4, 4), np.float32)  # a new shape: run + capture again
    out = runners["unet"].run(
        {"sample": sample, "timestep": np.ones(2, np.float32), "encoder_hidden_states": ehs}
    )
    np.testing.assert_array_equal(out["noise_pred"], 3 * sample)
    assert sim.cuda.launches == 3 and unet.graph[0][0] == (2, C, 4, 4)
    assert len(sim.cuda.graphs) == 1  # the old shape's graph was destroyed
    # the other networks never capture
    assert all(not e.manual_graph for e in backend._engines if e is not unet)
    backend.close()
    assert sim.cuda.graphs == {}


def test_cuda_graph_default_comes_from_the_unet_sidecar(sim):
    rt.TensorRTBackend().load(sim.md)
    assert sim.engines["unet"].runtime_config.cuda_graph_strategy == "disabled"
    write_engine(sim.md.path, "unet", profile={"axes": AXES["unet"]}, runtime={"cuda_graph": True})
    rt.TensorRTBackend().load(sim.md)
    assert sim.engines["unet"].runtime_config.cuda_graph_strategy == "whole-graph"


# ---- TensorRT-RTX JIT: kernel specialisation and the runtime cache --------------------------
def _runtime_configs(sim):
    return [c for e in sim.engines.values() for c in [e.runtime_config]]


def test_rtx_runtime_cache_is_shared_saved_on_close_and_reloaded(sim):
    cache_file = sim.md.path / "engines" / "tensorrt_rtx-portable" / "runtime-sm89.cache"
    backend = rt.TensorRTBackend(kernel_specialization="eager")
    backend.load(sim.md)
    configs = _runtime_configs(sim)
    assert {c.dynamic_shapes_kernel_specialization_strategy for c in configs} == {"eager"}
    caches = {id(c.runtime_cache) for c in configs}
    assert len(caches) == 1 and None not in {c.runtime_cache for c in configs}  # one, shared
    assert not cache_file.exists()
    backend.close()
    first = cache_file.read_bytes().decode()
    assert first.startswith("cache:") and "unet-kernel" in first
    # the next process starts from the saved kernels (and adds what it compiles)
    again = rt.TensorRTBackend()
    again.load(sim.md)
    cache = _runtime_configs(sim)[0].runtime_cache
    assert cache.kernels[: len(first.split(","))] == first[len("cache:") :].split(",")
    assert {c.dynamic_shapes_kernel_specialization_strategy for c in _runtime_configs(sim)} == {
        "lazy"  # TensorRT-RTX's own default unless asked
    }
    again.close()


def test_rtx_runtime_cache_from_elsewhere_is_rebuilt_not_fatal(sim):
    cache_file = sim.md.path / "engines" / "tensorrt_rtx-portable" / "runtime-sm89.cache"
    cache_file.write_bytes(b"\x00 a cache from another GPU")
    backend = rt.TensorRTBackend(runtime_cache=True)
    backend.load(sim.md)
    backend.close()
    assert cache_file.read_bytes().startswith(b"cache:")
    off = rt.TensorRTBackend(runtime_cache=False)
    off.load(sim.md)
    assert all(c.runtime_cache is None for c in _runtime_configs(sim))
    off.close()
    with pytest.raises(ConfigError, match="kernel specialization"):
        rt.TensorRTBackend(kernel_specialization="sometimes")
