"""The layering rules of the code base, checked on the source (AST), not on ``sys.modules``.

- Nothing under the ``iap_rt/`` folder (the torch-free runtime + CLI) imports torch, diffusers,
  transformers or accelerate, anywhere in a file: module level, inside a function, or through
  ``importlib.import_module("torch")``.
- Nothing under ``iap_rt/`` imports a stage (``iap_rt.train``, ``iap_rt.export``,
  ``iap_rt.engines``): the CLI reaches them through its lazy command table (strings), and the
  stages import the runtime's format modules, never the other way round.
- The engines stage (``engines/``) never imports torch either: it works from ONNX files.
- No source file is over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "accelerate")
STAGES = ("iap_rt.train", "iap_rt.export", "iap_rt.engines")
MAX_LINES = 600


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, with its line: ``import``/``from`` statements at any
    depth and ``importlib.import_module``/``__import__`` calls with a constant name."""
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
    return found


def violations(folder: Path, banned: tuple[str, ...]) -> list[str]:
    """``file:line imports module`` for every import of a ``banned`` package under ``folder``."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        for line, mod in imported_modules(path):
            hit = f"{path.relative_to(folder.parent)}:{line} imports "
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                if not any(o.startswith(hit) for o in out):  # one per statement
                    out.append(hit + mod)
    return out


def test_runtime_folder_imports_no_torch_stack():
    assert violations(ROOT / "iap_rt", HEAVY) == []


def test_runtime_folder_reaches_stages_only_through_the_cli_table():
    assert violations(ROOT / "iap_rt", STAGES) == []


def test_engines_stage_imports_no_torch_stack():
    assert violations(ROOT / "engines", HEAVY) == []


@pytest.mark.parametrize(
    "source",
    [
        "def f():\n    import torch\n",
        "def f():\n    from diffusers import UNet2DConditionModel\n",
        "import importlib\n\ndef f():\n    return importlib.import_module('transformers')\n",
        "class A:\n    def m(self):\n        from accelerate.utils import set_seed\n",
    ],
)
def test_a_planted_import_inside_a_function_is_caught(tmp_path, source):
    pkg = tmp_path / "iap_rt"
    pkg.mkdir()
    (pkg / "ok.py").write_text("import numpy\n")
    (pkg / "planted.py").write_text(source)
    found = violations(pkg, HEAVY)
    assert len(found) == 1 and found[0].startswith("iap_rt/planted.py:")


def test_no_source_file_over_600_lines():
    too_long = []
    for folder in ("iap_rt", "train", "export", "engines", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            n = len(path.read_text("utf-8").splitlines())
            if n > MAX_LINES:
                too_long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert too_long == []
