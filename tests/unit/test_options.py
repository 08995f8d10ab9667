"""Every command's click options come from its config dataclass (iap_rt.config.config_options):
one option per field, named after it, with the field's help and its default shown, and a value
given on the command line arrives in that field. Options that are not settings (a prompt file,
--json, --config, ...) are listed here by name, so a hand-written setting cannot slip in."""

import dataclasses
import typing

import click
import pytest

from iap_rt.bench.config import BenchConfig
from iap_rt.cli import cli
from iap_rt.config import GenerateConfig, ServeConfig
from iap_rt.engines.config import EngineConfig

pytest.importorskip("torch")
from iap_rt.export.config import ExportConfig  # noqa: E402
from iap_rt.train.config import TrainConfig  # noqa: E402

# command path -> (config class, the options that are not fields of it)
COMMANDS = {
    ("generate",): (GenerateConfig, {"prompt", "prompts_file", "as_json", "config_path",
                                     "no_progress", "server", "image_path", "mask_path"}),
    ("serve",): (ServeConfig, {"config_path"}),
    ("export",): (ExportConfig, {"config_path"}),
    ("engines", "build"): (EngineConfig, {"model", "config_path", "force"}),
    ("bench",): (BenchConfig, {"out", "as_json"}),
    ("train",): (TrainConfig, {"resume", "cache_only", "config_path", "num_processes",
                               "num_machines", "machine_rank", "main_process_ip",
                               "main_process_port"}),
}  # fmt: skip


def command(path: tuple[str, ...]) -> click.Command:
    ctx = click.Context(cli)
    cmd = cli.get_command(ctx, path[0])
    for name in path[1:]:
        cmd = cmd.get_command(ctx, name)
    return cmd


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_one_option_per_field_with_its_help_and_default(path):
    cls, others = COMMANDS[path]
    cmd = command(path)
    params = {p.name: p for p in cmd.params if isinstance(p, click.Parameter)}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(params) == set(fields) | others, set(params) ^ (set(fields) | others)
    for name, f in fields.items():
        p = params[name]
        assert p.default is None or p.default is False, name  # unset: the TOML wins
        assert p.help.startswith(f.metadata["help"]), name
        if f.default not in (None, (), dataclasses.MISSING) and "[required" not in p.help:
            assert "[default: " in p.help, name
        assert any(o.lstrip("-").replace("-", "_") == name or o.startswith("--trt-")
                   or o.startswith("--dynamic") for o in p.opts), (name, p.opts)  # fmt: skip


def _sample(cls, f, hint, option):
    """A value for field ``f`` that differs from its default, as a command-line string."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    if isinstance(option.type, click.Choice):
        value = next(c for c in option.type.choices if c != f.default)
        return value, value
    if kind is int:
        return "7", 7
    if kind is float:
        return "0.5", 0.5
    return "somewhere", "somewhere"


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_a_value_given_on_the_command_line_reaches_its_field(path, tmp_path, monkeypatch):
    from iap_rt.config import load_config

    monkeypatch.chdir(tmp_path)  # no workspace file
    cls, _ = COMMANDS[path]
    cmd = command(path)
    params = {p.name: p for p in cmd.params}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        opt = params[f.name]
        if opt.multiple:  # a tuple: the option repeated
            value = ("unet", "vae_decoder") if f.name == "networks" else ("a", "b")
            args, expected = [opt.opts[0], value[0], opt.opts[0], value[1]], value
        elif opt.is_flag:
            args, expected = [opt.opts[0]], True
        else:
            text, expected = _sample(cls, f, hints[f.name], opt)
            args = [opt.opts[0], text]
        required = ["--model", "m"] if path == ("engines", "build") else []
        ctx = cmd.make_context(cmd.name, [*required, *args])
        given = {k: ctx.params[k] for k in (x.name for x in dataclasses.fields(cls))}
        assert given[f.name] == expected, (f.name, given[f.name])
        if cls is BenchConfig:
            continue  # no [bench] table: the command builds it from the given options
        section = {"generate": "generate", "serve": "serve", "export": "export",
                   "engines": "engines", "train": "train"}[path[0]]  # fmt: skip
        try:
            cfg = load_config(cls, section, None, {f.name: given[f.name]})
        except Exception:  # noqa: BLE001 - a setting the config refuses alone (a rule): skip
            continue
        assert getattr(cfg, f.name) == expected, f.name
