"""The export stage: SD pipeline directory + Chinese encoder directory -> iap-rt model directory.

:func:`run_export` is the stage; :func:`export_model_dir` is its Python entry point. In order:

1. check every input before loading anything heavy (:mod:`iap_rt.export.inputs`: base is a
   diffusers SD directory, the encoder's width fits the UNet, the output is not a file nor a
   foreign directory);
2. plan: a network is exported when it is selected (``networks``) and ``force`` is set or its
   key (sha256 of its source files + dims + precision + opset + spec + tool versions) differs
   from the one the previous manifest recorded; every other network is kept as it is;
3. export each planned network into a staging directory beside ``out`` (reference outputs,
   dynamo export, cleanup, validation in ONNX Runtime); all mismatches raise together;
4. link the kept files (networks, ``engines/``) from the previous directory into the staging
   one, write the UNet's ONNX Runtime variant (:mod:`iap_rt.export.ortfuse`), tokenizer,
   scheduler and, last, the manifest (the format is :mod:`iap_rt.modeldir`'s);
5. swap the staging directory in for ``out``.

A failure or interruption before step 5 leaves the previous model directory untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from iap_rt.errors import (
    BackendUnavailableError,
    ConfigError,
    OutputError,
)
from iap_rt.export.config import DEFAULT_OPSET, ExportConfig
from iap_rt.export.inputs import ExportInputs, read_inputs, read_previous
from iap_rt.export.ortfuse import ort_variant_settled, write_ort_variant
from iap_rt.fileio import exclusive_lock, sha256_file, staging_dir, swap_in, write_json_atomic
from iap_rt.modeldir import (
    DEFAULT_GUIDANCE,
    MANIFEST,
    SCHEDULER_FILE,
    TOKENIZER_DIR,
    ModelDir,
    network_file,
    network_files,
    new_manifest,
    write_manifest,
)
from iap_rt.specs import (
    DEFAULT_ARCHITECTURE,
    NETWORKS,
    OPTIONAL_NETWORKS,
    REQUIRED_NETWORKS,
    network_spec_hash,
    network_specs,
    spec_hash,
)

log = logging.getLogger("iap_rt.export")

# bump when a change to the export code changes the ONNX it writes (re-exports everything)
EXPORT_VERSION = 2
Echo = Callable[[str], None]


# ---- 2. plan ------------------------------------------------------------------------------------


def _tool_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in (
        "iap-rt", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime",
        "onnx-graphsurgeon",
    ):  # fmt: skip
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def network_key(
    name: str, cfg: ExportConfig, src: ExportInputs, versions: dict
) -> tuple[str, dict]:
    """The incremental-export key of one network and the source hashes that went into it."""
    from iap_rt.export.networks import EXPORT_CONFIGS

    files = EXPORT_CONFIGS[name].sources(src)
    # labels relative to base / encoder, so moving either directory does not re-export
    label = {src.encoder: "encoder", src.unet.folder: "unet"}
    if src.unet.lora is not None:
        label[src.unet.lora.parent] = "lora"
    hashes = {f"{label.get(f.parent, f.parent.name)}/{f.name}": sha256_file(f) for f in files}
    payload = {
        "export_version": EXPORT_VERSION,
        "network": name,
        "precision": cfg.precision(name),
        "opset": cfg.opset,
        "spec_hash": spec_hash(src.architecture),
        "dims": src.dims.to_dict(),
        **({"network_spec_hash": network_spec_hash(name)} if name in OPTIONAL_NETWORKS else {}),
        "sources": hashes,
        "tools": {k: versions.get(k) for k in ("torch", "diffusers", "transformers", "onnx")},
    }
    if name == "unet" and src.unet.lora is not None:
        payload["lora_scale"] = src.unet.lora_scale
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), hashes


def _intact(out: Path, info: dict) -> bool:
    """The previous export's files of one network are there with their recorded sizes."""
    files = [
        (info.get("file"), info.get("bytes")),
        (info.get("external_data"), info.get("data_bytes")),
    ]
    for name, size in files:
        if name is None:
            continue
        p = out / name
        if not p.is_file() or (size is not None and p.stat().st_size != size):
            return False
    return bool(info.get("file"))


