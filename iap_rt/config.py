"""Workspace configuration: one ``iap-rt.toml`` with a table per stage.

Precedence: dataclass defaults < the workspace file (``./iap-rt.toml`` or ``--config FILE``)
< command-line options. Each stage owns a frozen dataclass whose fields carry a ``help``
metadata string; :func:`load_config` builds it, rejecting unknown keys with the list of valid
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
    steps: int | None = opt(None, "denoising steps, 1-1000; unset = 25")
    guidance: float | None = opt(
        None, "classifier-free guidance scale, 0-100; <= 1 turns guidance off; unset = the "
        "model's default (7.5 for SD; the embedded toy model: 3)",
    )  # fmt: skip
    seed: int = opt(0, "seed of image 0, 0 to 2**63-1; image i of a batch uses seed + i")
    height: int | None = opt(
        None, "image height in pixels, a multiple of the model's pixel multiple (VAE factor x "
        "2**UNet down-samplings: 64 for SD 1.5, 16 for the embedded toy); unset = model's size",
    )  # fmt: skip
    width: int | None = opt(
        None, "image width in pixels, same rule as height; unset = the model's size"
    )
    batch_size: int = opt(1, "images per prompt")
    chunk_size: int = opt(8, "images per UNet batch; bigger batches run as several (less memory)")
    memory_limit: str = opt(
        "auto", 'refuse a call whose estimated peak memory is above this: "auto" (90% of what '
        'is available), a size like "12GB", or "off"',
    )  # fmt: skip
    scheduler: str | None = opt(None, "ddim, euler or dpm++; unset = the model's default")
    strength: float | None = opt(
        None, "editing (--image): how far the image is noised before it is denoised with the "
        "prompt, (0, 1]; 1 repaints it entirely; unset = 0.8",
    )  # fmt: skip
    mask_blur: int | None = opt(
        None, "inpainting (--mask): feather in pixels, inside the mask, where the result is "
        "blended into the kept image; unset = 4",
    )  # fmt: skip
    backend: str = opt("auto", "auto, ort or trt")
    out: str = opt(
        "outputs", "output file for one image (.png, .jpg, .jpeg or .webp) or a directory "
        "for numbered PNGs",
    )  # fmt: skip


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
    max_upload_bytes: int = opt(
        16 * 2**20, "largest image edit upload (/v1/images/edits: image + mask), bytes (413)"
    )
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


def toml_kind(value) -> str:
    """What a parsed TOML value is, in TOML's words (``an integer``, ``a table``, ...)."""
    import datetime

    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) for v in value):
            return "an array of tables"
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date/time"
    return "a value"  # pragma: no cover - tomllib makes nothing else


def load_toml(path: Path) -> dict:
    """The tables of a workspace file; any malformed file is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", fix="fix the syntax error.") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text", fix="save it as UTF-8.") from e
    except RecursionError:
        raise ConfigError(
            f"{path} nests arrays or tables too deeply to read", fix="flatten the file."
        ) from None
    except OSError as e:
        raise ConfigError(
            f"cannot read {path}: {e.strerror or e}", fix="pass a readable TOML file."
        ) from e
    tables = ", ".join(f"[{s}]" for s in SECTIONS)
    for key, value in data.items():
        if key not in SECTIONS:
            what = "table" if isinstance(value, dict) else "key outside any table"
            raise ConfigError(
                f"{path}: unknown {what} {key!r}",
                fix=f"valid tables are {tables}; every setting goes under one of them "
                "(`iap-rt init` writes a commented template).",
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: {key!r} must be a table, found {toml_kind(value)} "
                f"({key} = {_show(value)})",
                fix=f"write the header [{key}] on its own line and its settings below it, "
                "one `key = value` a line.",
            )
    return data


def _show(value) -> str:
    """A parsed value as TOML-ish text, short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = _toml_value(value)
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed(hint) -> tuple[list, bool]:
    """The types a field annotation allows (``tuple[str, ...]`` stays whole) and whether it
    may be unset (``| None``)."""
    import types

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], False


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_ARRAY_WORDS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def expected_kind(hint) -> str:
    """A field annotation in TOML's words: ``an integer``, ``an array of strings``, ..."""
    types_, optional = _allowed(hint)
    words = []
    for t in types_:
        origin = typing.get_origin(t) or t
        if origin is tuple:
            inner = typing.get_args(t)[:1]
            words.append(
                f"an array of {_ARRAY_WORDS.get(inner[0], 'values') if inner else 'values'}"
            )
        else:
            words.append(_KIND_WORDS.get(origin, getattr(origin, "__name__", str(origin))))
    return " or ".join(words) + (", or left out (unset)" if optional else "")


def _coerce(cls, name: str, value, source: str):
    """Type-check one value against the dataclass field annotation (TOML words in errors)."""
    import math

    hint = typing.get_type_hints(cls)[name]
    allowed, optional = _allowed(hint)
    if value is None and optional:
        return None
    for t in allowed:
        origin = typing.get_origin(t) or t
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                where = (
                    f"--{name.replace('_', '-')} {value}"
                    if source == "command line"
                    else f"{source}: {name} = {value}"
                )
                raise ConfigError(
                    f"{where} is not a finite number",
                    fix=f"set {name} to a finite number (nan and inf are never valid).",
                )
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and isinstance(value, origin):
            return value
        if origin is tuple and isinstance(value, (list, tuple)):
            inner = typing.get_args(t)[:1]
            if not inner or all(isinstance(v, inner[0]) for v in value):
                return tuple(value)
    example = _example(cls, name)
    fix = f"set {name} to {expected_kind(hint)}"
    raise ConfigError(
        f"{source}: {name} = {_show(value)} is {toml_kind(value)}, expected {expected_kind(hint)}",
        fix=fix + (f", e.g. {name} = {example}." if example else "."),
    )


