"""``iap-rt serve`` configuration and start-up refusals (no server is started): the [serve]
table, options that cannot work, a missing extra, and the torch-free import of the serve path."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from iap_rt.config import ServeConfig, load_config

SERVE_MODULES = (
    "iap_rt.serve.openai_api, iap_rt.serve.upstream, iap_rt.serve.cli, iap_rt.serve.gateway, "
    "iap_rt.serve.launcher, iap_rt.serve.metrics, iap_rt.serve.triton_model, iap_rt.serve.protocol, "
    "iap_rt.serve.triton, iap_rt.client"
)


def test_serve_path_imports_no_torch():
    pytest.importorskip("fastapi")
    code = (
        f"import sys; import {SERVE_MODULES}\n"
        "from iap_rt.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffusers', 'transformers', 'accelerate')]\n"
        "assert not bad, bad\nprint('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--triton-url" in r.stdout and "--no-gateway" in r.stdout and "SIGTERM" in r.stdout
    assert r.stdout.strip().endswith("ok")


def test_serve_table_in_the_workspace_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key.txt").write_text("k\n")
    (tmp_path / "iap-rt.toml").write_text(
        '[serve]\nport = 9000\nmax_batch = 16\ntriton_url = ["a:8002", "b:8002"]\n'
        'api_key_file = "key.txt"\n'
    )
    cfg = load_config(ServeConfig, "serve", None, {"port": 9100, "max_batch": None})
    assert (cfg.port, cfg.max_batch, cfg.triton_url) == (9100, 16, ("a:8002", "b:8002"))
    assert cfg.api_key_file == str(tmp_path / "key.txt")  # relative to the file


def test_init_writes_a_serve_table(tmp_path, run_cli):
    assert run_cli("init", str(tmp_path)).code == 0
    text = (tmp_path / "iap-rt.toml").read_text("utf-8")
    assert "[serve]" in text and "max_queue_delay_ms = 10.0" in text


@pytest.mark.parametrize(
    "args, words",
    [
        (["--no-gateway", "--triton-url", "h:1"], "--no-gateway runs Triton alone"),
        (["--max-n", "11"], "--max-n must be from 1 to 10"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--triton-url", "nohostport"], "is not HOST:PORT"),
        (["--api-key-file", "missing.txt"], "cannot read the API key file"),
        (["--backend", "tpu"], "unknown backend"),
    ],
)
def test_bad_options_stop_with_one_line(tmp_path, monkeypatch, run_cli, args, words):
    pytest.importorskip("pytriton")
    monkeypatch.chdir(tmp_path)
    r = run_cli("serve", *args)
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]


def test_a_taken_port_is_named(tmp_path, monkeypatch, run_cli):
    pytest.importorskip("pytriton")
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("serve", "--port", str(port))
    assert r.code == 2 and f"127.0.0.1:{port} (--port)" in r.err


def test_serve_without_the_extra_names_it(tmp_path):
    code = (
        "import sys\nsys.modules['pytriton'] = None\nfrom iap_rt.cli import main\nmain(['serve'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "pip install 'iap-rt[serve]'" in r.stderr and "pytriton" in r.stderr
