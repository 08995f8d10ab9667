"""`iap-rt export` on the tiny models: real dynamo exports, real ONNX Runtime runs.

``tiny_model_dir`` (fp32, conftest) and ``fp16_model_dir`` (below) are exported once per
session; tests that change a model directory work on a copy (``scratch``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iap_rt.errors import ArtifactNotFoundError, ConfigError, ExportValidationError, OutputError
from iap_rt.export import networks as export_networks
from iap_rt.export.exporter import ort_session
from iap_rt.export.graph import find_attentions
from iap_rt.export.stage import export_model_dir
from iap_rt.fileio import sha256_file
from iap_rt.modeldir import ModelDir
from iap_rt.specs import NETWORKS

# fp16 model vs fp32 model through the whole runtime (10 steps + VAE, same seed): the fp16 text
# encoder and UNet round every layer and the loop accumulates it. Measured on the tiny models:
# final latents differ by 0.022-0.026 at a latent scale of ~25 (1e-3 relative) with ddim, euler
# and dpm++, images by 1 uint8 level. The bounds leave 5x / 4x room.
FP16_LOOP_LATENT_RTOL = 5e-3  # of max |fp32 latents|
FP16_LOOP_PIXEL_TOL = 4

MHA_CHAIN = ("MatMul", "Mul", "Softmax", "MatMul")
MASKED_MHA_CHAIN = ("MatMul", "Mul", "Add", "Softmax", "MatMul")


@pytest.fixture(scope="session")
def fp16_model_dir(tiny_sd_dir, tiny_encoder_dir, tmp_path_factory):
    """The tiny base + encoder exported with --fp16. Read-only!"""
    return export_model_dir(
        tiny_sd_dir,
        tiny_encoder_dir,
        tmp_path_factory.mktemp("tiny") / "model-fp16",
        model_id="tiny-fp16",
        fp16=True,
    )


@pytest.fixture
def scratch(tiny_model_dir, tmp_path):
    """A writable copy of the fp32 tiny model directory (with a fake engine to carry over)."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    (dst / "engines" / "gpu-x").mkdir(parents=True)
    (dst / "engines" / "gpu-x" / "unet.plan").write_bytes(b"engine bytes")
    return dst