def _example(cls, name: str) -> str | None:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is dataclasses.MISSING or f.default is None:
        return None
    return _toml_value(f.default)


def load_config(
    cls,
    section: str,
    config_path: str | os.PathLike | None = None,
    overrides: Mapping | None = None,
):
    """Build ``cls`` from defaults < workspace TOML ``[section]`` < ``overrides``.

    ``overrides`` values that are ``None`` mean "not given on the command line". Every
    problem with the file (syntax, a table written as a scalar, wrong nesting, wrong types,
    unknown keys) is a :class:`ConfigError` naming the key, the expected TOML type and the
    valid keys.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    path = find_workspace_file(config_path)
    if path is not None:
        table = load_toml(path).get(section, {})
        unknown = sorted(set(table) - fields)
        if unknown:
            renamed = [f"{k} -> {RENAMED_KEYS[k]}" for k in unknown if k in RENAMED_KEYS]
            nested = [k for k in unknown if isinstance(table[k], dict)]
            why = (
                f" ([{section}.{nested[0]}] is a sub-table; [{section}] has none)" if nested else ""
            )
            raise ConfigError(
                f"{path}: unknown key(s) {unknown} in [{section}]" + why,
                fix=(f"renamed: {', '.join(renamed)}; " if renamed else "")
                + f"valid keys are: {', '.join(sorted(fields))}.",
            )
        base = path.parent
        for k, v in table.items():
            v = _coerce(cls, k, v, f"{path} [{section}]")
            if isinstance(v, str) and _is_path_field(cls, k) and v and not os.path.isabs(v):
                if "\0" in v:
                    raise ConfigError(
                        f"{path} [{section}]: {k} holds a NUL character", fix="fix the path."
                    )
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


# ---- command-line options from a config dataclass ------------------------------------------
def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def option_help(cls, name: str, required: bool = False, note: str = "") -> str:
    """A field's help (+ ``note``) with its default (or "required"), as ``--help`` shows it."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    text = f.metadata.get("help", "") + note
    if required:
        return text + "  [required, here or in iap-rt.toml]"
    if f.default is dataclasses.MISSING or f.default is None or f.default == ():
        return text
    if isinstance(f.default, tuple):
        shown = ",".join(map(str, f.default))
    else:
        shown = f.default or '""' if isinstance(f.default, str) else _toml_value(f.default)
    return text + f"  [default: {shown}]"


def config_options(
    cls,
    *,
    required: tuple[str, ...] = (),
    choices: Mapping[str, tuple[str, ...]] | None = None,
    names: Mapping[str, str | tuple[str, ...]] | None = None,
    comma_lists: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
):
    """A decorator adding one click option per field of the config dataclass ``cls``: the
    option's name, type, help and shown default all come from the field, so an option, its
    ``iap-rt.toml`` key and its default cannot drift (pass the options to
    :func:`load_config`). Every option defaults to None, "not given", so the TOML value or the
    field's default applies.

    ``names``: a field's option declaration(s) when it is not ``--field-name`` (e.g.
    ``"--trt-flavour"``, ``"--dynamic/--static"`` for a boolean, or a tuple: the name and
    older aliases); ``choices``: allowed
    values (click checks them); ``comma_lists``: tuple fields whose values may also be given
    comma-separated (``--backends ort,trt``); ``skip``: fields that are not options. Booleans
    are ``--x/--no-x`` (a field named ``no_x`` is the one flag ``--no-x``); tuples repeat."""
    import click

    hints = typing.get_type_hints(cls)
    choices, names = dict(choices or {}), dict(names or {})

    def decorate(command):
        for fld in reversed(dataclasses.fields(cls)):
            if fld.name in skip:
                continue
            kinds, _ = _allowed(hints[fld.name])
            kind = typing.get_origin(kinds[0]) or kinds[0]
            kw = {"default": None, "help": option_help(cls, fld.name, fld.name in required)}
            decls = names.get(fld.name, flag_name(fld.name))
            decls = (decls,) if isinstance(decls, str) else tuple(decls)
            if kind is bool:
                if "/" in decls[0]:
                    pass  # "--on/--off" as given
                elif fld.name.startswith("no_"):
                    kw["is_flag"] = True
                else:
                    decls = (f"{decls[0]}/--no-{decls[0][2:]}",)
                option = click.option(*decls, fld.name, **kw)
            elif kind is tuple:
                split = fld.name in comma_lists
                note = "; repeat the option for several" + (
                    " (or separate them with commas)" if split else ""
                )
                kw["help"] = option_help(cls, fld.name, fld.name in required, note)
                option = click.option(*decls, fld.name, multiple=True,
                                      callback=lambda c, p, v, s=split: _tuple_value(v, s), **kw)  # fmt: skip
            elif fld.name in choices:
                option = click.option(*decls, fld.name, type=click.Choice(choices[fld.name]), **kw)
            else:
                option = click.option(*decls, fld.name, type=kind, **kw)
            command = option(command)
        return command

    return decorate


def _tuple_value(values: tuple, split: bool) -> tuple | None:
    """A repeated option's values (None: not given), comma lists split where allowed."""
    values = tuple(v for v in values or () if v is not None)
    if split:
        values = tuple(v.strip() for item in values for v in item.split(",") if v.strip())
    return tuple(values) or None
