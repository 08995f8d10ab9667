"""EngineConfig -> profiles and file-name labels (what a sidecar records), option errors,
and the engines stage's dependency rule (no torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from iap_rt.config import load_config
from iap_rt.engines.config import EngineConfig
from iap_rt.errors import ConfigError
from iap_rt.specs import NETWORKS, ModelDims

SD15 = ModelDims(text_max_length=77, cross_attention_dim=768)
ENGINES_DIR = Path(__file__).resolve().parents[2] / "engines"


def profiles(cfg: EngineConfig, dims=SD15) -> dict:
    cfg = cfg.checked(dims)
    return {n: cfg.profile(NETWORKS[n], dims) for n in NETWORKS}


def test_default_is_static_512_with_guidance():
    p = profiles(EngineConfig())
    assert p["unet"]["label"] == "N2_h64_w64"
    assert p["unet"]["shapes"]["sample"] == [[2, 4, 64, 64]] * 3
    assert p["unet"]["shapes"]["timestep"] == [[2]] * 3
    assert p["unet"]["shapes"]["encoder_hidden_states"] == [[2, 77, 768]] * 3
    assert p["vae_decoder"]["label"] == "B1_h64_w64"
    assert p["vae_decoder"]["shapes"]["latent_sample"] == [[1, 4, 64, 64]] * 3
    # the pipeline encodes distinct prompts: 1 or 2 per call
    assert p["text_encoder"]["label"] == "N1-2"
    assert p["text_encoder"]["shapes"]["input_ids"] == [[1, 77], [2, 77], [2, 77]]


def test_dynamic_ranges_and_sizes():
    cfg = EngineConfig(height=512, width=768, batch="1:4", resolution="256:768")
    p = profiles(cfg)
    assert p["unet"]["label"] == "N2-8_h32-96_w32-96"
    assert p["unet"]["axes"] == {"N": [2, 2, 8], "h": [32, 64, 96], "w": [32, 96, 96]}
    assert p["unet"]["shapes"]["sample"] == [[2, 4, 32, 32], [2, 4, 64, 96], [8, 4, 96, 96]]
    assert p["vae_decoder"]["label"] == "B1-4_h32-96_w32-96"
    assert p["text_encoder"]["label"] == "N1-8"
    assert profiles(EngineConfig(guidance=False))["unet"]["label"] == "N1_h64_w64"


def test_dynamic_shorthand():
    cfg = EngineConfig(dynamic=True).checked(SD15)
    assert (cfg.batch, cfg.resolution) == ("1:4", "256:1024")
    cfg = EngineConfig(dynamic=True, batch="2", resolution="512:640").checked(SD15)
    assert (cfg.batch, cfg.resolution) == ("2", "512:640")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"height": 500}, "height 500 is not a positive multiple of 8"),
        ({"width": 0}, "width 0"),
        ({"batch": "4:1"}, "batch '4:1' is not N or MIN:MAX"),
        ({"batch": "0"}, "must be >= 1"),
        ({"batch": "many"}, "not N or MIN:MAX"),
        ({"resolution": "250:768"}, "multiples of 8"),
        ({"resolution": "256:384"}, "height 512 lies outside the resolution range"),
        ({"networks": "unet,clip"}, "unknown ['clip']"),
        ({"flavour": "tensorrt-llm"}, "flavour 'tensorrt-llm' is unknown"),
        ({"compute_capabilities": "sm89"}, "not MAJOR.MINOR"),
        ({"optimization_level": 9}, "outside 0-5"),
    ],
)
def test_bad_options_say_which_rule(kwargs, words):
    with pytest.raises(ConfigError) as e:
        EngineConfig(**kwargs).checked(SD15)
    assert words in e.value.message and e.value.fix


def test_networks_and_targets_parse():
    cfg = EngineConfig(networks=" vae_decoder, unet ", compute_capabilities="8.9, 8.6,8.6")
    assert cfg.network_names() == ["unet", "vae_decoder"]  # contract order
    assert cfg.rtx_targets() == ("8.6", "8.9")
    assert EngineConfig().network_names() == list(NETWORKS)
    assert EngineConfig(compute_capabilities="current").rtx_targets() == ("current",)


def test_rebuild_args_reproduce_the_profile():
    cfg = EngineConfig(batch="1:4", resolution="256:768", guidance=False)
    assert cfg.rebuild_args() == (
        "--height 512 --width 512 --batch 1:4 --resolution 256:768 --no-guidance"
    )


def test_engines_table_in_workspace_file(tmp_path):
    p = tmp_path / "iap-rt.toml"
    p.write_text('[engines]\nbatch = "1:2"\ndynamic = true\nheight = 768\n')
    cfg = load_config(EngineConfig, "engines", p, {"height": 640, "width": None})
    assert (cfg.batch, cfg.dynamic, cfg.height, cfg.width) == (
        "1:2",
        True,
        640,
        None,
    )  # None: the model's native size
    p.write_text("[engines]\nfp16 = true\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['fp16'\]") as e:
        load_config(EngineConfig, "engines", p)
    assert "resolution" in e.value.fix


# ---- dependency rule ------------------------------------------------------------------------
def test_engines_stage_never_imports_torch():
    """Static: no module in engines/ imports torch, diffusers or transformers, even lazily."""
    banned = ("torch", "diffusers", "transformers")
    for f in sorted(ENGINES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text("utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in banned, f"{f.name} imports {n}"


def test_engines_and_trt_backend_import_without_torch():
    code = (
        "import sys; import iap_rt.engines.stage, iap_rt.engines.cli, iap_rt.engines.build, "
        "iap_rt.backends.trt; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'tensorrt' not in sys.modules and 'tensorrt_rtx' not in sys.modules, 'eager trt'; "
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
