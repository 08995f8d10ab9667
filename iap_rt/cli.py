"""The ``iap-rt`` command line.

Commands are registered here by import path and loaded only when invoked, so the runtime
never imports a stage (or torch) it does not run: ``iap-rt generate`` imports no torch,
``iap-rt train`` imports torch inside its body.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from iap_rt.errors import IapRtError

# name -> (module:attribute of a click command, one-line help shown by `iap-rt --help`)
COMMANDS = {
    "generate": ("iap_rt.commands:generate", "Generate images from Chinese prompts."),
    "info": ("iap_rt.commands:info", "Summarise the install and a model (--json: everything)."),
    "init": ("iap_rt.commands:init", "Write a commented iap-rt.toml workspace file."),
    "train": ("iap_rt.train.cli:train", "IAP-train a Chinese text encoder against a frozen SD."),
    "export": ("iap_rt.export.cli:export", "Export encoder, UNet and VAE to a model directory."),
    "engines": ("iap_rt.engines.cli:engines", "Build TensorRT engines from a model directory."),
    "bench": ("iap_rt.bench.command:bench", "Benchmark backends side by side (JSON results)."),
    "serve": ("iap_rt.serve.cli:serve", "Serve the model: Triton + an OpenAI-compatible API."),
    "toy": ("iap_rt.train.toy.cli:toy", "The toy world: data, base, checker, transfer, plug-ins."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        mod_name, attr = target.split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            return _unavailable(name, e.name or "?")
        return getattr(mod, attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


# command -> the extra it needs beyond the base install
COMMAND_EXTRAS = {
    "train": "train",
    "export": "export",
    "engines": "trt",
    "toy": "train",
    "bench": "export",
    "serve": "serve",
}


def missing_module_error(command: str, module: str) -> IapRtError:
    """The one-line error for ``iap-rt COMMAND`` failing to import ``module``."""
    from iap_rt.extras import install_hint, stage_not_installed

    why = stage_not_installed(module)
    if why:
        return IapRtError(
            f"`iap-rt {command}` cannot run: {why}",
            fix="install the checkout: pip install -e '.[all]' (install torch==2.13.0 or your "
            "CUDA build of torch first), or run the installed iap-rt.",
        )
    extra = COMMAND_EXTRAS.get(command, "all")
    return IapRtError(
        f"`iap-rt {command}` needs the Python package '{module}', which is not installed",
        fix=install_hint(extra) + ".",
    )


def _unavailable(name: str, missing: str) -> click.Command:
    @click.command(name, add_help_option=False, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def cmd(args):
        raise missing_module_error(name, missing)

    return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.version_option(package_name="iap-rt")
@click.pass_context
def cli(ctx, debug, verbose):
    """iap-rt: give an English Stable Diffusion a Chinese voice, and serve it fast.

    \b
    Typical workflow (or bare commands in a workspace with iap-rt.toml, see `iap-rt init`):
      iap-rt train   --base SD_DIR --encoder ENC --data pairs.jsonl --out run/
      iap-rt export  --base SD_DIR --encoder run/chinese_encoder --out model/ --fp16
      iap-rt generate "山水画" --model model/
    """
    ctx.obj = {"debug": debug}
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )


def main(argv=None) -> None:
    """Entry point: runs the CLI, turns :class:`IapRtError` into one line + exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="iap-rt")
    except IapRtError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except ModuleNotFoundError as e:  # an optional dependency imported inside a command
        if debug:
            raise
        args = argv if argv is not None else sys.argv[1:]
        command = next((a for a in args if a in COMMANDS), "?")
        click.echo(f"error: {missing_module_error(command, e.name or '?')}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
