"""The English base's configuration: the UNet layout knob (``--attention-levels``) and the
defaults, which are the recipe of the shipped base."""

import pytest

from iap_rt.train.toy.base_model import BaseConfig, attention_blocks, unet_config


def test_three_levels_is_the_default_layout_and_four_adds_16x16():
    assert attention_blocks(3)["down_block_types"] == BaseConfig().down_block_types
    cfg = unet_config(BaseConfig(**attention_blocks(4)))
    # levels 32 -> 16 -> 8 -> 4 -> 2: only the 32x32 level is left without attention
    assert cfg["down_block_types"][0] == "DownBlock2D"
    assert set(cfg["down_block_types"][1:]) == {"CrossAttnDownBlock2D"}
    assert cfg["up_block_types"][-1] == "UpBlock2D"  # the up path mirrors the down path
    assert set(cfg["up_block_types"][:-1]) == {"CrossAttnUpBlock2D"}


@pytest.mark.parametrize("bad", [0, 6])
def test_levels_outside_the_unet_are_refused(bad):
    with pytest.raises(ValueError, match="1..5"):
        attention_blocks(bad)


def test_cli_names_the_allowed_range(run_cli, tmp_path):
    r = run_cli("toy", "base", "--data", str(tmp_path), "--out", str(tmp_path / "b"),
                "--attention-levels", "6")  # fmt: skip
    assert r.code != 0 and "--attention-levels" in r.err and "1<=x<=5" in r.err
    assert not (tmp_path / "b").exists()


def test_the_defaults_are_the_recipe_of_the_shipped_base(run_cli):
    """`iap-rt toy base` with its defaults trains what iap_rt/data/toy_base was trained with."""
    import dataclasses
    import json

    from iap_rt.train.toy.base_model import shipped_base_dir
    from iap_rt.train.toy.cli import base_cmd, data_cmd

    base = shipped_base_dir()
    record = json.loads((base / "toy_base.json").read_text("utf-8"))
    defaults = {p.name: p.default for p in base_cmd.params}
    aux = {"extra": {"text_aux_weight": defaults["text_aux"]}}  # as base_cmd builds it
    cfg = BaseConfig(seed=defaults["seed"], threads=defaults["threads"], **aux)
    assert json.loads(json.dumps(dataclasses.asdict(cfg))) == record["config"]
    assert record["train_cpu_minutes"] == pytest.approx(defaults["minutes"], abs=0.1)
    data = {p.name: p.default for p in data_cmd.params}  # made by `iap-rt toy data` defaults
    # the data's world is named "toy2", version 2, in every meta.json and base record: the
    # one- and two-object world that was `iap-rt toy2` before it became the only one
    assert record["data"] == {"world": "toy2", "version": 2, "seed": data["seed"],
                              "split_seed": data["split_seed"], "n_train": data["n"]}  # fmt: skip
    unet = json.loads((base / "unet" / "config.json").read_text("utf-8"))
    assert unet["down_block_types"] == list(cfg.down_block_types)
    assert "--attention-levels" in run_cli("toy", "base", "--help").out
