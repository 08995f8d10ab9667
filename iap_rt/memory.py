"""The memory guard: estimate a generate call's peak memory before allocating, refuse it above
a limit with the number and the fix.

The estimate comes from the model's architecture (channels, attention heads and layers of the
UNet and VAE decoder levels, which the export records in the manifest under ``arch``), the
call (images, chunk size, guidance, size) and the backend:

- ONNX Runtime keeps one memory arena per session that holds its largest call, so the UNet's
  and the VAE's activations add up (on the CPU in RAM, with CUDA in GPU memory);
- the exported UNet computes attention as MatMul -> Softmax -> MatMul, which materialises
  ``heads x tokens^2`` scores per image (1 GiB per image at SD 1.5's 64x64 level);
  ONNX Runtime's fused variant (``unet.ort.onnx``) and TensorRT's fused kernel do not;
- TensorRT allocates its activations when the engines load, sized by their profiles, so for
  TensorRT only the host-side arrays are estimated;
- the call itself holds every image's noise, latents and pixels until it returns.

The constants are calibrated against peak RSS measured with ONNX Runtime on the CPU (see
``CALIBRATION``); the estimate is meant to be an upper bound, within ~2x.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from iap_rt.errors import ConfigError, ResourceError

GB = 1e9
DEFAULT_FRACTION = 0.9  # of the memory this process can reach (available + what it holds)
# Calibration: ONNX Runtime 1.32 on the CPU, fp32, peak RSS after the second call of a session
# (ORT's memory pattern then holds a block beside the arena's first-call chunks, about doubling
# the first call's peak). Measured per image (one UNet row) on the embedded toy model and on an
# SD 1.5-structured UNet/VAE with 1/10 of the channels, against these constants:
#   toy UNet 128x128 x8 rows: 419 MB, estimate 495 MB; 256x256 x2: 843 MB, estimate 1.14 GB
#   SD 1.5-structured UNet 64x64 x2: 3.44 GB (fused attention: 125 MB), estimate 3.55 GB
#   (129 MB); x4: 6.87 GB (232 MB), estimate 7.1 GB (258 MB)
#   SD 1.5-structured VAE decoder 64->512 x1: 296 MB, estimate 617 MB; toy 128x128 x4: 25 MB
# and against bench/results (SD 1.5 itself, 64x64 x2): UNet session 6.8 GB (fused 4.6 GB),
# estimate 8.7 GB (5.2 GB); the whole pipeline 10.15 GB (fused 7.75 GB), estimate ~12.8 GB
# (~9.4 GB). The estimate is an upper bound within ~1.3x at SD 1.5 size, ~2x on small models.
CALIBRATION = {
    # live values per value of sum_i channels_i * tokens_i * (1 + 9 [level i attends])
    # per UNet row (levels with attention carry transformer blocks: QKV, GEGLU feed-forward)
    "unet_conv": 7.0,
    # live values per value of the VAE decoder's widest level (channels x pixels) per image
    "vae_conv": 12.0,
    "attention_copies": 3.2,  # fp32 score tensors alive at once, memory pattern included
    "weights": 1.1,  # resident bytes per byte of ONNX weights
    "runtime": 0.15 * GB,  # Python, numpy, ONNX Runtime, tokenizer
    "session": 0.02 * GB,  # per loaded network
}
# SD 1.5's decoder and UNet, assumed for a manifest written before the export recorded `arch`
SD15_ARCH = {
    "unet": {
        "channels": [320, 640, 1280, 1280],
        "attention_heads": [8, 8, 8, 0],
        "mid_attention_heads": 8,
        "layers_per_block": 2,
    },
    "vae_decoder": {"channels": [128, 256, 512, 512], "mid_attention": True, "layers_per_block": 2},
}


def arch_from_configs(unet: dict, vae: dict) -> dict:
    """The manifest's ``arch`` record from diffusers' UNet and VAE config.json."""
    channels = [int(c) for c in unet.get("block_out_channels", SD15_ARCH["unet"]["channels"])]
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    kinds = list(unet.get("down_block_types", ()))
    per_level = [
        int(heads[i]) if i < len(kinds) and "CrossAttn" in kinds[i] else 0
        for i in range(len(channels))
    ]
    mid = unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""
    vae_ch = [int(c) for c in vae.get("block_out_channels", (128, 256, 512, 512))]
    return {
        "unet": {
            "channels": channels,
            "attention_heads": per_level,
            "mid_attention_heads": int(heads[-1]) if "CrossAttn" in mid else 0,
            "layers_per_block": int(unet.get("layers_per_block", 2)),
        },
        "vae_decoder": {
            "channels": vae_ch,
            "mid_attention": bool(vae.get("mid_block_add_attention", True)),
            "layers_per_block": int(vae.get("layers_per_block", 2)),
        },
    }


def unet_activations(arch: dict, n: int, h: int, w: int, elem: int, scores: bool) -> float:
    """Peak bytes of one UNet call on ``n`` rows of ``h x w`` latents (``elem`` bytes per value;
    ``scores``: attention materialises its score matrices)."""
    conv, attn = 0.0, 0.0
    hi, wi = h, w
    heads = arch["attention_heads"]
    for i, c in enumerate(arch["channels"]):
        t = hi * wi
        conv += c * t * (10 if heads[i] else 1)
        if heads[i]:
            attn = max(attn, heads[i] * t * t)
        if i < len(arch["channels"]) - 1:
            hi, wi = math.ceil(hi / 2), math.ceil(wi / 2)
    attn = max(attn, arch.get("mid_attention_heads", 0) * (hi * wi) ** 2)
    per_image = CALIBRATION["unet_conv"] * elem * conv
    if scores:
        per_image += CALIBRATION["attention_copies"] * 4 * attn
    return n * per_image


def vae_activations(arch: dict, b: int, h: int, w: int, elem: int) -> float:
    """Peak bytes of decoding ``b`` latents of ``h x w`` (the decoder walks the channels in
    reverse, doubling the resolution between levels; one attention head at the latent size)."""
    ch = list(reversed(arch["channels"]))
    t, widest, prev = h * w, 0.0, ch[0]
    for j, c in enumerate(ch):
        widest = max(widest, max(c, prev) * t)
        prev = c
        if j < len(ch) - 1:
            t *= 4
    per_image = CALIBRATION["vae_conv"] * elem * widest
    if arch.get("mid_attention", True):
        per_image += CALIBRATION["attention_copies"] * 4 * float(h * w) ** 2
    return b * per_image


@dataclass(frozen=True)
class Call:
    """What one :meth:`Pipeline.generate` call will run."""

    images: int  # every image of the call
    chunk: int  # images per UNet batch (the largest chunk)
    guided: int  # images of the largest chunk under classifier-free guidance
    height: int
    width: int


@dataclass(frozen=True)
class Estimate:
    """The estimated peak of one memory pool: (what, bytes) parts."""

    pool: str  # "RAM" or "GPU memory"
    parts: tuple[tuple[str, float], ...]

    @property
    def total(self) -> float:
        return sum(v for _, v in self.parts)

    def describe(self) -> str:
        parts = sorted(self.parts, key=lambda p: -p[1])
        return ", ".join(f"{what} {fmt_bytes(v)}" for what, v in parts if v >= 0.5e6)


def estimate(model, backend: str, device: str, fused_unet: bool, call: Call) -> list[Estimate]:
    """The peak of ``call`` on ``model`` per memory pool (host RAM, GPU memory)."""
    arch = model.manifest.get("arch") or SD15_ARCH
    dims = model.dims
    f = dims.vae_scale_factor
    h, w = call.height // f, call.width // f
    n_unet = call.chunk + call.guided
    elem = {n: 2 if model.precision(n) == "fp16" else 4 for n in ("unet", "vae_decoder")}
    scores = backend == "ort" and not (fused_unet and _has_ort_variant(model))
    nets = model_networks(model)
    weights = CALIBRATION["weights"] * sum(_network_bytes(model, n) for n in nets)
    host = [
        ("runtime", CALIBRATION["runtime"] + CALIBRATION["session"] * len(nets)),
        (
            f"noise, latents and pixels of {call.images} image(s)",
            call.images * (3 * 4 * dims.latent_channels * h * w + 2 * 3 * call.height * call.width)
            + call.chunk * 3 * 4 * 3 * call.height * call.width,
        ),
    ]
    device_parts = [("model weights", weights)]
    if backend == "ort":
        device_parts += [
            (
                f"UNet activations ({n_unet} rows of {h}x{w} latents"
                + (", attention scores" if scores else "") + ")",
                unet_activations(arch["unet"], n_unet, h, w, elem["unet"], scores),
            ),
            (
                f"VAE decoder activations ({call.chunk} image(s) of {call.height}x{call.width})",
                vae_activations(arch["vae_decoder"], call.chunk, h, w, elem["vae_decoder"]),
            ),
        ]  # fmt: skip
    if device.startswith("cpu"):
        return [Estimate("RAM", tuple(host + device_parts))]
    if backend == "ort":
        return [Estimate("RAM", tuple(host)), Estimate("GPU memory", tuple(device_parts))]
    return [Estimate("RAM", tuple(host))]  # TensorRT: engine memory is fixed at load


def model_networks(model) -> list[str]:
    """The networks whose weights a loaded pipeline holds (every one the directory has)."""
    return [n for n in model.networks if n in model.manifest["networks"]]


def _network_bytes(model, network: str) -> int:
    info = model.manifest["networks"][network]
    return int(info.get("bytes", 0)) + int(info.get("data_bytes", 0))


def _has_ort_variant(model) -> bool:
    unet = model.manifest["networks"].get("unet", {})
    return isinstance(unet.get("ort"), dict) or isinstance(unet.get("ort_cpu"), dict)


# ---- limits --------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(b|[kmgt]i?b?)?\s*$", re.I)


def parse_limit(value) -> float | str | None:
    """``"auto"`` (a fraction of what is available), ``"off"`` (None: no guard), or a size:
    bytes as a number, or text like ``"12GB"``, ``"800MiB"``, ``"1.5T"``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    if isinstance(value, str) and value.strip().lower() in ("off", "none"):
        return None
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "b").lower()
        power = 0 if unit == "b" else "kmgt".index(unit[0]) + 1
        number = float(m.group(1)) * (1024 if "i" in unit else 1000) ** power
    if number is not None and math.isfinite(number) and number > 0:
        return number
    raise ConfigError(
        f"memory limit {value!r} is not a size",
        fix='use e.g. --memory-limit 12GB (or 800MiB), "auto" (90% of what is available) or "off".',
    )


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def available(pool: str, device_id: int = 0) -> float | None:
    """Bytes this process can still reach in ``pool`` (what is free plus, for RAM, what the
    process holds already); None where it cannot be told."""
    if pool == "RAM":
        free = _ram_available()
        return None if free is None else free + _own_rss()
    return _gpu_free(device_id)


