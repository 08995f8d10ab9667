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

Integrity: opening a model checks every network file against the sha256 the export recorded,
before anything runs it. Hashing (about 1 s per GB) happens once per file: the file's
(size, mtime_ns, ctime_ns, inode, device) is then remembered in a per-user record,
``~/.cache/iap-rt/verified/<hash of the model's path>.json`` (``IAP_RT_CACHE_DIR`` moves it),
and a later open that finds the same stamp skips the hash. Any write to the file, a rename
onto it or an ``mtime`` reset (``touch -d``) changes ``ctime``, which only the kernel sets, so
a changed file is always hashed again. The record lives in the user's cache, not beside the
model, because the model directory may be read-only (site-packages, a shared mount, a
container layer) or a source checkout, and because a record there would be copied along with
the model (the copy's inode differs, so it would only be ignored).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from iap_rt.errors import ArtifactError, ArtifactMismatchError, ArtifactNotFoundError, IapRtError
from iap_rt.fileio import remove_leftovers, sha256_file, write_json_atomic
from iap_rt.specs import (
    ARCHITECTURES,
    CORE_NETWORKS,
    DEFAULT_ARCHITECTURE,
    NETWORKS,
    OPTIONAL_NETWORKS,
    PRECISIONS,
    REQUIRED_NETWORKS,
    SPEC_VERSION,
    ModelDims,
    NetworkSpec,
    network_spec_hash,
    network_specs,
    spec_hash,
)

log = logging.getLogger("iap_rt.modeldir")

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


# the package-data folders the embedded default model was exported from (its PyTorch sources:
# the English base and the Chinese encoder; ``scripts/make_default_model.py`` writes them)
DEFAULT_MODEL_SOURCES = ("toy_base", "toy_encoder")


def default_model_dir() -> Path:
    """The model directory shipped inside the package (see README: embedded default)."""
    from importlib import resources

    return Path(str(resources.files("iap_rt") / "data" / "default_model"))


def default_model_sources() -> tuple[Path, Path]:
    """(English base, Chinese encoder) the embedded default model was exported from."""
    data = default_model_dir().parent
    return data / DEFAULT_MODEL_SOURCES[0], data / DEFAULT_MODEL_SOURCES[1]


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
    def open(
        cls,
        path: str | os.PathLike,
        networks=None,
        verify: bool = True,
        clean: bool = True,
    ) -> ModelDir:
        """Open ``path`` and check the manifest, spec hash and the files of ``networks`` (None:
        every network the manifest lists, the core ones at least; with ``verify``: their bytes
        against the manifest's sha256, see :meth:`verify`). With
        ``clean``, what a killed export left beside ``path`` is removed first (unless an export
        is running)."""
        path = Path(path)
        fix = REEXPORT.format(path=path)
        removed = remove_leftovers(path) if clean else []
        if removed:
            log.warning("removed what a killed export left: %s", ", ".join(map(str, removed)))
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
        if networks is None:
            networks = md.networks if isinstance(manifest.get("networks"), dict) else CORE_NETWORKS
        required = REQUIRED_NETWORKS.get(md.architecture, ())
        networks = (*networks, *(n for n in required if n not in networks))
        md._check(networks)
        if verify:
            md.verify(networks)
        return md

    def _check(self, networks) -> None:
        m, fix = self.manifest, REEXPORT.format(path=self.path)
        if m.get("format_version") != FORMAT_VERSION:
            raise ArtifactMismatchError(
                f"{self.path / MANIFEST}: format_version {m.get('format_version')}, "
                f"this iap-rt reads {FORMAT_VERSION}",
                fix=fix,
            )
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise ArtifactMismatchError(
                f"{self.path / MANIFEST}: architecture {arch!r}, this iap-rt runs "
                f"{', '.join(ARCHITECTURES)} (a newer iap-rt made it?)",
                fix="upgrade iap-rt (pip install -U iap-rt), or " + fix,
            )
        if m.get("spec_hash") != spec_hash(arch):
            raise ArtifactMismatchError(
                f"{self.path / MANIFEST} was made for another shape contract "
                f"(spec_hash {str(m.get('spec_hash'))[:12]}…, spec v{m.get('spec_version')}; "
                f"this iap-rt has {spec_hash(arch)[:12]}… for {arch}, spec v{SPEC_VERSION})",
                fix=fix,
            )
        for key in ("dims", "networks", "model_id"):
            if key not in m:
                raise ArtifactError(f"{self.path / MANIFEST} lacks '{key}'", fix=fix)
        for net in networks:
            info = m["networks"].get(net)
            if info is None:
                raise ArtifactNotFoundError(
                    f"{self.path / MANIFEST} lists no '{net}' network",
                    fix=self.add_network_fix(net) if net in OPTIONAL_NETWORKS else fix,
                )
            if net in OPTIONAL_NETWORKS and info.get("spec_hash") != network_spec_hash(net):
                raise ArtifactMismatchError(
                    f"{self.path / MANIFEST}: its {net} was made for another shape contract "
                    f"(spec_hash {str(info.get('spec_hash'))[:12]}…, this iap-rt has "
                    f"{network_spec_hash(net)[:12]}…)",
                    fix=self.add_network_fix(net),
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

    # ---- integrity ----------------------------------------------------------------
    def recorded_hashes(self, networks=None) -> dict[str, tuple[str, str]]:
        """File name -> (network, sha256 the export recorded) for every file of ``networks``
        (None: every network listed) that has one: the graph, its external data, the UNet's
        ONNX Runtime variant."""
        out = {}
        for net in self.networks if networks is None else networks:
            info = self.manifest["networks"].get(net) or {}
            for rec in (info, _variant(info, ORT_VARIANT) or {}):
                for name_key, hash_key in (("file", "sha256"), ("external_data", "data_sha256")):
                    if rec.get(name_key) and rec.get(hash_key):
                        out[rec[name_key]] = (net, rec[hash_key])
        return out

    def verify(self, networks=None) -> list[str]:
        """Refuse any network file whose bytes differ from the manifest's sha256
        (:class:`ArtifactMismatchError` naming the file and the re-export command).

        A file is hashed only when its stamp differs from the one recorded when it last
        verified (see the module docstring); returns the names hashed this time."""
        record_path = verified_record_path(self.path)
        record = _read_record(record_path, self.path)
        hashed = []
        for name, (net, want) in self.recorded_hashes(networks).items():
            f = self.path / name
            if not f.is_file():
                raise ArtifactNotFoundError(
                    f"{f} is missing ({net} network; the manifest lists it)",
                    fix=self.reexport_fix([net]),
                )
            before = _stamp(f)
            seen = record.get(name)
            if seen and seen.get("sha256") == want and seen.get("stamp") == before:
                continue
            got = sha256_file(f)
            hashed.append(name)
            if got != want:
                record.pop(name, None)
                _write_record(record_path, self.path, record)
                raise ArtifactMismatchError(
                    f"{f} differs from what the export recorded (sha256 {got[:16]}…, manifest "
                    f"{want[:16]}…): the {net} network was modified or damaged after export; "
                    "refusing to run it",
                    fix=self.reexport_fix([net]),
                )
            if _stamp(f) == before:  # unchanged while it was hashed
                record[name] = {"sha256": want, "stamp": before}
        if hashed:
            _write_record(record_path, self.path, record)
        return hashed

    def add_network_fix(self, network: str) -> str:
        """The command that adds ``network`` to this directory (the others are kept)."""
        m = self.manifest
        base = m.get("base_model") if os.path.isdir(str(m.get("base_model"))) else "SD_DIR"
        enc = m.get("encoder") if os.path.isdir(str(m.get("encoder"))) else "ENCODER_DIR"
        return (f"add it without re-exporting the rest: iap-rt export --base {base} --encoder "
                f"{enc} --out {self.path} --networks {network}")  # fmt: skip

    def reexport_fix(self, networks: list[str]) -> str:
        """The command that rewrites ``networks`` of this directory."""
        m = self.manifest
        base, enc = m.get("base_model"), m.get("encoder")
        if self.path.resolve() == default_model_dir().resolve():
            return "reinstall iap-rt (pip install --force-reinstall iap-rt): the embedded model is damaged."
        if base and enc and os.path.isdir(base) and os.path.isdir(enc):
            return (
                f"re-export it: iap-rt export --base {base} --encoder {enc} --out {self.path} "
                f"--networks {','.join(networks)} --force"
            )
        return REEXPORT.format(path=self.path)

    # ---- accessors ----------------------------------------------------------------
    @property
    def networks(self) -> tuple[str, ...]:
        """The networks this directory has: the core ones and the optional ones it lists."""
        listed = self.manifest.get("networks", {})
        return tuple(n for n in NETWORKS if n in CORE_NETWORKS or n in listed)

    def has(self, network: str) -> bool:
        return network in self.manifest.get("networks", {})

    @property
    def architecture(self) -> str:
        """``sd`` (SD 1.x/2.x) or ``sd-inpaint`` (its inpainting UNet): which declarations of
        ``iap_rt.specs`` the networks follow (manifest ``architecture``; ``sd`` where none)."""
        return str(self.manifest.get("architecture", DEFAULT_ARCHITECTURE))

    @property
    def inpainting_unet(self) -> bool:
        """The UNet reads the mask and the masked image's latents beside the latents."""
        return self.architecture == "sd-inpaint"

    def spec(self, network: str) -> NetworkSpec:
        """The shape contract of ``network`` in this model's architecture."""
        return network_specs(self.architecture)[network]

    @property
    def spec_hash(self) -> str:
        """The shape contract's hash of this model's architecture (engine sidecars carry it)."""
        return spec_hash(self.architecture)

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

    @property
    def default_guidance(self) -> float:
        """The guidance scale generate and serve use when a request names none (manifest
        ``default_guidance``; SD's usual 7.5 where the exporter did not record one)."""
        return float(self.manifest.get("default_guidance", DEFAULT_GUIDANCE))

    @property
    def default_size(self) -> int:
        """The image height and width a request that names none gets (manifest
        ``image_size``: what the UNet was trained at; 512 where none was recorded)."""
        return int(self.manifest.get("image_size", 512))

    @functools.cached_property
    def num_train_timesteps(self) -> int:
        """The scheduler's training timesteps (no request may take more steps)."""
        return int(self.scheduler_config().get("num_train_timesteps", 1000))

    @property
    def caption_world(self) -> dict | None:
        """What a model declares it knows (manifest ``caption_world``: ``draws``, a phrase;
        ``words``, the prompt words it was trained on; ``examples``): the embedded toy model
        does, real SD models do not (None)."""
        world = self.manifest.get("caption_world")
        return world if isinstance(world, dict) else None

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the manifest: two processes that opened the same model (or a copy)
        agree on it, so a request resolved in one is trusted in the other."""
        text = json.dumps(self.manifest, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_dir() -> Path:
    """The per-user iap-rt cache: ``IAP_RT_CACHE_DIR``, else ``$XDG_CACHE_HOME/iap-rt``, else
    ``~/.cache/iap-rt``."""
    env = os.environ.get("IAP_RT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "iap-rt"


def verified_record_path(model: str | os.PathLike) -> Path:
    """Where the verification record of the model directory ``model`` lives."""
    key = hashlib.sha256(str(Path(model).resolve()).encode("utf-8", "surrogateescape"))
    return cache_dir() / "verified" / f"{key.hexdigest()[:32]}.json"


def _stamp(f: Path) -> list[int]:
    """What changes whenever the file's bytes can have changed (ctime: set by the kernel)."""
    st = f.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_record(path: Path, model: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("model") != str(model.resolve()):
        return {}
    files = data.get("files")
    return dict(files) if isinstance(files, dict) else {}


def _write_record(path: Path, model: Path, files: dict) -> None:
    """Remember verified stamps; a cache that cannot be written only costs a re-hash."""
    try:
        write_json_atomic(path, {"model": str(model.resolve()), "files": files})
    except IapRtError as e:
        log.warning("cannot remember the verified model files (%s); they are hashed again "
                    "on the next start", e)  # fmt: skip


DEFAULT_GUIDANCE = 7.5  # classifier-free guidance scale SD 1.x / 2.x pipelines default to


def new_manifest(
    model_id: str, dims: ModelDims, architecture: str = DEFAULT_ARCHITECTURE, **extra
) -> dict:
    """A manifest skeleton with the current spec hash of ``architecture`` (networks are added
    by export; ``sd`` manifests name no architecture, as before there were others)."""
    arch = {} if architecture == DEFAULT_ARCHITECTURE else {"architecture": architecture}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        **arch,
        "spec_version": SPEC_VERSION,
        "spec_hash": spec_hash(architecture),
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
