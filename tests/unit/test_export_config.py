"""ExportConfig: defaults, validation, TOML precedence (no torch)."""

from __future__ import annotations

import sys

import pytest

from iap_rt.errors import ConfigError
from iap_rt.export.config import ExportConfig, resolve_export_config
from iap_rt.specs import NETWORKS


def test_defaults_export_everything_at_opset_18_fp32():
    cfg = ExportConfig()
    assert cfg.opset == 18
    assert cfg.networks == tuple(NETWORKS)
    assert [cfg.precision(n) for n in NETWORKS] == ["fp32", "fp32", "fp32", "fp32"]
    assert cfg.engines == "auto"


def test_fp16_keeps_the_vae_fp32_unless_forced():
    cfg = ExportConfig(fp16=True)
    assert [cfg.precision(n) for n in NETWORKS] == ["fp16", "fp16", "fp32", "fp32"]
    both = ExportConfig(fp16=True, fp16_vae=True)
    assert both.precision("vae_decoder") == both.precision("vae_encoder") == "fp16"


@pytest.mark.parametrize("opset", [17, 22, 23])
def test_opset_outside_18_to_21_is_refused_with_the_reason(opset):
    with pytest.raises(ConfigError) as e:
        ExportConfig(opset=opset)
    msg = str(e.value)
    assert f"opset {opset}" in msg and "18-21" in msg
    assert "Attention" in msg and "Fix:" in msg


@pytest.mark.parametrize("opset", [18, 19, 20, 21])
def test_supported_opsets(opset):
    assert ExportConfig(opset=opset).opset == opset


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        ExportConfig(opset=17, networks=("unet", "clip"), engines="sometimes")
    msg = str(e.value)
    assert "opset 17" in msg and "'clip'" in msg and "'sometimes'" in msg


@pytest.mark.parametrize("g", [-0.5, 100.5])
def test_default_guidance_outside_0_to_100_is_refused(g):
    with pytest.raises(ConfigError, match=rf"default_guidance {g}: choose a number from 0 to 100"):
        ExportConfig(default_guidance=g)


def test_networks_are_put_in_canonical_order_without_duplicates():
    cfg = ExportConfig(networks=("vae_decoder", "unet", "vae_decoder"))
    assert cfg.networks == ("unet", "vae_decoder")


def test_require_paths_names_the_missing_options():
    with pytest.raises(ConfigError) as e:
        ExportConfig(out="m").require_paths()
    assert "base, encoder" in str(e.value) and "--base DIR --encoder DIR" in str(e.value)
    ExportConfig(out="m", engines="only").require_paths()  # only needs the model directory


def test_toml_then_options_precedence_and_relative_paths(tmp_path):
    (tmp_path / "ws").mkdir()
    toml = tmp_path / "ws" / "iap-rt.toml"
    toml.write_text(
        '[export]\nbase = "sd"\nencoder = "run/chinese_encoder"\nout = "model"\n'
        'fp16 = true\nopset = 19\nnetworks = ["unet"]\n',
        "utf-8",
    )
    cfg = resolve_export_config(toml, opset=20, fp16=None, networks=None)
    assert cfg.base == str((tmp_path / "ws" / "sd").resolve())
    assert cfg.encoder == str((tmp_path / "ws" / "run" / "chinese_encoder").resolve())
    assert cfg.fp16 is True  # from the file (option not given)
    assert cfg.opset == 20  # option beats the file
    assert cfg.networks == ("unet",)


def test_unknown_toml_key_lists_the_valid_ones(tmp_path):
    toml = tmp_path / "iap-rt.toml"
    toml.write_text("[export]\nhalf = true\n", "utf-8")
    with pytest.raises(ConfigError) as e:
        resolve_export_config(toml)
    assert "half" in str(e.value) and "fp16_vae" in str(e.value)


def test_config_module_imports_no_torch():
    # `iap-rt init` and `iap-rt export --help` import these in the runtime's process
    code = "import sys, iap_rt.export.config, iap_rt.export.cli; assert 'torch' not in sys.modules"
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