def snapshot(path: Path) -> dict:
    """Every file under ``path``: relative name -> (inode, size, mtime, sha256)."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            out[str(f.relative_to(path))] = (st.st_ino, st.st_size, st.st_mtime_ns, sha256_file(f))
    return out


def leftovers(path: Path) -> list[str]:
    """Staging / backup directories an export left beside ``path`` (its lock file stays)."""
    return [
        p.name
        for p in path.parent.iterdir()
        if p.name.startswith(f".{path.name}.") and p.name != f".{path.name}.lock"
    ]


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text("utf-8"))


def io_types(path: Path) -> dict[str, tuple]:
    sess = ort_session(path)
    return {t.name: (t.type, tuple(t.shape)) for t in [*sess.get_inputs(), *sess.get_outputs()]}


def n_diffusers_attentions(module) -> int:
    from diffusers.models.attention_processor import Attention

    return sum(isinstance(m, Attention) for m in module.modules())


# ---- the fp32 export ----------------------------------------------------------------------------


def test_fp32_model_dir_is_complete_and_recorded(tiny_model_dir, tiny_sd_dir):
    md = ModelDir.open(tiny_model_dir)
    m = md.manifest
    assert set(m["networks"]) == set(NETWORKS)
    for name, info in m["networks"].items():
        path = tiny_model_dir / info["file"]
        assert info["precision"] == "fp32" and info["opset"] == 18
        assert info["sha256"] == sha256_file(path) and info["bytes"] == path.stat().st_size
        assert "external_data" not in info  # tiny: one file
        cases = {r["case"] for r in info["validation"]}
        assert len(cases) == 2, f"{name} validated at {cases}"
        for row in info["validation"]:
            assert row["max_abs_diff"] <= row["tolerance"] <= 1e-3
        assert info["attention"]["problems"] == []
    cfg = m["export_config"]
    assert cfg["base"] == str(Path(tiny_sd_dir).absolute())
    assert cfg["opset"] == 18 and cfg["fp16"] is False and cfg["networks"] == list(NETWORKS)
    assert m["tool_versions"]["torch"] and m["tool_versions"]["onnx"]
    assert (tiny_model_dir / "scheduler.json").is_file()


def test_fp32_io_follows_the_shape_contract(tiny_model_dir):
    types = io_types(tiny_model_dir / "unet.onnx")
    assert types == {
        "sample": ("tensor(float)", ("N", 4, "h", "w")),
        "timestep": ("tensor(float)", ("N",)),
        "encoder_hidden_states": ("tensor(float)", ("N", 32, 32)),
        "noise_pred": ("tensor(float)", ("N", 4, "h", "w")),
    }
    types = io_types(tiny_model_dir / "vae_decoder.onnx")
    assert types["latent_sample"] == ("tensor(float)", ("B", 4, "h", "w"))
    assert types["image"] == ("tensor(float)", ("B", 3, "H", "W"))
    types = io_types(tiny_model_dir / "text_encoder.onnx")
    assert types["input_ids"] == ("tensor(int64)", ("N", 32))
    assert types["text_embeddings"] == ("tensor(float)", ("N", 32, 32))


def test_fp32_unet_matches_pytorch_at_a_shape_it_was_not_validated_at(tiny_model_dir, tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((3, 4, 24, 16)).astype(np.float32)
    t = np.array([1.0, 500.5, 999.0], np.float32)  # fractional (Euler) timestep too
    ctx = rng.standard_normal((3, 32, 32)).astype(np.float32)
    got = ort_session(tiny_model_dir / "unet.onnx").run(
        None, {"sample": sample, "timestep": t, "encoder_hidden_states": ctx}
    )[0]
    with torch.no_grad():
        want = unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    assert np.abs(got - want.numpy()).max() < 1e-4


# ---- attention in the fusable form --------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_attention_is_matmul_scale_softmax_matmul(
    precision, tiny_model_dir, fp16_model_dir, tiny_sd_dir
):
    import onnx
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model_dir = tiny_model_dir if precision == "fp32" else fp16_model_dir
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae")
    expected = {  # every attention of the source model appears once in the graph
        "text_encoder": (2, MASKED_MHA_CHAIN),  # 2 BERT layers, with the padding mask
        "unet": (n_diffusers_attentions(unet), MHA_CHAIN),
        "vae_decoder": (n_diffusers_attentions(vae.decoder), MHA_CHAIN),
    }
    assert expected["unet"][0] == 8 and expected["vae_decoder"][0] == 1
    for name, (count, chain) in expected.items():
        graph = onnx.load(model_dir / f"{name}.onnx").graph
        matches = find_attentions(graph, allow_mask=name == "text_encoder")
        assert len(matches) == count, name
        for m in matches:
            assert m.fusable, f"{name}/{m.softmax}: {m.problem}"
            assert m.chain == chain, f"{name}/{m.softmax}: {m.chain}"
        assert not any(n.domain not in ("", "ai.onnx") for n in graph.node)  # no com.microsoft
        summary = manifest(model_dir)["networks"][name]["attention"]
        assert summary == {"total": count, "fusable": count, "problems": []}


def _export_one_attention(processor, path: Path, dtype=torch.float32):
    """A single SD 1.5-sized cross-attention (8 heads of 40) through the dynamo exporter."""
    import onnx
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(320, cross_attention_dim=768, heads=8, dim_head=40).eval().to(dtype)
    attn.set_processor(processor)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x, ctx):
            return self.attn(x, ctx)

    x, ctx = torch.randn(2, 64, 320, dtype=dtype), torch.randn(2, 77, 768, dtype=dtype)
    dyn = torch.export.Dim.DYNAMIC  # batch and image tokens dynamic, as in the UNet export
    with torch.no_grad():
        out = Wrap().eval()(x, ctx)
        torch.onnx.export(
            Wrap().eval(), (x, ctx), str(path), dynamo=True, opset_version=18,
            dynamic_shapes={"x": {0: dyn, 1: dyn}, "ctx": {0: dyn}},
        )  # fmt: skip
    return onnx.load(str(path)), out


def test_default_attnprocessor_is_not_fusable_and_ours_is(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from iap_rt.export.attention import FusableAttnProcessor

    baddbmm, _ = _export_one_attention(AttnProcessor(), tmp_path / "a.onnx")
    (m,) = find_attentions(baddbmm.graph)
    assert not m.fusable and "Add" in m.problem  # baddbmm's + 0*empty
    ours, out = _export_one_attention(FusableAttnProcessor(), tmp_path / "b.onnx")
    (m,) = find_attentions(ours.graph)
    assert m.fusable and m.chain == MHA_CHAIN
    _, sdpa_out = _export_one_attention(AttnProcessor2_0(), tmp_path / "c.onnx")
    assert torch.allclose(out, sdpa_out, atol=1e-6)  # same numbers as diffusers' default


def test_fusable_attention_computes_what_diffusers_computes(tiny_sd_dir):
    """Self- and cross-attention (UNet) and the VAE's group-norm + residual attention on 4D
    input: the rewrite must not change a number (the export is validated against the
    untouched module too)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from iap_rt.export.attention import make_attention_fusable

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae").eval()
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 32, 32, generator=g)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        want = unet(sample, t, ctx).sample, vae.decode(sample).sample
        assert make_attention_fusable(unet) == 8 and make_attention_fusable(vae) == 2
        got = unet(sample, t, ctx).sample, vae.decode(sample).sample
    for w, o in zip(want, got):
        assert torch.allclose(o, w, atol=1e-5), float((o - w).abs().max())


