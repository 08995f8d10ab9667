"""The one shape contract: every network iap-rt exports, builds and runs, declared once.

Each network (``text_encoder``, ``unet``, ``vae_decoder``, and the optional ``vae_encoder`` of
image editing) is a :class:`NetworkSpec`: its
input/output names, dtypes and symbolic axes. Everything else is *derived* from these
declarations, never written out a second time:

- ONNX dynamic axes and dynamo ``dynamic_shapes`` (export),
- dummy inputs for export and validation (export),
- TensorRT min/opt/max optimisation profiles (engines),
- runtime input checks (:meth:`NetworkSpec.check_feeds`),
- the manifest's ``spec_hash`` (a model directory made for another contract is refused).

Axis symbols:

=====  =====================================================================  =========
``N``  batch of a text-encoder / UNet call (``2B`` under classifier-free      dynamic
       guidance: negative + positive prompts, else ``B``)
``B``  images decoded by the VAE                                              dynamic
``h``  latent height (image height / ``vae_scale_factor``)                    dynamic
``w``  latent width                                                           dynamic
``H``  image height = ``h * vae_scale_factor``                                derived
``W``  image width = ``w * vae_scale_factor``                                 derived
``S``  text sequence length (the Chinese tokenizer's max length)              static
``D``  ``cross_attention_dim`` of the UNet (= projected encoder width)        static
``C``  latent channels                                                        static
``I``  an inpainting UNet's input channels: latents, mask, masked-image        static
       latents (``2C + 1``; architecture ``sd-inpaint``)
``3``  image channels (RGB)                                                   static
=====  =====================================================================  =========

Architectures: a model directory's manifest names one (``architecture``; ``sd`` where it
names none); :func:`network_specs` gives its declarations and :func:`spec_hash` its hash.
``sd`` is SD 1.x/2.x; ``sd-inpaint`` is the same with an inpainting UNet (9 input channels for
SD's 4-channel latents: the Chinese encoder trained on the plain base drives it unchanged, and
every request also needs the VAE encoder for the masked-image latents).

Dtype ``"float"`` means the network's floating precision (fp32 or fp16 per the manifest);
``timestep`` is float32 in every precision (fractional Euler timesteps stay exact).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from iap_rt.errors import ShapeContractError

SPEC_VERSION = 1

DYNAMIC_AXES = ("N", "B", "h", "w")
STATIC_AXES = ("S", "D", "C", "I", "3")
DERIVED_AXES = {"H": "h", "W": "w"}

PRECISIONS = ("fp32", "fp16")
_FLOAT = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class ModelDims:
    """The static sizes of one model (recorded in the manifest)."""

    text_max_length: int  # S: tokens per prompt, padded/truncated (77 for CLIP-like, 32-512 BERT)
    cross_attention_dim: int  # D: width the UNet's cross-attention expects (768 SD1.x, 1024 SD2.x)
    latent_channels: int = 4  # C: SD latents
    vae_scale_factor: int = 8  # image pixels per latent pixel, per side
    # latent h and w must be multiples of this: 2 ** (the UNet's down-samplings); older
    # manifests lack it (1 = no rule beyond the VAE factor)
    latent_multiple: int = 1

    @property
    def pixel_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return self.vae_scale_factor * self.latent_multiple

    @property
    def unet_downsamples(self) -> int:
        """How many times the UNet halves the latents (log2 of ``latent_multiple``)."""
        return self.latent_multiple.bit_length() - 1

    def static_values(self) -> dict[str, int]:
        return {
            "S": self.text_max_length,
            "D": self.cross_attention_dim,
            "C": self.latent_channels,
            "I": 2 * self.latent_channels + 1,
            "3": 3,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelDims:
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype (``int64``, ``float32`` or ``float``) and axes."""

    name: str
    dtype: str
    axes: tuple[str, ...]

    def numpy_dtype(self, precision: str) -> np.dtype:
        if self.dtype == "float":
            return np.dtype(_FLOAT[precision])
        return np.dtype(self.dtype)

    def shape(self, dims: ModelDims, values: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for the dynamic axis values ``values`` (N, B, h, w)."""
        return tuple(_axis_value(a, dims, values) for a in self.axes)


def _axis_value(axis: str, dims: ModelDims, values: Mapping[str, int]) -> int:
    static = dims.static_values()
    if axis in static:
        return static[axis]
    if axis in DERIVED_AXES:
        return int(values[DERIVED_AXES[axis]]) * dims.vae_scale_factor
    if axis in values:
        return int(values[axis])
    raise KeyError(f"no value for axis {axis!r}")


@dataclass(frozen=True)
class NetworkSpec:
    """A network's declared interface. See the module docstring for axis symbols."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = field(default="", compare=False)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    # ---- derived: export -------------------------------------------------------------
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes ``{tensor: {axis index: symbol}}`` (inputs and outputs)."""
        out: dict[str, dict[int, str]] = {}
        for t in self.tensors():
            dyn = {i: a for i, a in enumerate(t.axes) if a in DYNAMIC_AXES or a in DERIVED_AXES}
            if dyn:
                out[t.name] = dyn
        return out

    def shapes(self, dims: ModelDims, values: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input and output for the dynamic values."""
        return {t.name: t.shape(dims, values) for t in self.tensors()}

    def dummy_inputs(
        self,
        dims: ModelDims,
        precision: str,
        values: Mapping[str, int],
        seed: int = 0,
        vocab_size: int = 100,
    ) -> dict[str, np.ndarray]:
        """Seeded example inputs (ids < ``vocab_size``; masks all ones; floats ~N(0,1))."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape = t.shape(dims, values)
            if t.name == "attention_mask":
                arr = np.ones(shape, dtype=np.int64)
            elif t.dtype == "int64":
                arr = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
            elif t.name == "timestep":
                arr = rng.uniform(1, 999, size=shape).round().astype(np.float32)
            else:
                arr = rng.standard_normal(shape).astype(t.numpy_dtype(precision))
            feeds[t.name] = arr
        return feeds

    # ---- derived: engines ----------------------------------------------------------------
    def profile(
        self,
        dims: ModelDims,
        min_values: Mapping[str, int],
        opt_values: Mapping[str, int],
        max_values: Mapping[str, int],
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile ``{input: (min, opt, max)}`` from axis ranges."""
        return {
            t.name: (
                t.shape(dims, min_values),
                t.shape(dims, opt_values),
                t.shape(dims, max_values),
            )
            for t in self.inputs
        }

    # ---- derived: runtime checks ------------------------------------------------------
    def check_feeds(
        self, feeds: Mapping[str, np.ndarray], dims: ModelDims, precision: str
    ) -> dict[str, int]:
        """Check names, dtypes, ranks and sizes of ``feeds``; return the axis values found.

        Raises :class:`ShapeContractError` listing every problem at once.
        """
        problems = []
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing:
            problems.append(f"missing input(s) {missing}")
        if extra:
            problems.append(f"unexpected input(s) {extra}")
        static = dims.static_values()
        seen: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in feeds:
                continue
            arr = feeds[t.name]
            want = t.numpy_dtype(precision)
            if arr.dtype != want:
                problems.append(f"{t.name}: dtype {arr.dtype}, expected {want}")
            if arr.ndim != len(t.axes):
                problems.append(
                    f"{t.name}: rank {arr.ndim} {tuple(arr.shape)}, expected axes {t.axes}"
                )
                continue
            for axis, size in zip(t.axes, arr.shape):
                key = DERIVED_AXES.get(axis, axis)
                value = size
                if axis in DERIVED_AXES:
                    if size % dims.vae_scale_factor:
                        problems.append(
                            f"{t.name}: axis {axis}={size} not a multiple of "
                            f"{dims.vae_scale_factor}"
                        )
                    value = size // dims.vae_scale_factor
                if axis in static:
                    if size != static[axis]:
                        problems.append(f"{t.name}: axis {axis}={size}, expected {static[axis]}")
                elif key in seen and seen[key] != value:
                    problems.append(
                        f"{t.name}: axis {axis}={size} disagrees with {key}={seen[key]} "
                        "of another input"
                    )
                else:
                    seen[key] = value
        if problems:
            raise ShapeContractError(
                f"inputs of network '{self.name}' break its shape contract: " + "; ".join(problems),
                fix="feed the tensors declared in iap_rt/specs.py (see NetworkSpec.inputs).",
            )
        return seen

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
        }