@dataclass
class Plan:
    export: dict[str, tuple[str, dict]] = field(default_factory=dict)  # name -> (key, hashes)
    keep: dict[str, dict] = field(default_factory=dict)  # name -> previous manifest entry


def plan_export(cfg: ExportConfig, src: ExportInputs, out: Path, previous: dict | None, echo: Echo):
    versions = _tool_versions()
    prev_nets = (previous or {}).get("networks", {}) if previous else {}
    same_contract = bool(previous) and previous.get("spec_hash") == spec_hash(src.architecture)
    plan = Plan()
    for name in NETWORKS:
        info = prev_nets.get(name) if same_contract else None
        usable = info is not None and _intact(out, info)
        if name not in cfg.networks:
            if usable:
                plan.keep[name] = info
            continue
        key, hashes = network_key(name, cfg, src, versions)
        if usable and not cfg.force and info.get("export_key") == key:
            plan.keep[name] = info
            echo(f"{name}: unchanged since the last export, kept (--force re-exports it)")
        else:
            plan.export[name] = (key, hashes)
    stale = [n for n in plan.keep if n not in cfg.networks]
    if stale and previous.get("dims") != src.dims.to_dict():
        raise ConfigError(
            f"the model's dims change ({previous.get('dims')} -> {src.dims.to_dict()}), so the "
            f"kept {', '.join(stale)} would no longer fit the re-exported networks",
            fix="re-export every network: drop --networks.",
        )
    return plan, versions


# ---- 3. export ----------------------------------------------------------------------------------


def export_network(
    name: str, cfg: ExportConfig, src: ExportInputs, stage: Path, key: str, hashes: dict, echo: Echo
) -> tuple[dict, list[dict]]:
    """Export, clean and validate one network into ``stage``; return (manifest entry,
    mismatches)."""
    from iap_rt.export.attention import make_attention_fusable
    from iap_rt.export.exporter import (
        dynamo_export,
        finish_onnx,
        reference_outputs,
        validate_onnx,
    )
    from iap_rt.export.networks import export_config

    ncfg = export_config(name, src.architecture).for_downsamples(src.dims.unet_downsamples)
    precision = cfg.precision(name)
    echo(f"{name}: exporting {precision}, opset {cfg.opset} ...")
    t0 = time.perf_counter()
    module = ncfg.load(src)
    # references from the untouched module: validation also covers the attention rewrite
    refs = reference_outputs(module, ncfg, src.dims, precision, src.vocab_size)
    make_attention_fusable(module)
    path = stage / network_file(name)
    raw = dynamo_export(module, ncfg, src.dims, precision, path, cfg.opset, src.vocab_size)
    del module  # before the ONNX copy of the weights is loaded
    gc.collect()
    files, facts = finish_onnx(raw, path, ncfg)
    t_export = time.perf_counter() - t0
    report, mismatches = validate_onnx(path, ncfg, precision, refs)
    entry = {
        "file": path.name,
        "precision": precision,
        "opset": cfg.opset,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "export_key": key,
        "sources": hashes,
        "export_s": round(t_export, 2),
        "validate_s": round(time.perf_counter() - t0 - t_export, 2),
        "validation": report,
        **facts,
    }
    if name in OPTIONAL_NETWORKS:  # checked by its own hash (iap_rt.specs.network_spec_hash)
        entry["spec_hash"] = network_spec_hash(name)
    if len(files) > 1:
        entry.update(
            external_data=files[1].name,
            data_bytes=files[1].stat().st_size,
            data_sha256=sha256_file(files[1]),
        )
    worst = max(report, key=lambda r: r["max_abs_diff"] / max(r["tolerance"], 1e-30))
    size = sum(f.stat().st_size for f in files)
    att = facts["attention"]
    echo(
        f"{name}: {entry['export_s']:.1f} s export + {entry['validate_s']:.1f} s validation, "
        f"{size / 1e6:.1f} MB, attention {att['fusable']}/{att['total']} fusable, "
        f"max diff {worst['max_abs_diff']:.2g} (tolerance {worst['tolerance']:.2g})"
        + ("" if not mismatches else "  MISMATCH")
    )
    return entry, mismatches