def _trt_rtx_fused_softmaxes(onnx_path: Path) -> tuple[set[str], set[str]]:
    """Build a TensorRT-RTX engine (no GPU needed); return (all Softmax nodes, those inside a
    fused ``_gemm_mha`` kernel), from the builder's detailed layer dump."""
    trt = pytest.importorskip("tensorrt_rtx")
    from iap_rt.engines.build import fused_softmaxes

    def shape(name, dims):  # batch 2, every other dynamic axis 64
        return [2 if i == 0 else 64 if d == -1 else d for i, d in enumerate(dims)]

    report = fused_softmaxes(trt, onnx_path, shape)
    assert report.engine_bytes
    return set(report.softmax), set(report.fused)


def test_tensorrt_rtx_fuses_the_exported_attention(tmp_path, fp16_model_dir, tiny_model_dir):
    """The real check behind the graph walk: TensorRT-RTX builds a fused MHA kernel from our
    pattern. The kernel is fp16-only and needs head sizes like SD's (24-160); the tiny UNet's 4-
    and 8-wide heads are too small, so the text encoder's 24-wide heads and one SD 1.5-sized
    cross-attention stand in, and fp32 shows the kernel's precision limit."""
    from iap_rt.export.attention import FusableAttnProcessor

    softmax, fused = _trt_rtx_fused_softmaxes(fp16_model_dir / "text_encoder.onnx")
    assert len(softmax) == 2 and fused == softmax
    _export_one_attention(FusableAttnProcessor(), tmp_path / "ours.onnx", torch.float16)
    softmax, fused = _trt_rtx_fused_softmaxes(tmp_path / "ours.onnx")
    assert len(softmax) == 1 and fused == softmax
    softmax, fused = _trt_rtx_fused_softmaxes(tiny_model_dir / "text_encoder.onnx")
    assert len(softmax) == 2 and not fused  # fp32: no fused MHA kernel


# ---- fp16 ---------------------------------------------------------------------------------------


def test_fp16_precision_lives_in_the_graph(fp16_model_dir, tiny_model_dir):
    md = ModelDir.open(fp16_model_dir)
    assert {n: md.precision(n) for n in NETWORKS} == {
        "text_encoder": "fp16",
        "unet": "fp16",
        "vae_decoder": "fp32",  # SD VAEs overflow in fp16: only --fp16-vae makes it fp16
        "vae_encoder": "fp32",  # (the same rule)
    }
    unet = io_types(fp16_model_dir / "unet.onnx")
    assert unet["sample"][0] == "tensor(float16)"
    assert unet["encoder_hidden_states"][0] == "tensor(float16)"
    assert unet["timestep"][0] == "tensor(float)"  # float32 in every precision
    assert unet["noise_pred"][0] == "tensor(float16)"
    text = io_types(fp16_model_dir / "text_encoder.onnx")
    assert text["input_ids"][0] == "tensor(int64)"
    assert text["text_embeddings"][0] == "tensor(float16)"
    assert io_types(fp16_model_dir / "vae_decoder.onnx")["latent_sample"][0] == "tensor(float)"
    fp32 = manifest(tiny_model_dir)["networks"]
    for name in ("text_encoder", "unet"):
        info = md.manifest["networks"][name]
        assert info["bytes"] < 0.6 * fp32[name]["bytes"]  # half-size weights
        for row in info["validation"]:  # against the fp32 PyTorch module: real fp16 rounding
            assert row["reference"] == "torch fp32"
            assert 1e-5 < row["max_abs_diff"] <= row["tolerance"]