TEXT_ENCODER = NetworkSpec(
    "text_encoder",
    inputs=(
        TensorSpec("input_ids", "int64", ("N", "S")),
        TensorSpec("attention_mask", "int64", ("N", "S")),
    ),
    outputs=(TensorSpec("text_embeddings", "float", ("N", "S", "D")),),
    doc="Chinese encoder + projection to the UNet's cross_attention_dim.",
)

UNET = NetworkSpec(
    "unet",
    inputs=(
        TensorSpec("sample", "float", ("N", "C", "h", "w")),
        TensorSpec("timestep", "float32", ("N",)),
        TensorSpec("encoder_hidden_states", "float", ("N", "S", "D")),
    ),
    outputs=(TensorSpec("noise_pred", "float", ("N", "C", "h", "w")),),
    doc="SD UNet2DConditionModel; output is epsilon or v per the scheduler's prediction_type.",
)

VAE_DECODER = NetworkSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent_sample", "float", ("B", "C", "h", "w")),),
    outputs=(TensorSpec("image", "float", ("B", "3", "H", "W")),),
    doc="AutoencoderKL decoder; input is latents / scaling_factor, output in [-1, 1].",
)

VAE_ENCODER = NetworkSpec(
    "vae_encoder",
    inputs=(TensorSpec("sample", "float", ("B", "3", "H", "W")),),  # diffusers' name
    outputs=(
        TensorSpec("latent_mean", "float", ("B", "C", "h", "w")),
        TensorSpec("latent_std", "float", ("B", "C", "h", "w")),
    ),
    doc="AutoencoderKL encoder; input in [-1, 1], outputs the latent distribution (mean, std) "
    "before scaling_factor; image editing samples mean + std * noise from it.",
)

