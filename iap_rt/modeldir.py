"""The model directory: the one unit a user moves between machines.

::

    manifest.json        what is here (written last: no manifest, no model)
    tokenizer/           tokenizer.json (HF tokenizers) + iap_tokenizer.json (max length, ids)
    scheduler.json       scheduler config (diffusers field names) + default scheduler
    text_encoder.onnx  unet.onnx  vae_decoder.onnx   (+ .onnx.data past 512 MiB of weights)
    unet.ort.onnx        big UNets: the same graph with ONNX Runtime's fused attention, sharing
                         unet.onnx.data (manifest: networks.unet.ort; "ort_cpu" before 0.2)
    engines/<gpu-tag>/   TensorRT engines + sidecars (format: iap_rt.enginedir)

This module is the one owner of that format: file names, the manifest's fields and variants,
where the embedded default model lives. :class:`ModelDir` opens and checks one; problems raise
:class:`ArtifactError` subclasses that name the file and the command that fixes it. The export
stage writes model directories with :func:`new_manifest`, :func:`write_manifest`,
:func:`network_files` and :func:`read_manifest`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from iap_rt.errors import ArtifactError, ArtifactMismatchError, ArtifactNotFoundError
from iap_rt.fileio import write_json_atomic
from iap_rt.specs import NETWORKS, PRECISIONS, SPEC_VERSION, ModelDims, spec_hash

MANIFEST = "manifest.json"
FORMAT = "iap-rt-model"
FORMAT_VERSION = 1
REEXPORT = "re-export it: iap-rt export --base SD_DIR --encoder ENCODER_DIR --out {path} --force"


ORT_UNET_FILE = "unet.ort.onnx"  # the UNet's ONNX Runtime variant (fused attention)
ORT_VARIANT = "ort"  # its manifest key, inside networks.unet
TOKENIZER_DIR = "tokenizer"
SCHEDULER_FILE = "scheduler.json"


def network_file(network: str) -> str:
    """The ONNX file of ``network`` (``unet`` -> ``unet.onnx``)."""
    return f"{network}.onnx"


def network_files(network: str) -> tuple[str, ...]:
    """Every file name that belongs to ``network``: the graph, its external data, and for the
    UNet its ONNX Runtime variant."""
    names = (network_file(network), network_file(network) + ".data")
    return names + ((ORT_UNET_FILE,) if network == "unet" else ())


def default_model_dir() -> Path:
    """The model directory shipped inside the package (see README: embedded default)."""
    from importlib import resources

    return Path(str(resources.files("iap_rt") / "data" / "default_model"))


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of the directory ``path`` without checking the model: None when there
    is no manifest, ``{}`` when it is unreadable (ours but damaged); raises
    :class:`ArtifactError` when it is valid JSON but not an iap-rt manifest."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not an iap-rt manifest")
    return manifest


@dataclass
class ModelDir:
    """An opened, checked model directory."""

    path: Path
    manifest: dict

    # ---- opening ------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, networks=tuple(NETWORKS)) -> ModelDir:
        """Open ``path`` and check the manifest, spec hash and every network file."""
        path = Path(path)
        fix = REEXPORT.format(path=path)
        if not path.exists():
            raise ArtifactNotFoundError(
                f"model directory {path} does not exist",
                fix="pass --model DIR of a directory written by `iap-rt export`, "
                "or omit --model to use the embedded default.",
            )
        if not path.is_dir():
            raise ArtifactNotFoundError(
                f"model path {path} is a file, not a model directory",
                fix="pass the directory that holds manifest.json.",
            )
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise ArtifactNotFoundError(
                f"{mpath} is missing: {path} is not a complete iap-rt model directory", fix=fix
            )
        try:
            manifest = json.loads(mpath.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{mpath} is corrupt (not valid JSON: {e})", fix=fix) from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ArtifactError(f"{mpath} is not an iap-rt manifest", fix=fix)
        md = cls(path, manifest)
        md._check(networks)
        return md

    def _check(self, networks) -> None:
        m, fix = self.manifest, REEXPORT.format(path=self.path)
        if m.get("format_version") != FORMAT_VERSION:
            raise ArtifactMismatchError(
                f"{self.path / MANIFEST}: format_version {m.get('format_version')}, "
                f"this iap-rt reads {FORMAT_VERSION}",
                fix=fix,
            )
        if m.get("spec_hash") != spec_hash():
            raise ArtifactMismatchError(
                f"{self.path / MANIFEST} was made for another shape contract "
                f"(spec_hash {str(m.get('spec_hash'))[:12]}…, spec v{m.get('spec_version')}; "
                f"this iap-rt has {spec_hash()[:12]}…, spec v{SPEC_VERSION})",
                fix=fix,
            )
        for key in ("dims", "networks", "model_id"):
            if key not in m:
                raise ArtifactError(f"{self.path / MANIFEST} lacks '{key}'", fix=fix)
        for net in networks:
            info = m["networks"].get(net)
            if info is None:
                raise ArtifactNotFoundError(
                    f"{self.path / MANIFEST} lists no '{net}' network", fix=fix
                )
            if info.get("precision") not in PRECISIONS:
                raise ArtifactMismatchError(
                    f"{self.path / MANIFEST}: {net} precision {info.get('precision')!r}, "
                    f"expected one of {PRECISIONS}",
                    fix=fix,
                )
            alt = _variant(info, ORT_VARIANT)  # the UNet's ONNX Runtime variant, when exported
            files = [(info["file"], info)] + ([(alt["file"], alt)] if alt else [])
            for name, rec in files:
                f = self.path / name
                if not f.is_file():
                    raise ArtifactNotFoundError(f"{f} is missing ({net} network)", fix=fix)
                size = f.stat().st_size
                if "bytes" in rec and size != rec["bytes"]:
                    raise ArtifactMismatchError(
                        f"{f} has {size} bytes, the manifest recorded {rec['bytes']}: "
                        "the file is truncated or was replaced",
                        fix=fix,
                    )
        tok = self.tokenizer_dir / "tokenizer.json"
        if not tok.is_file():
            raise ArtifactNotFoundError(f"{tok} is missing", fix=fix)

    # ---- accessors ----------------------------------------------------------------
    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_dict(self.manifest["dims"])

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    def precision(self, network: str) -> str:
        return self.manifest["networks"][network]["precision"]

    def network_path(self, network: str, variant: str | None = None) -> Path:
        """The ONNX file of ``network``; ``variant`` (e.g. ``"ort"``): that alternative
        graph when the manifest lists one for ``network``, else the plain file."""
        info = self.manifest["networks"][network]
        alt = _variant(info, variant) if variant else None
        return self.path / (alt or info)["file"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def engines_dir(self) -> Path:
        return self.path / "engines"

    def scheduler_config(self) -> dict:
        p = self.path / SCHEDULER_FILE
        if not p.is_file():
            raise ArtifactNotFoundError(f"{p} is missing", fix=REEXPORT.format(path=self.path))
        return json.loads(p.read_text("utf-8"))

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.manifest.get("vae", {}).get("scaling_factor", 0.18215))

    @property
    def default_scheduler(self) -> str:
        return str(self.manifest.get("default_scheduler", "dpm++"))


def new_manifest(model_id: str, dims: ModelDims, **extra) -> dict:
    """A manifest skeleton with the current spec hash (networks are added by export)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "spec_version": SPEC_VERSION,
        "spec_hash": spec_hash(),
        "dims": dims.to_dict(),
        "networks": {},
        **extra,
    }


def write_manifest(path: str | os.PathLike, manifest: dict) -> Path:
    return write_json_atomic(Path(path) / MANIFEST, manifest)


# manifest keys of network variants before they were renamed (read, never written)
_LEGACY_VARIANT_KEYS = {"ort": ("ort_cpu",)}


def drop_legacy_variant_keys(info: dict, name: str) -> None:
    """Remove the pre-0.2 keys of ``name`` from a network's manifest record (before writing)."""
    for key in _LEGACY_VARIANT_KEYS.get(name, ()):
        info.pop(key, None)


def _variant(info: dict, name: str) -> dict | None:
    """The manifest record of a network's ``name`` variant (or its pre-0.2 key), if any."""
    for key in (name, *_LEGACY_VARIANT_KEYS.get(name, ())):
        if isinstance(info.get(key), dict):
            return info[key]
    return None