def test_fp16_model_generates_close_to_fp32(fp16_model_dir, tiny_model_dir):
    """The runtime on the fp16 export against the runtime on the fp32 export (which the
    foundation parity test pins to a PyTorch loop). Tolerances: see FP16_LOOP_*."""
    from iap_rt.backends.ort import OrtBackend
    from iap_rt.pipeline import Pipeline

    args = dict(steps=10, guidance=7.5, seed=5, height=64, width=64, scheduler="ddim")
    results = {}
    for name, path in (("fp32", tiny_model_dir), ("fp16", fp16_model_dir)):
        pipe = Pipeline(ModelDir.open(path), OrtBackend("cpu", threads=1), progress=False)
        results[name] = pipe("左边有一个红色的圆", "模糊", **args)
    latent_diff = np.abs(results["fp16"].latents - results["fp32"].latents).max()
    assert 0 < latent_diff <= FP16_LOOP_LATENT_RTOL * np.abs(results["fp32"].latents).max()
    pixel_diff = np.abs(
        results["fp16"].images.astype(int) - results["fp32"].images.astype(int)
    ).max()
    assert pixel_diff <= FP16_LOOP_PIXEL_TOL


def test_generate_cli_runs_on_the_fp16_export(fp16_model_dir, tmp_path, capsys):
    from PIL import Image

    from iap_rt.cli import main

    out = tmp_path / "img.png"
    main(["generate", "山水画", "--model", str(fp16_model_dir), "--steps", "2", "--height", "64",
          "--width", "64", "--out", str(out), "--backend", "ort", "--no-progress"])  # fmt: skip
    assert Image.open(out).size == (64, 64)


# ---- incremental and atomic ---------------------------------------------------------------------


def test_rerun_with_the_same_inputs_changes_nothing(scratch, tiny_sd_dir, tiny_encoder_dir):
    before = snapshot(scratch)
    lines = []
    export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, model_id="tiny", echo=lines.append)
    assert sum("unchanged since the last export, kept" in ln for ln in lines) == len(NETWORKS), (
        lines
    )
    assert snapshot(scratch) == before


def test_a_model_made_before_the_vae_encoder_gets_it_without_re_exporting_the_rest(
    scratch, tiny_sd_dir, tiny_encoder_dir
):
    """Image editing needs the VAE encoder: a directory made before it existed is told the
    command that adds it, and that command exports it alone (the rest kept, hard-linked)."""
    from iap_rt.errors import ArtifactNotFoundError
    from iap_rt.pipeline import Pipeline

    m = json.loads((scratch / "manifest.json").read_text())
    del m["networks"]["vae_encoder"]
    (scratch / "vae_encoder.onnx").unlink()
    (scratch / "manifest.json").write_text(json.dumps(m))
    pipe = Pipeline.from_dir(scratch, backend="ort", progress=False)
    with pytest.raises(ArtifactNotFoundError) as e:
        pipe.runner("vae_encoder")
    assert "--networks vae_encoder" in e.value.fix
    kept = {k: v for k, v in snapshot(scratch).items() if k.endswith(".onnx")}
    lines = []
    export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, model_id="tiny",
                     networks=("vae_encoder",), echo=lines.append)  # fmt: skip
    after = snapshot(scratch)
    assert {k: after[k] for k in kept} == kept  # the other networks: the very same files
    md = ModelDir.open(scratch)
    assert md.has("vae_encoder") and md.networks == tuple(NETWORKS)
    assert any(ln.startswith("vae_encoder: ") for ln in lines)
    out = (
        Pipeline(md, pipe.backend, progress=False)
        .runner("vae_encoder")
        .run({"sample": np.zeros((1, 3, 64, 64), np.float32)})
    )
    assert out["latent_mean"].shape == (1, 4, 8, 8)


def test_a_second_export_into_the_same_dir_is_refused_and_leftovers_go(
    scratch, tiny_sd_dir, tiny_encoder_dir
):
    from iap_rt.errors import OutputError
    from iap_rt.fileio import exclusive_lock

    before = snapshot(scratch)
    with exclusive_lock(scratch, what="test writer"):  # another export holds the directory
        with pytest.raises(OutputError, match="is writing"):
            export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, force=True)
    assert snapshot(scratch) == before
    (scratch.parent / f".{scratch.name}.x7q2z1ab" / "unet.onnx").parent.mkdir()  # a killed run's
    export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, model_id="tiny")
    assert leftovers(scratch) == []