def _ram_available() -> float | None:
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):  # fmt: skip
        try:
            cap = open(limit).read().strip()
            if cap != "max" and int(cap) < 1 << 60:
                candidates.append(int(cap) - int(open(usage).read().strip()))
        except (OSError, ValueError):
            continue
    return float(max(0, min(candidates))) if candidates else None


def _own_rss() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def _gpu_free(device_id: int) -> float | None:
    import ctypes

    try:
        from iap_rt.cuda import CudaRuntime

        lib = CudaRuntime().lib
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.cudaSetDevice(device_id)
        if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
            return None
        return float(free.value)
    except Exception:  # no CUDA runtime / polygraphy: nothing to tell
        return None


def caps(estimates: list[Estimate], limit, held: dict | None = None) -> dict[str, tuple]:
    """Pool -> (limit in bytes, where it comes from) for ``limit`` (:func:`parse_limit`'s);
    ``held``: bytes this pipeline already holds in a GPU pool (reachable again). A pool whose
    free memory cannot be told has no limit under "auto"."""
    out = {}
    for est in estimates:
        if limit is None:
            continue
        if limit != "auto":
            out[est.pool] = (float(limit), "--memory-limit")
            continue
        reach = available(est.pool)
        if reach is None:
            continue
        if est.pool != "RAM":
            reach += (held or {}).get(est.pool, 0.0)
        why = f"{DEFAULT_FRACTION:.0%} of the {fmt_bytes(reach)} of {est.pool} this process can use"
        out[est.pool] = (DEFAULT_FRACTION * reach, why)
    return out


