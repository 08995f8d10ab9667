"""Workspace configuration: one ``iap-rt.toml`` with a table per stage.

Precedence: dataclass defaults < the workspace file (``./iap-rt.toml`` or ``--config FILE``)
< command-line options. Each stage owns a frozen dataclass whose fields carry a ``help``
metadata string; :func:`resolve` builds it, rejecting unknown keys with the list of valid
ones. :func:`render_toml` writes the commented template ``iap-rt init`` produces.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path

from iap_rt.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

WORKSPACE_FILE = "iap-rt.toml"
SECTIONS = ("train", "export", "engines", "generate", "serve")


def opt(default, help: str, **kw):
    """A dataclass field with a help string (shown by ``iap-rt init`` and ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Settings of ``iap-rt generate`` (the ``[generate]`` table)."""

    model: str | None = opt(None, "model directory; unset = the embedded default model")
    negative: str = opt("", "negative prompt")
    steps: int = opt(25, "denoising steps (1-1000)")
    guidance: float = opt(7.5, "classifier-free guidance scale; <= 1 turns guidance off")
    seed: int = opt(0, "seed of image 0; image i of a batch uses seed + i")
    height: int | None = opt(
        None, "image height in pixels (a multiple the model sets); unset = model's"
    )
    width: int | None = opt(
        None, "image width in pixels (a multiple the model sets); unset = model's"
    )
    batch_size: int = opt(1, "images per prompt")
    scheduler: str | None = opt(None, "ddim, euler or dpm++; unset = the model's default")
    backend: str = opt("auto", "auto, ort or trt")
    out: str = opt("outputs", "output PNG file (one image) or directory")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of ``iap-rt serve`` (the ``[serve]`` table)."""

    model: str | None = dataclasses.field(
        default=None, metadata={"help": "model directory; unset = the embedded default model",
                                "path": True})  # fmt: skip
    backend: str = opt("auto", "auto, ort or trt")
    host: str = opt("127.0.0.1", "address the gateway and Triton listen on (0.0.0.0: all)")
    port: int = opt(8000, "gateway HTTP port (API, web page, health, metrics)")
    triton_http_port: int = opt(8001, "Triton's HTTP/REST port (KServe v2)")
    triton_grpc_port: int = opt(8002, "Triton's gRPC port (the gateway talks to this one)")
    triton_metrics_port: int = opt(8003, "Triton's Prometheus metrics port")
    max_batch: int = opt(8, "most images Triton batches into one UNet call; 1 = batching off")
    max_queue_delay_ms: float = opt(10.0, "how long Triton holds a request to fill a batch")
    instances: int = opt(1, "model instances (pipelines) in Triton")
    api_key_file: str | None = dataclasses.field(
        default=None, metadata={"help": "file holding the API key; unset = no key needed",
                                "path": True})  # fmt: skip
    triton_url: tuple[str, ...] = opt((), "remote Triton gRPC HOST:PORT list; set = gateway only")
    no_gateway: bool = opt(False, "run Triton alone (one per GPU node, behind a gateway)")
    max_queue: int = opt(64, "images queued or generating before requests get 429")
    timeout_s: float = opt(300.0, "seconds a request may take before it gets 504")
    max_body_bytes: int = opt(65536, "largest request body, bytes (413 above)")
    max_prompt_chars: int = opt(1000, "longest prompt / negative prompt, characters")
    max_n: int = opt(10, "most images per request (n), 1-10")
    max_steps: int = opt(150, "most denoising steps per request")
    max_pixels: int = opt(4194304, "most pixels per request: width x height x n")


def find_workspace_file(explicit: str | os.PathLike | None = None) -> Path | None:
    """``--config FILE`` if given (must exist), else ``./iap-rt.toml`` if present."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist",
                fix="pass an existing TOML file, or run `iap-rt init` to write one.",
            )
        return p
    p = Path.cwd() / WORKSPACE_FILE
    return p if p.is_file() else None


# keys a workspace file may still carry from an older release: old name -> new name
RENAMED_KEYS = {"ort_cpu_unet": "ort_unet"}


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", fix="fix the syntax error.") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text", fix="save it as UTF-8.") from e
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {unknown}",
            fix=f"valid tables are {', '.join('[' + s + ']' for s in SECTIONS)}.",
        )
    return data


def _coerce(cls, name: str, value, source: str):
    """Type-check one value against the dataclass field annotation."""
    import types

    hints = typing.get_type_hints(cls)
    hint = hints[name]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if is_union else ()
    allowed = tuple(a for a in args if a is not type(None)) if is_union else (hint,)
    if value is None:
        if type(None) in args:
            return None
    else:
        for t in allowed:
            origin = typing.get_origin(t) or t
            if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if origin is int and isinstance(value, bool):
                continue
            if isinstance(value, origin):
                return tuple(value) if origin is tuple else value
            if origin is tuple and isinstance(value, list):
                return tuple(value)
    raise ConfigError(
        f"{source}: '{name}' = {value!r} has the wrong type, expected {hint}",
        fix=f"set '{name}' to a value of type {hint}.",
    )


def resolve(
    cls,
    section: str,
    config_path: str | os.PathLike | None = None,
    overrides: Mapping | None = None,
):
    """Build ``cls`` from defaults < workspace TOML ``[section]`` < ``overrides``.

    ``overrides`` values that are ``None`` mean "not given on the command line".
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    path = find_workspace_file(config_path)
    if path is not None:
        table = load_toml(path).get(section, {})
        unknown = sorted(set(table) - fields)
        if unknown:
            renamed = [f"{k} -> {RENAMED_KEYS[k]}" for k in unknown if k in RENAMED_KEYS]
            raise ConfigError(
                f"{path}: unknown key(s) {unknown} in [{section}]",
                fix=(f"renamed: {', '.join(renamed)}; " if renamed else "")
                + f"valid keys are: {', '.join(sorted(fields))}.",
            )
        base = path.parent
        for k, v in table.items():
            v = _coerce(cls, k, v, f"{path} [{section}]")
            if isinstance(v, str) and _is_path_field(cls, k) and v and not os.path.isabs(v):
                v = str((base / v).resolve())  # paths are relative to the config file
            values[k] = v
    for k, v in (overrides or {}).items():
        if k not in fields:
            raise ConfigError(f"unknown option {k!r}", fix=f"valid: {', '.join(sorted(fields))}.")
        if v is not None:
            values[k] = _coerce(cls, k, v, "command line")
    return cls(**values)


def _is_path_field(cls, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return bool(f.metadata.get("path")) or name in ("model", "out", "base", "encoder", "data")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def render_toml(classes: Mapping[str, type]) -> str:
    """A commented ``iap-rt.toml`` template: every key, its default and help."""
    lines = [
        "# iap-rt workspace configuration. Command-line options override these values;",
        "# relative paths are relative to this file. Unset keys keep their defaults.",
        "",
    ]
    for section, cls in classes.items():
        lines.append(f"[{section}]")
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"# {doc}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            help_ = f.metadata.get("help", "")
            lines.append(f"# {help_}")
            if default is None:
                lines.append(f"# {f.name} = ")
            else:
                lines.append(f"{f.name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