def test_fp16_vae_reexports_only_the_vae(scratch, tiny_sd_dir, tiny_encoder_dir):
    before, mode = snapshot(scratch), scratch.stat().st_mode
    lines = []
    export_model_dir(
        tiny_sd_dir, tiny_encoder_dir, scratch, model_id="tiny", fp16_vae=True,
        echo=lines.append,
    )  # fmt: skip
    assert any(ln.startswith("vae_decoder: exporting fp16") for ln in lines), lines
    assert not any(ln.startswith(("unet: exporting", "text_encoder: exporting")) for ln in lines)
    after = snapshot(scratch)
    for kept in ("unet.onnx", "text_encoder.onnx", "engines/gpu-x/unet.plan"):
        assert after[kept] == before[kept], kept  # same inode: linked, not rewritten
    assert after["vae_decoder.onnx"][3] != before["vae_decoder.onnx"][3]
    md = ModelDir.open(scratch)
    assert md.precision("vae_decoder") == "fp16" and md.precision("unet") == "fp32"
    assert io_types(scratch / "vae_decoder.onnx")["latent_sample"][0] == "tensor(float16)"
    assert scratch.stat().st_mode == mode  # not mkdtemp's 0700
    assert leftovers(scratch) == []


def test_changed_encoder_weights_reexport_the_text_encoder_only(
    scratch, tiny_sd_dir, tiny_encoder_dir, tmp_path
):
    from safetensors.numpy import load_file, save_file

    enc = tmp_path / "encoder-v2"
    shutil.copytree(tiny_encoder_dir, enc)
    proj = load_file(str(enc / "projection.safetensors"))
    proj["bias"] = proj["bias"] + np.float32(0.5)
    save_file(proj, str(enc / "projection.safetensors"))
    before = manifest(scratch)["networks"]
    lines = []
    export_model_dir(tiny_sd_dir, enc, scratch, model_id="tiny", echo=lines.append)
    exported = [ln.split(":")[0] for ln in lines if ": exporting" in ln]
    assert exported == ["text_encoder"], lines  # another path, same unet/vae bytes: kept
    after = manifest(scratch)["networks"]
    assert after["text_encoder"]["sha256"] != before["text_encoder"]["sha256"]
    assert after["unet"] == before["unet"] and after["vae_decoder"] == before["vae_decoder"]
    ModelDir.open(scratch)


def test_force_reexports_the_selected_networks(scratch, tiny_sd_dir, tiny_encoder_dir):
    before = snapshot(scratch)
    lines = []
    export_model_dir(
        tiny_sd_dir, tiny_encoder_dir, scratch, model_id="tiny",
        networks=["text_encoder"], force=True, echo=lines.append,
    )  # fmt: skip
    assert [ln.split(":")[0] for ln in lines if ": exporting" in ln] == ["text_encoder"]
    after = snapshot(scratch)
    assert after["text_encoder.onnx"][0] != before["text_encoder.onnx"][0]  # a new file
    assert after["unet.onnx"] == before["unet.onnx"]
    ModelDir.open(scratch)


# ---- failures leave the previous model directory untouched --------------------------------------


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
    ids=["disk-full", "interrupted"],
)
def test_failed_write_leaves_the_previous_dir_untouched(
    failure, scratch, tiny_sd_dir, tiny_encoder_dir, monkeypatch
):
    import onnx

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(onnx, "save", fail)  # the ONNX write, after a real export
    before = snapshot(scratch)
    expected = OutputError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as e:
        export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, networks=["text_encoder"],
                         force=True)  # fmt: skip
    if expected is OutputError:
        assert "no space left on device" in str(e.value).lower()
        assert "the previous model directory is untouched" in str(e.value)
    assert snapshot(scratch) == before
    assert leftovers(scratch) == []
    ModelDir.open(scratch)


def test_validation_mismatches_are_collected_into_one_error(
    scratch, tiny_sd_dir, tiny_encoder_dir, monkeypatch
):
    impossible = {"fp32": -1.0, "fp16": -1.0}
    for name in ("text_encoder", "vae_decoder"):
        cfg = export_networks.EXPORT_CONFIGS[name]
        monkeypatch.setitem(
            export_networks.EXPORT_CONFIGS, name, dataclasses.replace(cfg, atol=impossible)
        )
    before = snapshot(scratch)
    with pytest.raises(ExportValidationError) as e:
        export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch,
                         networks=["text_encoder", "vae_decoder"], force=True)  # fmt: skip
    rows = e.value.mismatches
    assert {r["network"] for r in rows} == {"text_encoder", "vae_decoder"}
    assert len(rows) == 4  # 2 networks x 2 cases
    assert "4 exported output(s) disagree" in str(e.value)
    assert "text_encoder.text_embeddings @ N=2" in str(e.value)
    assert snapshot(scratch) == before and leftovers(scratch) == []