# ---- 4./5. assemble and swap --------------------------------------------------------------------


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def carry_over(previous_dir: Path, stage: Path, kept: list[str]) -> None:
    """Hard-link (or copy) everything of the previous directory that this export neither
    rewrites nor drops: kept networks, ``engines/``, files the user put there."""
    rewritten = {MANIFEST, SCHEDULER_FILE, TOKENIZER_DIR}
    for name in NETWORKS:
        if name not in kept:
            rewritten.update(network_files(name))
    for entry in previous_dir.iterdir():
        if entry.name in rewritten or entry.name.startswith("."):
            continue
        target = stage / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(str(entry), str(target))


def _write_tokenizer(encoder: Path, out: Path, max_length: int) -> None:
    from tokenizers import Tokenizer

    from iap_rt.tokenizer import PromptTokenizer, save_tokenizer_dir

    if (encoder / "iap_tokenizer.json").is_file():
        tok = PromptTokenizer.from_dir(encoder).tokenizer
    else:
        tok = Tokenizer.from_file(str(encoder / "tokenizer.json"))
    save_tokenizer_dir(out / TOKENIZER_DIR, tok, max_length)


# ---- the stage ----------------------------------------------------------------------------------


def run_export(cfg: ExportConfig, echo: Echo | None = None) -> Path:
    """Run ``iap-rt export`` with the resolved ``cfg``; return the model directory."""
    echo = echo or log.info
    cfg.require_paths()
    cfg = dataclasses.replace(  # the manifest records absolute paths
        cfg,
        **{
            k: str(Path(getattr(cfg, k)).absolute())
            for k in ("base", "encoder", "out", "unet")
            if getattr(cfg, k)
        },
    )
    out = Path(cfg.out)
    # one writer per model directory; removes what a killed export left beside it
    with exclusive_lock(out):
        return _run_export_locked(cfg, out, echo)


def _run_export_locked(cfg: ExportConfig, out: Path, echo: Echo) -> Path:
    if cfg.engines == "only":
        ModelDir.open(out)  # engines are built from the ONNX already there
        engines_after_export(out, "only", echo)
        return out

    # 1. checks (cheap: configs only)
    src = read_inputs(Path(cfg.base), Path(cfg.encoder), cfg.unet, cfg.lora_scale)
    previous = read_previous(out)
    # 2. plan
    plan, versions = plan_export(cfg, src, out, previous, echo)
    if (
        not plan.export
        and previous
        and _same_top_level(previous, cfg, src, out)
        and ort_variant_settled(previous, cfg)
    ):
        echo(f"{out}: up to date")
        engines_after_export(out, cfg.engines, echo)
        return out
    # 3.-5. export into a staging directory, then swap it in
    try:
        with staging_dir(out) as stage:
            entries, mismatches = {}, []
            for name, (key, hashes) in plan.export.items():
                entries[name], bad = export_network(name, cfg, src, stage, key, hashes, echo)
                mismatches += bad
            from iap_rt.export.exporter import raise_on_mismatch

            raise_on_mismatch(mismatches)
            if previous is not None and out.is_dir():
                carry_over(out, stage, list(plan.keep))
            manifest = new_manifest(
                cfg.model_id or (previous or {}).get("model_id") or out.name,
                src.dims,
                src.architecture,
                base_model=cfg.base,
                encoder=cfg.encoder,
                vae={"scaling_factor": src.vae_scaling_factor},
                image_size=src.image_size,
                arch=src.arch,
                default_scheduler=cfg.default_scheduler,
                default_guidance=cfg.default_guidance,
                tool_versions=versions,
                export_config=cfg.to_dict(),
                export_version=EXPORT_VERSION,
            )
            manifest["unet_source"] = unet_source_record(src)
            manifest["networks"] = {
                n: entries.get(n) or plan.keep[n]
                for n in NETWORKS
                if n in entries or n in plan.keep
            }
            if "unet" in manifest["networks"]:
                write_ort_variant(stage, manifest["networks"]["unet"], cfg, src.dims, echo,
                                  network_specs(src.architecture)["unet"])  # fmt: skip
            _write_tokenizer(src.encoder, stage, src.dims.text_max_length)
            write_json_atomic(stage / SCHEDULER_FILE, src.scheduler)
            write_manifest(stage, manifest)  # last: no manifest, no model
            swap_in(stage, out)
    except OSError as e:
        raise OutputError(
            f"cannot write the model directory {out}: {e.strerror or e}",
            fix="free disk space or choose another --out; the previous model directory is "
            "untouched.",
        ) from e
    needed = REQUIRED_NETWORKS[src.architecture]
    missing = [n for n in needed if n not in manifest["networks"]]
    if missing:
        echo(
            f"note: {out} has no {', '.join(missing)} yet; `iap-rt generate` needs "
            f"{', '.join(needed)} (run iap-rt export without --networks)"
        )
    echo(
        f"wrote {out} ("
        + ", ".join(f"{n} {v['precision']}" for n, v in manifest["networks"].items())
        + ")"
    )
    engines_after_export(out, cfg.engines, echo)
    return out


