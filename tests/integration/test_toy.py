"""The toy world's code paths at tiny size: base, grid cells (train, export, evaluate), results,
resumption, learning-curve checkpoints and the plot."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from iap_rt.errors import InputError

torch = pytest.importorskip("torch")

TINY_EVAL = {"seeds_per_combo": 1, "steps": 2, "guidance": 3.0, "scheduler": "ddim",
             "max_combos": 1}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from iap_rt.train.toy.base import train_base
    from iap_rt.train.toy.base_model import BaseConfig
    from iap_rt.train.toy.data import write_dataset

    root = tmp_path_factory.mktemp("toy")
    write_dataset(root / "data", n=200, seed=0, n_test=8)
    cfg = BaseConfig(block_out_channels=(8, 16, 16, 16, 16), text_width=16, text_layers=1,
                      text_heads=2, batch_size=4, log_every=1)  # fmt: skip
    base = train_base(root / "data", root / "base", minutes=5, max_steps=2, cfg=cfg, progress=str)
    return root, base


def test_base_reads_two_object_captions_and_samples(world):
    from iap_rt.train.toy.base_model import load_tokenizer
    from iap_rt.train.toy.evaluate import diffusers_generator, evaluate, select_combos

    _, base = world
    tok = load_tokenizer(base / "tokenizer")
    text = "to the left of a violet box there is a round dot in scarlet"
    assert len(tok(text).input_ids) == 2 + len(text.split())  # one token per word
    gen = diffusers_generator(base, steps=2, batch=8)
    res, images, items, preds = evaluate(gen, "en", select_combos("heldout", limit=2), 1)
    assert images.shape == (4, 32, 32, 3) and len(preds) == 4
    assert res["n_two"] == 2 and res["n_one"] == 2
    assert set(res) >= {"colour", "shape", "relation", "binding", "one_all"}


def test_base_dir_is_a_diffusers_pipeline_and_sampling_is_seeded(world):
    """What `iap-rt train --base` / `iap-rt export --base` load: a StableDiffusionPipeline
    directory with DDIM, a near-lossless pixel VAE (scale factor 1) and the training record."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from iap_rt.train.toy.evaluate import diffusers_generator

    _, base = world
    pipe = StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True)
    assert pipe.unet.config.in_channels == 3 and pipe.vae_scale_factor == 1
    assert isinstance(pipe.scheduler, DDIMScheduler)
    vae = AutoencoderKL.from_pretrained(str(base / "vae"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.sample()).sample
    assert float((rec - x).abs().max()) < 2e-3  # the fixed pixel "VAE" is near lossless
    record = json.loads((base / "toy_base.json").read_text())
    assert record["steps"] == 2 and record["samples_seen"] == 8
    assert record["data"]["world"] == "toy2" and record["data"]["n_train"] == 200
    gen = diffusers_generator(base, steps=2, batch=4)
    prompts, seeds = ["a red circle left of a blue square", "a green cross at the top"], [3, 4]
    assert np.array_equal(gen(prompts, seeds), gen(prompts, seeds))  # seeded


def test_grid_cells_results_and_resume(world, tmp_path):
    from iap_rt.train.toy import curves, transfer
    from iap_rt.train.toy.report import aggregate

    root, base = world
    work = tmp_path / "work"
    common, spp = transfer.prepare(root / "data", base, work, (0,), 4, TINY_EVAL, 0, str,
                                   calib_lengths=(1, 3))  # fmt: skip
    assert set(spp) == {*transfer.OBJECTIVES, "embed_pos"} and all(v > 0 for v in spp.values())
    specs = transfer.grid_specs(common, spp, (0,), ("1pct",), budget_s=0.5)
    assert [s["objective"] for s in specs] == ["untrained", *transfer.OBJECTIVES, "denoise"]
    long = specs[-1]
    assert long["fraction"] == "100pct" and long["budget_cpu_s"] == 2.5
    chosen = [specs[0], specs[1], specs[3], long]  # untrained, pivot, embed, long denoise
    long["steps"], long["checkpoints"] = 5, 2  # periodic at 2 and 4, and the last step
    rows = [transfer.run_cell(s) for s in chosen]
    assert rows[1]["steps"] >= 1 and rows[1]["train_cpu_s"] > 0 and rows[1]["samples_seen"] > 0
    record = aggregate(work, tmp_path / "results", {
        "base": str(base), "budget_cpu_s": 0.5, "seeds": [0], "s_per_step_cpu": spp,
        "long": {"factor": 5}, "eval": TINY_EVAL,
    })  # fmt: skip
    saved = json.loads((tmp_path / "results" / "toy_transfer.json").read_text())
    assert saved == json.loads(json.dumps(record))
    got = {(r["objective"], r["fraction"], r["seed"]) for r in saved["results"]}
    assert got == {("english", 1.0, 0), ("untrained", 0.0, 0), ("pivot", 0.01, 0),
                   ("embed", 0.01, 0), ("denoise", 1.0, 0)}  # fmt: skip
    assert all("binding" in r for r in saved["results"])
    assert "| **" in (tmp_path / "results" / "toy_transfer.md").read_text()
    # the curves' step 0 is the grid's untrained cell, evaluated when the grid has not run
    untrained = work / "cells" / "s0_untrained.json"
    first = json.loads(untrained.read_text())
    untrained.unlink()
    assert curves.untrained_cell(common, 0) == first and untrained.is_file()
    # an interrupted cell (result file lost after training) is not trained again
    cell = work / "cells" / "1pct_s0_pivot.json"
    before = json.loads(cell.read_text())
    cell.unlink()
    again = transfer.run_cell(chosen[1])
    assert again["train_cpu_s"] == before["train_cpu_s"] and again["binding"] == before["binding"]
    # the long run kept its checkpoints: every one becomes a curve point
    spec = long | {"name": "100pct_s0_denoise", "s_per_step": spp["denoise"],
                   "run_dir": str(work / "runs" / "100pct_s0_denoise")}  # fmt: skip
    points = curves.curve_points(spec)
    assert [p["step"] for p in points] == [2, 4, 5]  # none rotated out by the last save
    assert points[-1]["binding"] == rows[-1]["binding"]  # the last checkpoint = the final model
    png = curves.plot(
        {
            "english_binding": 0.5,
            "curves": [{"objective": "denoise", "fraction": "100pct", "points": points}],
        },
        tmp_path / "c.png",
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert np.isfinite([p["cpu_s"] for p in points]).all()
    # plug-in: a restyled UNet fine-tuned alone, the pivot encoder reused without retraining
    from safetensors.torch import load_file

    from iap_rt.train.toy.data import write_dataset
    from iap_rt.train.toy.finetune import finetune_unet, plugin_eval

    write_dataset(tmp_path / "outline", n=16, n_test=2, style="outline")
    ft = finetune_unet(base, tmp_path / "outline", tmp_path / "ft", minutes=0.02, batch_size=2)
    new = load_file(str(ft / "unet" / "diffusion_pytorch_model.safetensors"))
    old = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(new[k], old[k]) for k in old)
    for sub in ("text_encoder", "vae", "tokenizer"):
        assert sorted(p.name for p in (ft / sub).iterdir()) == sorted(
            p.name for p in (base / sub).iterdir())  # fmt: skip
    rec = plugin_eval(ft, work, tmp_path / "plugin.json", fraction="1pct", seeds=(0,),
                      objectives=("pivot",), ev=TINY_EVAL)  # fmt: skip
    assert [r["objective"] for r in rec["results"]] == ["english", "pivot"]
    assert {"binding", "agreement", "dark"} <= set(rec["results"][1])
    assert json.loads((ft / "toy_finetune.json").read_text())["ema_decay"] > 0
    # the curves' long runs as the source: the same UNet, compared with their last curve point
    shutil.copytree(work / "runs" / "100pct_s0_denoise", work / "curve_runs" / "100pct_s0_denoise")
    rec = plugin_eval(ft, work, tmp_path / "plugin_c.json", fraction="100pct", seeds=(0,),
                      objectives=("denoise",), ev=TINY_EVAL, source="curves")  # fmt: skip
    assert rec["source"] == "curves" and rec["results"][0] == dict(
        {"objective": "english", "seed": 0},
        **json.loads((work / "plugin/english.json").read_text()),
    )
    assert rec["results"][1]["binding_on_base"] == points[-1]["binding"]
    # another fine-tune must not reuse this one's cached English reference and cells
    ft2 = finetune_unet(base, tmp_path / "outline", tmp_path / "ft2", minutes=0.01, batch_size=2)
    with pytest.raises(InputError, match="another fine-tuned UNet"):
        plugin_eval(ft2, work, tmp_path / "p2.json", fraction="1pct", seeds=(0,),
                    objectives=("pivot",), ev=TINY_EVAL)  # fmt: skip


def test_finetune_resumes_from_its_checkpoint_and_refuses_other_settings(world, tmp_path):
    """A killed fine-tune continues from out/checkpoint (steps and CPU time count across the
    resume) and ends with the same files as one uninterrupted; other settings are refused."""
    from iap_rt.train.toy.data import write_dataset
    from iap_rt.train.toy.finetune import finetune_unet

    _, base = world
    write_dataset(tmp_path / "outline", n=16, n_test=2, style="outline")

    class Killed(Exception):
        pass

    def kill_at_10(msg):
        if msg.startswith("finetune step 10 "):
            raise Killed(msg)

    kw = {"minutes": 30, "batch_size": 2, "checkpoint_minutes": 0.0, "max_steps": 12,
          "log_every": 5}  # fmt: skip
    with pytest.raises(Killed):
        finetune_unet(base, tmp_path / "outline", tmp_path / "ft", progress=kill_at_10, **kw)
    state = json.loads((tmp_path / "ft/checkpoint/state.json").read_text())
    assert state["step"] == 10 and state["seconds"] > 0
    assert not (tmp_path / "ft/toy_finetune.json").exists()  # not finished, nothing written
    # a kill between the weights file and its state.json copy: the weights' own state counts
    (tmp_path / "ft/checkpoint/state.json").write_text(json.dumps(state | {"step": 3}))
    logs: list[str] = []
    ft = finetune_unet(base, tmp_path / "outline", tmp_path / "ft", progress=logs.append, **kw)
    assert logs[0].startswith("resumed at step 10 ")
    assert not any(m.startswith("finetune step 10 ") for m in logs)  # no step trained twice
    record = json.loads((ft / "toy_finetune.json").read_text())
    assert record["steps"] == 12 and record["train_cpu_s"] >= state["seconds"]
    pipeline = [p.name for p in base.iterdir() if p.name != "checkpoint"]
    assert sorted(p.name for p in ft.iterdir()) == sorted(
        [*pipeline, "checkpoint", "toy_finetune.json"]
    )
    with pytest.raises(InputError, match=r"other settings \(lr: 0.0002 there, 0.001 now\)"):
        finetune_unet(base, tmp_path / "outline", tmp_path / "ft", lr=1e-3, progress=str, **kw)


def test_base_with_the_auxiliary_scene_loss_learns_it_and_resumes(world, tmp_path):
    """--text-aux: the head trains (its loss falls), lives in the checkpoint only, resumes."""
    from safetensors import safe_open

    from iap_rt.train.toy.base import train_base
    from iap_rt.train.toy.base_model import BaseConfig

    root, _ = world
    cfg = BaseConfig(block_out_channels=(8, 16, 16, 16, 16), text_width=16, text_layers=1,
                      text_heads=2, batch_size=16, log_every=1, lr=3e-3, warmup_steps=1,
                      extra={"text_aux_weight": 1.0})  # fmt: skip
    logs: list[str] = []
    out = train_base(root / "data", tmp_path / "b", minutes=5, max_steps=30, cfg=cfg,
                     progress=logs.append)  # fmt: skip
    aux = [float(m.split(" aux ")[1].split()[0]) for m in logs if " aux " in m]
    # a running mean (0.98) starting at the first step's loss: 30 steps move it ~0.2 down
    assert len(aux) == 30 and aux[-1] < aux[0] - 0.1
    with safe_open(str(out / "checkpoint" / "checkpoint.safetensors"), "pt") as f:
        assert any(k.startswith("aux.") for k in f.keys())
    with safe_open(str(out / "text_encoder" / "model.safetensors"), "pt") as f:
        assert not any("aux" in k for k in f.keys())
    record = json.loads((out / "toy_base.json").read_text())
    assert record["config"]["extra"] == {"text_aux_weight": 1.0}
    logs.clear()
    train_base(root / "data", tmp_path / "b", minutes=5, max_steps=32, cfg=cfg,
               progress=logs.append)  # fmt: skip
    assert any("resumed at step 30" in m for m in logs)
    assert json.loads((out / "toy_base.json").read_text())["steps"] == 32


def test_claim_runs_record_and_resume(world, tmp_path):
    from iap_rt.train.toy import claim

    root, base = world
    work, results = tmp_path / "work", tmp_path / "results"
    rec = claim.run_claim(root / "data", base, work, results, seeds=(0, 1), long_seeds=(0,),
                          budget_s=0.3, batch=4, jobs=0, ev=TINY_EVAL, log=str,
                          calib_lengths=(1, 3))  # fmt: skip
    saved = json.loads((results / "toy_claim.json").read_text())
    assert saved == json.loads(json.dumps(rec))
    runs = {(r["objective"], r["fraction"], r["seed"], r["budget_cpu_s"]) for r in rec["results"]}
    assert runs == {("pivot", 0.1, 0, 0.3), ("pivot", 0.1, 1, 0.3), ("denoise", 1.0, 0, 0.3),
                    ("denoise", 1.0, 1, 0.3), ("denoise", 1.0, 0, 1.5)}  # fmt: skip
    for r in rec["results"]:
        assert {"binding", "objects", "relation", "samples_seen"} <= set(r)
        assert r["samples_seen"] == r["steps"] * 4
    assert 0.0 <= rec["english_binding"] <= 1.0
    v = rec["verdict"]
    assert v["equal_cpu_holds"] == (v["pivot_10pct_binding"] >= v["denoise_100pct_binding"])
    assert "denoise_100pct_x5_binding" in v
    # the 5x run trains ~5x the steps of the same seed at 1x
    steps = {(r["objective"], r["seed"], r["budget_cpu_s"]): r["steps"] for r in rec["results"]}
    assert steps[("denoise", 0, 1.5)] >= 4 * steps[("denoise", 0, 0.3)]
    # a second call finds every run finished and trains nothing
    mtimes = {f: f.stat().st_mtime_ns for f in (work / "cells").glob("*.json")}
    claim.run_claim(root / "data", base, work, results, seeds=(0, 1), long_seeds=(0,),
                    budget_s=0.3, batch=4, jobs=0, ev=TINY_EVAL, log=str)  # fmt: skip
    assert {f: f.stat().st_mtime_ns for f in (work / "cells").glob("*.json")} == mtimes