# ---- bad input ----------------------------------------------------------------------------------


def test_base_that_is_not_a_diffusers_dir(scratch, tiny_encoder_dir, tmp_path):
    base = tmp_path / "not-sd"
    (base / "unet").mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"x")
    before = snapshot(scratch)
    with pytest.raises(ArtifactNotFoundError) as e:
        export_model_dir(base, tiny_encoder_dir, scratch)
    msg = str(e.value)
    assert "not a diffusers Stable Diffusion pipeline directory" in msg
    assert "unet/config.json" in msg and "vae/config.json" in msg and "Fix:" in msg
    assert snapshot(scratch) == before


def test_encoder_width_mismatch_without_projection(scratch, tiny_sd_dir, tmp_path):
    from iap_rt.train.tiny import make_tiny_encoder

    enc = make_tiny_encoder(tmp_path / "enc48", projection_dim=None)  # BERT width 48 != 32
    before = snapshot(scratch)
    with pytest.raises(ConfigError) as e:
        export_model_dir(tiny_sd_dir, enc, scratch)
    msg = str(e.value)
    assert "width 48" in msg and "cross_attention_dim is 32" in msg and "no projection" in msg
    assert "iap-rt train --base" in msg
    assert snapshot(scratch) == before


def test_partial_reexport_that_changes_the_dims_is_refused(
    scratch, tiny_sd_dir, tiny_encoder_dir, tmp_path
):
    enc = tmp_path / "encoder-s24"
    shutil.copytree(tiny_encoder_dir, enc)
    meta = json.loads((enc / "iap_encoder.json").read_text("utf-8"))
    (enc / "iap_encoder.json").write_text(json.dumps({**meta, "max_length": 24}), "utf-8")
    before = snapshot(scratch)
    with pytest.raises(ConfigError, match="text_max_length.*drop --networks"):
        export_model_dir(tiny_sd_dir, enc, scratch, networks=["text_encoder"])
    assert snapshot(scratch) == before


@pytest.mark.parametrize("opset", [17, 23])
def test_opset_outside_the_supported_range(opset, scratch, tiny_sd_dir, tiny_encoder_dir):
    before = snapshot(scratch)
    with pytest.raises(ConfigError, match=f"opset {opset} is not supported .*18-21"):
        export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, opset=opset)
    assert snapshot(scratch) == before


def test_out_that_is_a_file(tiny_sd_dir, tiny_encoder_dir, tmp_path):
    out = tmp_path / "model"
    out.write_text("keep me")
    with pytest.raises(OutputError, match="exists and is a file"):
        export_model_dir(tiny_sd_dir, tiny_encoder_dir, out)
    assert out.read_text() == "keep me"


def test_out_that_is_someone_elses_directory(tiny_sd_dir, tiny_encoder_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(OutputError, match="not an iap-rt model directory"):
        export_model_dir(tiny_sd_dir, tiny_encoder_dir, out)
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


# ---- the command line ---------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from iap_rt.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_reads_the_export_table_and_options_win(
    scratch, tiny_sd_dir, tiny_encoder_dir, tmp_path, capsys, monkeypatch
):
    ws = scratch.parent
    shutil.copytree(tiny_sd_dir, ws / "sd", ignore=shutil.ignore_patterns("text_encoder"))
    (ws / "iap-rt.toml").write_text(
        '[export]\nbase = "sd"\nencoder = "' + str(tiny_encoder_dir) + '"\nout = "model"\n'
        'networks = ["text_encoder"]\nforce = true\nopset = 18\nengines = "none"\n'
        "default_guidance = 4.0\n",
        "utf-8",
    )
    monkeypatch.chdir(tmp_path.parent)  # paths resolve against the file, not the cwd
    code, out, err = run_cli(
        ["export", "--config", str(ws / "iap-rt.toml"), "--opset", "19"], capsys
    )
    assert code == 0, err
    assert "text_encoder: exporting fp32, opset 19" in out
    assert f"wrote {scratch}" in out
    m = manifest(scratch)
    assert m["networks"]["text_encoder"]["opset"] == 19 and m["networks"]["unet"]["opset"] == 18
    assert m["export_config"]["opset"] == 19 and m["export_config"]["force"] is True
    assert m["default_guidance"] == 4.0  # what generate and serve use when no guidance is given