NETWORKS: dict[str, NetworkSpec] = {
    n.name: n for n in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
}
# what every model directory has; the others are added to a directory with
# `iap-rt export --networks NAME` and are checked by their own hash (network_spec_hash), so
# adding one to the contract does not refuse the directories made before it
CORE_NETWORKS = ("text_encoder", "unet", "vae_decoder")
OPTIONAL_NETWORKS = tuple(n for n in NETWORKS if n not in CORE_NETWORKS)

UNET_INPAINT = NetworkSpec(
    "unet",
    inputs=(TensorSpec("sample", "float", ("N", "I", "h", "w")), *UNET.inputs[1:]),
    outputs=UNET.outputs,
    doc="SD inpainting UNet2DConditionModel: sample = (scaled latents, mask, masked-image "
    "latents) concatenated on the channel axis, as diffusers' StableDiffusionInpaintPipeline.",
)

DEFAULT_ARCHITECTURE = "sd"
# architecture -> its declarations (the names are the same in every one)
ARCHITECTURES: dict[str, dict[str, NetworkSpec]] = {
    "sd": NETWORKS,
    "sd-inpaint": {**NETWORKS, "unet": UNET_INPAINT},
}
# networks an architecture needs beyond the core ones (the inpainting UNet reads the
# masked image's latents on every request)
REQUIRED_NETWORKS = {"sd": CORE_NETWORKS, "sd-inpaint": (*CORE_NETWORKS, "vae_encoder")}


def _architecture(architecture: str) -> dict[str, NetworkSpec]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        from iap_rt.errors import ShapeContractError

        raise ShapeContractError(
            f"unknown architecture {architecture!r} (this iap-rt knows {', '.join(ARCHITECTURES)})",
            fix="use the iap-rt version that made the model directory, or re-export it.",
        ) from None


def network_specs(architecture: str = DEFAULT_ARCHITECTURE) -> dict[str, NetworkSpec]:
    """Every network's declaration in ``architecture``."""
    return _architecture(architecture)


def get_network(name: str, architecture: str = DEFAULT_ARCHITECTURE) -> NetworkSpec:
    try:
        return _architecture(architecture)[name]
    except KeyError:
        from iap_rt.errors import ConfigError

        raise ConfigError(
            f"unknown network {name!r}", fix=f"use one of {', '.join(NETWORKS)}."
        ) from None


def spec_hash(architecture: str = DEFAULT_ARCHITECTURE) -> str:
    """sha256 of the canonical JSON of the core networks' declarations (+ SPEC_VERSION, + the
    architecture where it is not ``sd``, so SD directories keep their hash): the manifest's
    ``spec_hash``."""
    nets = _architecture(architecture)
    payload = {"version": SPEC_VERSION,
               "networks": [nets[n].to_dict() for n in CORE_NETWORKS]}  # fmt: skip
    if architecture != DEFAULT_ARCHITECTURE:
        payload["architecture"] = architecture
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def network_spec_hash(name: str) -> str:
    """sha256 of one optional network's declaration (+ SPEC_VERSION): its manifest record's
    ``spec_hash``."""
    payload = {"version": SPEC_VERSION, "network": NETWORKS[name].to_dict()}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def axis_values(batch_size: int, height: int, width: int, guidance: bool, dims: ModelDims):
    """Dynamic axis values for a generation request."""
    f = dims.vae_scale_factor
    return {
        "B": batch_size,
        "N": batch_size * (2 if guidance else 1),
        "h": height // f,
        "w": width // f,
    }