def unet_source_record(src: ExportInputs) -> dict:
    """Where the exported UNet came from (``--unet``): base, fine-tuned folder or base + LoRA."""
    rec = {"kind": src.unet.kind, "folder": str(src.unet.folder)}
    if src.unet.lora is not None:
        rec |= {"lora": str(src.unet.lora), "lora_sha256": sha256_file(src.unet.lora),
                "lora_scale": src.unet.lora_scale}  # fmt: skip
    return rec


def _same_top_level(previous: dict, cfg: ExportConfig, src: ExportInputs, out: Path) -> bool:
    """Nothing outside the networks changed either (dims, arch, scheduler and guidance
    defaults, model id, the UNet's source)."""
    return (
        previous.get("dims") == src.dims.to_dict()
        and previous.get("architecture", DEFAULT_ARCHITECTURE) == src.architecture
        and previous.get("arch") == src.arch
        and previous.get("unet_source", {"kind": "base"}).get("kind") == src.unet.kind
        and previous.get("default_scheduler") == cfg.default_scheduler
        and previous.get("default_guidance", DEFAULT_GUIDANCE) == cfg.default_guidance
        and previous.get("model_id") == (cfg.model_id or previous.get("model_id"))
        and all(n in previous.get("networks", {}) for n in cfg.networks)
        and (out / TOKENIZER_DIR / "tokenizer.json").is_file()
    )


def engines_after_export(out: Path, mode: str, echo: Echo) -> list[Path]:
    """``--engines``: hand the model directory to the engines stage (if it is installed)."""
    if mode == "none":
        return []
    try:
        from iap_rt.engines.stage import maybe_build_engines
    except ImportError as e:
        if mode == "only":
            raise BackendUnavailableError(
                f"--engines only needs the engines stage, which cannot be imported ({e})",
                fix="pip install 'iap-rt[trt]', or export with --engines none.",
            ) from e
        echo(f"engines: skipped (the engines stage cannot be imported: {e})")
        return []
    return maybe_build_engines(out, mode, echo=echo)


def export_model_dir(
    base: str | os.PathLike,
    encoder: str | os.PathLike,
    out: str | os.PathLike,
    model_id: str | None = None,
    opset: int = DEFAULT_OPSET,
    default_scheduler: str = "dpm++",
    *,
    default_guidance: float = DEFAULT_GUIDANCE,
    fp16: bool = False,
    fp16_vae: bool = False,
    networks: tuple[str, ...] | list[str] | None = None,
    force: bool = False,
    engines: str = "none",
    ort_unet: str = "auto",
    unet: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    echo: Echo | None = None,
) -> Path:
    """Export ``encoder`` + the SD at ``base`` into the model directory ``out``.

    The Python entry point of ``iap-rt export``; unlike the command it builds no TensorRT
    engines unless ``engines="auto"`` or ``"only"`` is passed.
    """
    cfg = ExportConfig(
        base=str(base),
        encoder=str(encoder),
        out=str(out),
        fp16=fp16,
        fp16_vae=fp16_vae,
        opset=opset,
        networks=tuple(networks) if networks is not None else None,
        force=force,
        model_id=model_id,
        engines=engines,
        default_scheduler=default_scheduler,
        default_guidance=default_guidance,
        ort_unet=ort_unet,
        unet=None if unet is None else str(unet),
        lora_scale=lora_scale,
    )
    return run_export(cfg, echo=echo)