def test_cli_bad_opset_exits_2_with_the_reason(tiny_sd_dir, tiny_encoder_dir, tmp_path, capsys):
    code, _, err = run_cli(
        ["export", "--base", str(tiny_sd_dir), "--encoder", str(tiny_encoder_dir), "--out",
         str(tmp_path / "m"), "--opset", "17"],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "opset 17 is not supported" in err and "18-21" in err
    assert not (tmp_path / "m").exists()


def test_engines_stage_missing(scratch, tiny_sd_dir, tiny_encoder_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "iap_rt.engines.stage", None)  # import raises ImportError
    base = ["export", "--base", str(tiny_sd_dir), "--encoder", str(tiny_encoder_dir),
            "--out", str(scratch)]  # fmt: skip
    code, out, err = run_cli([*base, "--engines", "auto"], capsys)
    assert code == 0, err
    assert "engines: skipped (the engines stage cannot be imported" in out
    code, out, err = run_cli([*base, "--engines", "only"], capsys)
    assert code == 1
    assert "--engines only needs the engines stage" in err and "--engines none" in err


def test_engines_only_needs_an_exported_model_dir(tmp_path, capsys):
    code, _, err = run_cli(["export", "--out", str(tmp_path / "none"), "--engines", "only"], capsys)
    assert code == 1 and "does not exist" in err


# ---- external data (past 2 GB) ------------------------------------------------------------------


def test_big_models_keep_their_weights_in_one_external_file(
    scratch, tiny_sd_dir, tiny_encoder_dir, monkeypatch
):
    """The fp32 SD UNet path (weights > 2 GB), on the tiny UNet with the limit lowered."""
    from iap_rt.export import exporter

    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 1 << 20)
    export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, networks=["unet"], force=True)
    files = sorted(p.name for p in scratch.iterdir() if p.name.startswith("unet"))
    # --ort-unet auto: external weights -> the fused-attention ORT graph, sharing the .data
    assert files == ["unet.onnx", "unet.onnx.data", "unet.ort.onnx"]
    info = manifest(scratch)["networks"]["unet"]
    assert info["ort"]["bytes"] == (scratch / "unet.ort.onnx").stat().st_size < 1 << 20
    assert info["external_data"] == "unet.onnx.data"
    assert info["data_bytes"] == (scratch / "unet.onnx.data").stat().st_size > 2 << 20
    assert info["data_sha256"] == sha256_file(scratch / "unet.onnx.data")
    assert (scratch / "unet.onnx").stat().st_size < 1 << 20  # the graph only
    assert all(r["max_abs_diff"] <= r["tolerance"] for r in info["validation"])
    assert io_types(scratch / "unet.onnx")["sample"] == ("tensor(float)", ("N", 4, "h", "w"))
    # kept by the next export: both files linked into the new directory
    before = snapshot(scratch)
    export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, networks=["text_encoder"], force=True)
    after = snapshot(scratch)
    assert after["unet.onnx.data"] == before["unet.onnx.data"]
    ModelDir.open(scratch)


@pytest.mark.slow
def test_sd15_fp32_unet_exports_on_this_machine(tmp_path):
    """Real size: the SD 1.5 UNet (860M, random weights) to ONNX with external data, every
    attention fusable, validated. ~4 min and ~4 GB peak on 2 cores (bench/export_sd15.py
    records the numbers)."""
    from iap_rt.train.sd15 import make_sd15, make_sd15_encoder

    base = make_sd15(tmp_path / "sd", text_encoder=False)
    enc = make_sd15_encoder(tmp_path / "encoder")
    out = export_model_dir(base, enc, tmp_path / "model", networks=["unet"])
    info = manifest(out)["networks"]["unet"]
    assert info["attention"] == {"total": 32, "fusable": 32, "problems": []}
    assert info["data_bytes"] > 3.4e9 and info["bytes"] < 2e6
    assert all(r["max_abs_diff"] <= r["tolerance"] for r in info["validation"])


def test_validation_sizes_survive_deep_unets():
    """A UNet with 4 down-samplings (the toy base) must not be traced at 8x8, where its
    innermost level is 1x1 and torch.export specialises it (the ONNX then fails at 32x32)."""
    from iap_rt.export.networks import EXPORT_CONFIGS

    unet = EXPORT_CONFIGS["unet"]
    assert unet.for_downsamples(1) is unet  # tiny UNet: 8x8 is already deep enough
    deep = unet.for_downsamples(4)
    sides = [v for c in deep.cases for a, v in c.items() if a in ("h", "w")]
    assert min(sides) >= 32 and [c["N"] for c in deep.cases] == [c["N"] for c in unet.cases]
    assert EXPORT_CONFIGS["text_encoder"].for_downsamples(4) is EXPORT_CONFIGS["text_encoder"]


