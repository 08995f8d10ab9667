"""Workspace configuration: precedence, unknown keys, types, init template."""

import pytest

from iap_rt.config import GenerateConfig, load_config, render_toml
from iap_rt.errors import ConfigError


def test_precedence_defaults_file_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(GenerateConfig, "generate").steps is None  # unset: the default
    (tmp_path / "iap-rt.toml").write_text('[generate]\nsteps = 40\nmodel = "m"\nguidance = 3\n')
    cfg = load_config(GenerateConfig, "generate")
    assert cfg.steps == 40 and cfg.guidance == 3.0
    assert cfg.model == str((tmp_path / "m").resolve())  # relative to the file
    cfg = load_config(GenerateConfig, "generate", overrides={"steps": 7, "seed": None})
    assert cfg.steps == 7 and cfg.seed == 0


def test_unknown_key_lists_valid_ones(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[generate]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\]") as e:
        load_config(GenerateConfig, "generate", p)
    assert "steps" in e.value.fix and "guidance" in e.value.fix


def test_a_renamed_key_names_its_new_name(tmp_path):
    from iap_rt.export.config import ExportConfig

    p = tmp_path / "c.toml"
    p.write_text('[export]\nort_cpu_unet = "never"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['ort_cpu_unet'\]") as e:
        load_config(ExportConfig, "export", p)
    assert e.value.fix.startswith("renamed: ort_cpu_unet -> ort_unet;")
    p.write_text('[export]\nort_unet = "never"\n')
    assert load_config(ExportConfig, "export", p).ort_unet == "never"


def test_unknown_table_and_bad_type_and_bad_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[genrate]\n")
    with pytest.raises(ConfigError, match="unknown table"):
        load_config(GenerateConfig, "generate", p)
    p.write_text('[generate]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match='steps = "many" is a string, expected an integer'):
        load_config(GenerateConfig, "generate", p)
    p.write_text("[generate\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(GenerateConfig, "generate", p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GenerateConfig, "generate", tmp_path / "missing.toml")


def test_rendered_template_loads_back(tmp_path):
    p = tmp_path / "iap-rt.toml"
    p.write_text(render_toml({"generate": GenerateConfig}))
    import dataclasses

    want = dataclasses.replace(GenerateConfig(), out=str(tmp_path / "outputs"))
    assert load_config(GenerateConfig, "generate", p) == want  # paths resolve beside the file


def test_init_command_writes_all_tables(tmp_path, run_cli):
    r = run_cli("init", str(tmp_path))
    assert r.code == 0, r.err
    text = (tmp_path / "iap-rt.toml").read_text()
    assert "[generate]" in text and "# denoising steps" in text
    assert run_cli("init", str(tmp_path)).code != 0  # no silent overwrite


def test_tuple_fields_accept_toml_arrays(tmp_path):
    import dataclasses

    from iap_rt.config import opt

    @dataclasses.dataclass(frozen=True)
    class C:
        prompts: tuple[str, ...] = opt((), "prompts")
        maybe: tuple[str, ...] | None = opt(None, "optional prompts")

    p = tmp_path / "c.toml"
    p.write_text('[train]\nprompts = ["a", "b"]\nmaybe = ["c"]\n')
    assert load_config(C, "train", p) == C(("a", "b"), ("c",))
    p.write_text("[train]\nprompts = 3\n")
    with pytest.raises(ConfigError, match="is an integer, expected an array of strings"):
        load_config(C, "train", p)
