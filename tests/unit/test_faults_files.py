"""Issue 16, rules 5-7 on files: unsupported or incomplete base models, malformed workspace
TOML, and what a killed export leaves beside a model (torch-free, real files)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from iap_rt.basemodel import SUPPORTED, check_base_dir, unsupported_features
from iap_rt.config import GenerateConfig, load_config, render_toml
from iap_rt.errors import ArtifactError, ArtifactNotFoundError, ConfigError

SD_UNET = {
    "_class_name": "UNet2DConditionModel",
    "in_channels": 4,
    "out_channels": 4,
    "cross_attention_dim": 768,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "addition_embed_type": None,
}
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def make_base(root: Path, unet: dict | None = None, weights: str = "safetensors") -> Path:
    """A diffusers pipeline directory made of configs and empty weight files."""
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text(json.dumps(unet or SD_UNET))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text("{}")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text("{}")
    (root / "tokenizer").mkdir()
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    for comp, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):  # fmt: skip
        ext = "safetensors" if weights == "safetensors" or comp != "unet" else weights
        (root / comp / f"{name}.{ext}").write_bytes(b"\0")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def test_an_sd15_shaped_base_passes(tmp_path):
    base = make_base(tmp_path / "sd")
    assert unsupported_features(base) == []
    check_base_dir(base, PARTS)


def test_sdxl_is_refused_with_what_is_supported_and_what_was_found(tmp_path):
    base = make_base(tmp_path / "sdxl", {**SD_UNET, "addition_embed_type": "text_time"})
    (base / "text_encoder_2").mkdir()
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ArtifactError) as e:
        check_base_dir(base, PARTS)
    msg = str(e.value)
    assert "is not a supported base model" in msg
    assert "second text encoder (text_encoder_2/: SDXL)" in msg
    assert "added conditioning (addition_embed_type 'text_time')" in msg
    assert e.value.fix == SUPPORTED + "."


XL_UNET = {
    **SD_UNET,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "cross_attention_dim": 2048,
    "projection_class_embeddings_input_dim": 2816,
}
REFINER_UNET = {
    **XL_UNET,
    "cross_attention_dim": 1280,
    "projection_class_embeddings_input_dim": 2560,
}  # 5 time ids
KOLORS_UNET = {**XL_UNET, "encoder_hid_dim": 4096, "encoder_hid_dim_type": "text_proj",
               "projection_class_embeddings_input_dim": 5632}  # fmt: skip


@pytest.mark.parametrize(
    ("pipeline", "unet", "encoders", "name"),
    [
        ("StableDiffusionXLPipeline", XL_UNET, ("text_encoder", "text_encoder_2"),
         "an SDXL base (two text encoders"),
        ("StableDiffusionXLImg2ImgPipeline", REFINER_UNET, ("text_encoder_2",),
         "an SDXL refiner (one text encoder, aesthetic-score time ids)"),
        (None, REFINER_UNET, ("text_encoder", "text_encoder_2"),  # its UNet alone says so
         "an SDXL refiner"),
        ("KolorsPipeline", KOLORS_UNET, ("text_encoder",), "a Kolors-shaped base (a ChatGLM"),
        (None, KOLORS_UNET, ("text_encoder",), "a Kolors-shaped base"),
    ],
)  # fmt: skip
def test_sdxl_class_bases_are_named_first(tmp_path, pipeline, unet, encoders, name):
    base = make_base(tmp_path / "b", unet)
    shutil.rmtree(base / "text_encoder")
    for enc in encoders:
        (base / enc).mkdir()
    index = {"_class_name": pipeline} if pipeline else {}
    if "Img2Img" in str(pipeline):
        index["requires_aesthetics_score"] = True
    (base / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ArtifactError) as e:
        check_base_dir(base, PARTS)
    assert f"is not a supported base model: it has {name}" in str(e.value)


@pytest.mark.parametrize(
    ("change", "found"),
    [
        ({"class_embed_type": "timestep"}, "class conditioning"),
        ({"encoder_hid_dim": 1024}, "encoder_hid_dim projection"),
        (
            {"in_channels": 9},
            "9 input but 4 output channels (an inpainting UNet: train and "
            "export with its plain base, then plug it in with `iap-rt export "
            "--unet",
        ),  # fmt: skip
        ({"in_channels": 8}, "8 input but 4 output channels"),
        (
            {"down_block_types": ["DownBlock2D"] * 4, "mid_block_type": "UNetMidBlock2D"},
            "no cross-attention layers",
        ),  # fmt: skip
        ({"cross_attention_dim": [768, 768]}, "cross_attention_dim [768, 768]"),
        ({"_class_name": "UNet2DModel"}, "a UNet2DModel"),
    ],
)
def test_other_unets_are_refused(tmp_path, change, found):
    base = make_base(tmp_path / "b", {**SD_UNET, **change})
    with pytest.raises(ArtifactError, match="not a supported base model") as e:
        check_base_dir(base, PARTS)
    assert found in str(e.value)


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_transformer_pipelines_are_refused(tmp_path, pipeline):
    base = tmp_path / pipeline
    (base / "transformer").mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(ArtifactError) as e:
        check_base_dir(base, ("unet", "vae", "scheduler"))
    assert f"a transformer denoiser instead of a UNet ({pipeline})" in str(e.value)


def test_pickled_weights_are_refused_without_unpickling(tmp_path):
    base = make_base(tmp_path / "b", weights="bin")
    with pytest.raises(ArtifactError) as e:
        check_base_dir(base, PARTS)
    msg = str(e.value)
    assert "pickled weights only (unet/diffusion_pytorch_model.bin)" in msg
    assert "safetensors" in msg and "free disk space" not in msg


def test_missing_parts_are_listed_together(tmp_path):
    base = make_base(tmp_path / "b")
    shutil.rmtree(base / "vae")
    (base / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ArtifactNotFoundError) as e:
        check_base_dir(base, PARTS)
    assert "missing unet/diffusion_pytorch_model.safetensors, vae/config.json" in str(e.value)
    (base / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    shutil.copytree(base / "text_encoder", base / "vae")  # sharded weights count
    (base / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0")
    check_base_dir(base, PARTS)


# ---- rule 6: malformed workspace TOML ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("generate = 3\n", ("'generate' must be a table, found an integer", "[generate]")),
        ("[[generate]]\nsteps = 3\n", ("'generate' must be a table, found an array of tables",)),
        ("steps = 3\n", ("unknown key outside any table 'steps'", "[generate]")),
        ("[generate.steps]\nx = 1\n", ("steps = {x = 1} is a table, expected an integer",)),
        ("[generate.extra]\nx = 1\n", ("[generate.extra] is a sub-table", "valid keys are")),
        ('[generate]\nseed = "7"\n', ('seed = "7" is a string, expected an integer',)),
        ("[generate]\nguidance = true\n", ("guidance = true is a boolean, expected a number",)),
        ("[generate]\nguidance = inf\n", ("guidance = inf is not a finite number",)),
        (
            "[generate]\nheight = 1.5\n",
            ("height = 1.5 is a float, expected an integer, or left out (unset)",),
        ),  # fmt: skip
        ("[generate]\nout = [1]\n", ("out = [1] is an array, expected a string",)),
        ("[generate]\nmodel = 1979-05-27\n", ("model = 1979-05-27 is a date/time",)),
        ("[generate]\nsteps = " + "[" * 2000 + "]" * 2000 + "\n", ("too deeply",)),
        ("\xff\xfe", ("not UTF-8",)),
    ],
)
def test_malformed_toml_is_one_clear_error(tmp_path, text, needles):
    p = tmp_path / "c.toml"
    p.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, "generate", p)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert "<class" not in str(e.value) and "| None" not in str(e.value)


def test_the_cli_prints_one_line_for_a_scalar_table(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "iap-rt.toml").write_text("generate = 3\n")
    r = run_cli("generate", "x")
    assert r.code == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err
    assert "must be a table" in r.err


def test_tuple_fields_check_their_elements(tmp_path):
    from iap_rt.export.config import ExportConfig

    p = tmp_path / "c.toml"
    p.write_text("[export]\nnetworks = [1, 2]\n")
    with pytest.raises(ConfigError, match="networks = \\[1, 2\\] is an array, expected an array "
                                          "of strings"):  # fmt: skip
        load_config(ExportConfig, "export", p)


def test_an_unreadable_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GenerateConfig, "generate", tmp_path)  # a directory


def test_init_template_states_the_size_rule_and_loads_back(tmp_path):
    text = render_toml({"generate": GenerateConfig})
    assert "multiple of the model's pixel multiple" in text and "64 for SD 1.5" in text
    assert "chunk_size = 8" in text and 'memory_limit = "auto"' in text
    p = tmp_path / "iap-rt.toml"
    p.write_text(text)
    assert load_config(GenerateConfig, "generate", p).chunk_size == 8


def test_readme_states_the_rules_the_code_enforces():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    section = readme.split("## `iap-rt generate`", 1)[1].split("\n## ", 1)[0]
    assert "multiple of 8" not in section
    for rule in ("pixel multiple", "2**63-1", "0–100", "--chunk-size", "--memory-limit",
                 ".jpg", ".webp", "--prompts-file", "sha256"):  # fmt: skip
        assert rule in section, rule


# ---- rule 7: what a killed export leaves beside the model -------------------------------------


def _leftovers(model: Path) -> tuple[Path, Path]:
    stage = model.parent / f".{model.name}.k1ll3d0x"
    (stage / "unet.onnx").parent.mkdir()
    (stage / "unet.onnx").write_bytes(b"half" * 1000)
    old = model.parent / f".{model.name}.old-a1b2c3d4"
    old.mkdir()
    return stage, old


def test_info_reports_leftovers_and_the_next_generate_removes_them(tmp_path, run_cli, model_copy):
    stage, old = _leftovers(model_copy)
    keep = model_copy.parent / f".{model_copy.name}x.abcdefgh"  # another model's: never touched
    keep.mkdir()
    r = run_cli("info", "--model", str(model_copy))
    assert r.code == 0, r.err
    assert f"leftover: {stage} (0.0 MB, left by a killed export" in r.out
    assert f"leftover: {old}" in r.out and str(keep) not in r.out
    assert stage.exists()  # info only reports
    r = run_cli("generate", "x", "--model", str(model_copy), "--steps", "2", "--height", "32",
                "--width", "32", "--out", str(tmp_path / "a.png"))  # fmt: skip
    assert r.code == 0, r.err
    assert not stage.exists() and not old.exists() and keep.exists()


def test_leftovers_of_a_running_export_are_left_alone(run_cli, model_copy):
    from iap_rt.fileio import exclusive_lock
    from iap_rt.modeldir import ModelDir

    with exclusive_lock(model_copy, what="test export"):
        stage, _ = _leftovers(model_copy)
        ModelDir.open(model_copy)
        assert stage.exists()
        r = run_cli("info", "--model", str(model_copy))
        assert f"in use by a running export, pid {os.getpid()}" in r.out
    ModelDir.open(model_copy)
    assert not stage.exists()


def test_leftovers_of_a_model_that_does_not_exist_yet_go_too(tmp_path, run_cli):
    model = tmp_path / "model"  # a first export was killed: only its staging directory exists
    stage = tmp_path / ".model.abcdefgh"
    stage.mkdir()
    r = run_cli("generate", "x", "--model", str(model))
    assert r.code != 0 and "does not exist" in r.err
    assert not stage.exists()
