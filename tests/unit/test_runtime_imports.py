"""The runtime never imports torch at run time (the dependency rule of the layout; the AST
scan in test_layering.py pins it for every file, this checks what a real import pulls in)."""

import subprocess
import sys


def test_cli_and_pipeline_do_not_import_torch():
    code = (
        "import sys; import iap_rt.cli, iap_rt.pipeline, iap_rt.backends.ort, iap_rt.commands; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert not any(m.startswith(('diffusers', 'transformers')) for m in sys.modules); "
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_generate_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from iap_rt.cli import main\n"
        "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules\nprint('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--prompts-file" in r.stdout and r.stdout.strip().endswith("ok")