def guard(estimate_call, call: Call, limit, held=None, native: int = 512, multiple: int = 8):
    """Raise :class:`ResourceError` when ``estimate_call(call)`` (a list of :class:`Estimate`)
    exceeds a pool's limit; the fix names the largest chunk size, image count or image size
    that fits, and the limit to set instead. Returns the estimates."""
    estimates = estimate_call(call)
    limits = caps(estimates, limit, held)

    def fits(c: Call) -> bool:
        return all(e.total <= limits[e.pool][0] for e in estimate_call(c) if e.pool in limits)

    over = [e for e in estimates if e.pool in limits and e.total > limits[e.pool][0]]
    if not over:
        return estimates
    est = over[0]
    cap, why = limits[est.pool]
    raise ResourceError(
        f"this call needs an estimated {fmt_bytes(est.total)} of {est.pool} "
        f"({est.describe()}), more than the limit of {fmt_bytes(cap)} ({why})",
        fix=_advice(call, fits, native, multiple)
        + f" Or set the limit: --memory-limit {fmt_bytes(est.total * 1.1).replace(' ', '')} "
        "([generate] memory_limit; Pipeline(memory_limit=)), or off.",
    )


def _advice(call: Call, fits, native: int, multiple: int) -> str:
    """The smallest change to ``call`` that fits: chunk size, then image count, then size."""
    from dataclasses import replace

    for k in range(call.chunk - 1, 0, -1):
        c = replace(call, chunk=k, guided=min(call.guided, k))
        if fits(c):
            return (
                f"Run fewer images per UNet batch: --chunk-size {k} ([generate] chunk_size; "
                "the same images, in more batches)."
            )
    one = replace(call, chunk=1, guided=min(call.guided, 1))
    if call.images > 1 and fits(replace(one, images=1)):
        lo, hi = 1, call.images  # fits with lo images, not with hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(replace(one, images=mid)) else (lo, mid)
        return (
            f"Generate at most {lo} image(s) per call (--batch-size {lo}) with --chunk-size 1; "
            "run the rest as further calls (seed + i keeps every image the same)."
        )
    scale = 1.0
    while scale > 1 / 64:
        scale /= 1.25
        h = max(multiple, int(call.height * scale) // multiple * multiple)
        w = max(multiple, int(call.width * scale) // multiple * multiple)
        if fits(replace(one, images=1, height=h, width=w)):
            return (
                f"Generate smaller images, e.g. --height {h} --width {w} (the model's native "
                f"size is {native}x{native}), one per UNet batch (--chunk-size 1)."
            )
    return "Even one small image does not fit: free memory or use a machine with more."