def test_ort_unet_variant_is_written_used_and_dropped(
    scratch, tiny_sd_dir, tiny_encoder_dir, tiny_model_dir
):
    from iap_rt.backends.ort import OrtBackend
    from iap_rt.pipeline import Pipeline

    assert "ort" not in manifest(tiny_model_dir)["networks"]["unet"]  # auto: inline weights
    lines = []
    export_model_dir(
        tiny_sd_dir, tiny_encoder_dir, scratch, model_id="tiny", ort_unet="always",
        echo=lines.append,
    )  # fmt: skip
    unet = manifest(scratch)["networks"]["unet"]
    alt = unet["ort"]
    kept = sum("unchanged since the last export, kept" in ln for ln in lines)
    assert kept == len(NETWORKS)  # no re-export
    assert alt["file"] == "unet.ort.onnx" and alt["unet_sha256"] == unet["sha256"]
    assert alt["attention_fused"] == unet["attention"]["fusable"] > 0
    assert alt["sha256"] == sha256_file(scratch / "unet.ort.onnx") and alt["max_abs_diff"] < 1e-4
    import onnx

    ops = [n.op_type for n in onnx.load(str(scratch / "unet.ort.onnx")).graph.node]
    assert ops.count("MultiHeadAttention") == alt["attention_fused"] and "Softmax" not in ops

    md = ModelDir.open(scratch)
    backend = OrtBackend("cpu", threads=1)
    runners = backend.load(md)
    assert runners["unet"].path == str(scratch / "unet.ort.onnx")
    plain_runners = OrtBackend("cpu", threads=1, fused_unet=False).load(md)
    assert plain_runners["unet"].path == str(scratch / "unet.onnx")
    fused = Pipeline(md, backend, progress=False)("山水画", steps=3, seed=1, height=64, width=64)
    plain_md = ModelDir.open(tiny_model_dir)
    plain = Pipeline(plain_md, OrtBackend("cpu", threads=1), progress=False)(
        "山水画", steps=3, seed=1, height=64, width=64
    )
    np.testing.assert_allclose(fused.latents, plain.latents, atol=1e-4)

    (scratch / "unet.ort.onnx").write_bytes(b"truncated")  # the manifest catches a bad variant
    with pytest.raises(Exception, match="unet.ort.onnx has 9 bytes"):
        ModelDir.open(scratch)
    export_model_dir(tiny_sd_dir, tiny_encoder_dir, scratch, model_id="tiny", ort_unet="never")
    assert "ort" not in manifest(scratch)["networks"]["unet"]
    assert not (scratch / "unet.ort.onnx").exists()


def test_manifests_from_before_the_rename_still_find_the_variant(tmp_path, tiny_model_dir):
    """0.1 wrote the variant under networks.unet.ort_cpu; it is read (never written) as "ort"."""
    import json
    import shutil

    from iap_rt.export.ortfuse import fuse_attention_for_ort

    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    fuse_attention_for_ort(old / "unet.onnx", old / "unet.ort.onnx")
    data = json.loads((old / "manifest.json").read_text("utf-8"))
    data["networks"]["unet"]["ort_cpu"] = {
        "file": "unet.ort.onnx",
        "bytes": (old / "unet.ort.onnx").stat().st_size,
    }
    (old / "manifest.json").write_text(json.dumps(data), "utf-8")
    md = ModelDir.open(old)
    assert md.network_path("unet", "ort") == old / "unet.ort.onnx"
    (old / "unet.ort.onnx").write_bytes(b"x")  # and its size is checked like the main file's
    with pytest.raises(Exception, match="unet.ort.onnx has 1 bytes"):
        ModelDir.open(old)


def test_fp16_unet_gets_the_fused_variant_too(scratch, tiny_sd_dir, tiny_encoder_dir):
    """The GPU path (ONNX Runtime's CUDA provider runs MultiHeadAttention with its fused
    kernels): an fp16 export writes and checks the variant in fp16 like the fp32 one."""
    import onnx

    export_model_dir(
        tiny_sd_dir, tiny_encoder_dir, scratch, fp16=True, networks=["unet"], ort_unet="always"
    )
    unet = manifest(scratch)["networks"]["unet"]
    alt = unet["ort"]
    assert unet["precision"] == "fp16" and alt["attention_fused"] == unet["attention"]["fusable"]
    assert 0 < alt["max_abs_diff"] < 2e-2
    graph = onnx.load(str(scratch / "unet.ort.onnx")).graph
    assert "Softmax" not in [n.op_type for n in graph.node]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
