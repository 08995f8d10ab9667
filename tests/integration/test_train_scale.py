"""Training at scale, with real processes: two processes follow the one-process trajectory,
a signal checkpoints and resumes (under the supervisor, torchrun and two "machines"), a killed
rank stops the job; plus the data index (Parquet, columns), sharded cache building, per-sample
randomness and the generated CLI options (in-process, fast).

Multi-process runs use the tiny models, 2 rows a micro-batch and one thread per process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402
from test_train import TOML, cli, write_images, write_jsonl  # noqa: E402

STEPS = 16  # the reference trajectory: global batch 4 (2 rows x 2 micro-batches or processes)
SCALE_TOML = TOML.replace(
    "batch_size = 4",
    'batch_size = 2\nlr_schedule = "constant"\nema_decay = 0.9\ncaption_dropout = 0.25',
)


@pytest.fixture(scope="module")
def sws(tmp_path_factory, tiny_sd_dir, tiny_encoder_dir):
    """Workspace: 6 images + data.jsonl + scale.toml; ``args`` of every run."""
    root = tmp_path_factory.mktemp("scale")
    rows = write_images(root / "data")
    write_jsonl(root / "data" / "data.jsonl", rows)
    (root / "scale.toml").write_text(SCALE_TOML, "utf-8")
    args = ["--base", tiny_sd_dir, "--encoder", tiny_encoder_dir]
    args += ["--data", root / "data" / "data.jsonl", "--config", root / "scale.toml"]
    return {"root": root, "rows": rows, "args": [str(a) for a in args]}


@pytest.fixture(scope="module")
def reference(sws):
    """One process, --grad-accum 2: the trajectory every split must follow."""
    out = sws["root"] / "ref"
    assert cli("train", *sws["args"], "--out", out, "--grad-accum", 2, "--max-steps", STEPS) == 0
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(tmp: Path, name: str, argv: list) -> subprocess.Popen:
    """Start ``argv`` with stdout/stderr to ``tmp/name.out|err``."""
    out, err = open(tmp / f"{name}.out", "w"), open(tmp / f"{name}.err", "w")
    return subprocess.Popen([str(a) for a in argv], env=_env(), stdout=out, stderr=err)


def _train(*args) -> list:
    return [sys.executable, "-m", "iap_rt.cli", "train", *map(str, args)]


def _finish(p: subprocess.Popen, timeout: float = 180) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise


def _wait_for(cond, p: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert p.poll() is None, f"the run ended (status {p.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text("utf-8").splitlines() if x.endswith("}")]


def _weights(out: Path) -> dict:
    enc = out / "chinese_encoder"
    return {
        **load_file(str(enc / "model.safetensors")),
        **load_file(str(enc / "projection.safetensors")),
    }


def _assert_same_trajectory(out: Path, ref: Path, tol: float = 1e-4) -> None:
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"final weights differ by {worst:.3g}"
    ma, mb = _metrics(ref), _metrics(out)
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1)), "one metrics line per step"
    assert all(abs(x["loss"] - y["loss"]) <= tol for x, y in zip(ma, mb))


def _clean_checkpoints(out: Path) -> list[int]:
    """Every checkpoint is complete and no half-written one is left; -> their steps."""
    root = out / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert all(n.startswith("step-") for n in names), names  # no hidden .step-* temp dirs
    for n in names:
        assert {"state.json", "encoder.safetensors", "optimizer.safetensors"} <= {
            f.name for f in (root / n).iterdir()
        }
    return [int(n[5:]) for n in names]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _rank_pid(supervisor: int, rank: int) -> int:
    for pid in _children(supervisor):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under pid {supervisor}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


# ---- several real processes --------------------------------------------------------------


def test_two_processes_follow_the_one_process_trajectory(sws, reference, tmp_path):
    out = tmp_path / "two"
    p = _start(
        tmp_path,
        "two",
        _train(*sws["args"], "--out", out, "--max-steps", STEPS, "--num-processes", 2),
    )
    assert _finish(p) == 0, (tmp_path / "two.err").read_text()
    _assert_same_trajectory(out, reference)
    stdout = (tmp_path / "two.out").read_text()
    assert stdout.count("wrote ") == 1 and stdout.count('"steps"') == 1  # rank 0 alone prints
    record = json.loads((out / "train_config.json").read_text("utf-8"))
    assert record["summary"]["processes"] == 2 and record["summary"]["global_batch"] == 4
    assert record["summary"]["data"]["latents_encoded"] == 6  # both ranks' shares counted
    assert record["summary"]["data"]["images_hashed"] == 6
    (lat,) = (out / "cache").glob("latents-*")
    assert len(list(lat.glob("shard-*.safetensors"))) == 2  # one shard from each rank


def test_sigint_checkpoints_the_current_step_and_any_launcher_resumes(
    sws, reference, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = _train(*sws["args"], "--out", out, "--max-steps", 100, "--num-processes", 2)
    p = _start(tmp_path, "sup", argv)
    _wait_for(lambda: len(_metrics(out)) >= 2, p, "two steps")
    p.send_signal(signal.SIGINT)
    assert _finish(p, 90) == 128 + signal.SIGINT
    err = (tmp_path / "sup.err").read_text()
    steps = _clean_checkpoints(out)
    stopped = steps[-1]
    assert 2 <= stopped < STEPS - 4, f"stopped at step {stopped}: too late to test resuming"
    assert f"stopped by the launcher at step {stopped} of 100" in err
    assert "resume with: iap-rt train" in err and "--num-processes 2 --resume" in err
    assert [m["step"] for m in _metrics(out)][-1] == stopped
    assert not (out / "chinese_encoder").exists()

    # another global batch is refused; another split of the same one is not
    capsys.readouterr()
    assert cli("train", *sws["args"], "--out", out, "--resume", "--grad-accum", 3) != 0
    assert "global batch: checkpoint 4 (batch_size 2 x grad_accum 1 x 2 processes), now 6" in (
        capsys.readouterr().err
    )
    mid = stopped + 2
    assert (
        cli("train", *sws["args"], "--out", out, "--resume", "--grad-accum", 2, "--max-steps", mid)
        == 0
    )
    # torchrun started by the user: 2 processes again, on to the end
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2]
    run += [
        "-m",
        "iap_rt.cli",
        "train",
        *sws["args"],
        "--out",
        out,
        "--resume",
        "--max-steps",
        STEPS,
    ]
    p = _start(tmp_path, "torchrun", run)
    assert _finish(p) == 0, (tmp_path / "torchrun.err").read_text()[-3000:]
    _assert_same_trajectory(out, reference)


def test_a_killed_rank_stops_the_job_and_two_machines_resume_it(sws, reference, tmp_path):
    out = tmp_path / "run"
    argv = _train(*sws["args"], "--out", out, "--max-steps", 100, "--checkpoint-every", 2)
    p = _start(tmp_path, "sup", [*argv, "--num-processes", 2])
    _wait_for(lambda: (out / "checkpoints").is_dir() and len(_metrics(out)) >= 3, p, "a checkpoint")
    victim = _rank_pid(p.pid, 1)
    os.kill(victim, signal.SIGKILL)
    assert _finish(p, 120) == 128 + signal.SIGKILL
    err = (tmp_path / "sup.err").read_text()
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in err
    assert "rank 0: lost the other processes after step" in err and "--resume" in err
    steps = _clean_checkpoints(out)
    assert steps[-1] < STEPS, "killed too late to test resuming"

    # resume as two machines of one process each (machine 0 at 127.0.0.1)
    port = __import__("iap_rt.train.launch", fromlist=["free_port"]).free_port()
    machines = ["--num-machines", 2, "--main-process-ip", "127.0.0.1", "--main-process-port", port]
    resume = [*argv[:-4], "--max-steps", STEPS, "--resume", *machines]
    procs = [_start(tmp_path, f"m{r}", [*resume, "--machine-rank", r]) for r in (0, 1)]
    codes = [_finish(q) for q in procs]
    assert codes == [0, 0], (tmp_path / "m0.err").read_text()[-3000:]
    assert "wrote " in (tmp_path / "m0.out").read_text()
    assert (tmp_path / "m1.out").read_text() == ""  # machine 1 holds rank 1: it prints nothing
    _assert_same_trajectory(out, reference)


def test_a_second_signal_exits_at_once(sws, tmp_path):
    """The first signal starts a clean stop; a second one, once the first was seen, ends the
    process (and under the supervisor every worker) at once, without the checkpoint.
    SIGTERM alone (a scheduler), SIGINT under the supervisor (a terminal's Ctrl-C)."""
    cases = {
        "one": ([], signal.SIGTERM, "stopping after the current step", -signal.SIGTERM),
        "sup": (["--num-processes", 2], signal.SIGINT, "the workers stop after", 130),
    }
    for name, (extra, sig, seen, status) in cases.items():
        out = tmp_path / name
        p = _start(tmp_path, name, _train(*sws["args"], "--out", out, "--max-steps", 100, *extra))
        _wait_for(lambda out=out: len(_metrics(out)) >= 2, p, "two steps")
        workers = _children(p.pid) if extra else []
        p.send_signal(sig)
        err = tmp_path / f"{name}.err"
        _wait_for(lambda err=err, seen=seen: seen in err.read_text(), p, "the first signal")
        p.send_signal(sig)
        t0 = time.time()
        code = _finish(p, 30)
        assert time.time() - t0 < 5, f"{name}: took {time.time() - t0:.1f}s to exit"
        assert code == status, (name, code)
        deadline = time.time() + 10
        while not all(_gone(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert all(_gone(w) for w in workers), "workers outlived the supervisor"
        assert not (out / "chinese_encoder").exists()


# ---- in one process: the pieces the invariance rests on, the data index, the options -------


def test_a_sample_draws_the_same_numbers_in_any_batch(tmp_path, tiny_encoder_dir):
    """make_batch and the encoder's dropout: a batch of 4 == two batches of 2 (same seeds)."""
    from types import SimpleNamespace

    import numpy as np
    from diffusers import DDPMScheduler

    from iap_rt.train import sample_rng
    from iap_rt.train.dataset import CachedSet, make_batch
    from iap_rt.train.latent_cache import ShardCache, text_key
    from iap_rt.train.models import load_encoder
    from iap_rt.train.rows import read_rows

    rows = [{"image": f"{i % 3}.png", "zh": f"第{i}个方块", "en": f"square {i}"} for i in range(4)]
    table = read_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    keys = {i: f"{i:064x}" for i in range(len(table.images))}
    lat, eng = ShardCache(tmp_path / "lat"), ShardCache(tmp_path / "en")
    lat.write_shard({k: torch.randn(2, 4, 8, 8) for k in keys.values()})
    eng.write_shard({text_key(t): torch.randn(5, 32) for t in ["", *(r["en"] for r in rows)]})
    encoder, tok = load_encoder(Path(tiny_encoder_dir), 32, None, 0)
    ds = CachedSet(table, np.arange(4), keys, lat, eng, tok)
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18, shift_factor=None))
    frozen = SimpleNamespace(vae=vae, scheduler=DDPMScheduler())
    seeds = [sample_rng.sample_seed(0, p) for p in range(10, 14)]
    whole = make_batch(ds, [0, 1, 2, 3], seeds, frozen, dropout=0.5)
    parts = [
        make_batch(ds, [0, 1], seeds[:2], frozen, 0.5),
        make_batch(ds, [2, 3], seeds[2:], frozen, 0.5),
    ]
    for k, v in whole.items():
        assert torch.equal(v, torch.cat([p[k] for p in parts])), k
    assert (whole["zh_mask"].sum(1) == 2).any()  # some caption was dropped to ""

    assert sample_rng.install(encoder)
    encoder.train()
    ids, mask = whole["zh_ids"], whole["zh_mask"]
    dseeds = [sample_rng.encoder_seed(0, p) for p in range(10, 14)]
    with sample_rng.per_sample(dseeds):
        a = encoder(ids, mask)
    with sample_rng.per_sample(dseeds[:2]):
        b = encoder(ids[:2], mask[:2])
    with sample_rng.per_sample(dseeds[2:]):
        c = encoder(ids[2:], mask[2:])
    assert torch.equal(a, torch.cat([b, c]))
    encoder.eval()
    assert not torch.allclose(a, encoder(ids, mask))  # dropout was on


def test_two_ranks_build_one_cache_without_sharing_a_file(tmp_path):
    import hashlib

    from iap_rt.train.latent_cache import ShardCache, fill_cache

    todo = {hashlib.sha256(str(i).encode()).hexdigest(): i for i in range(300)}
    key = {i: k for k, i in todo.items()}

    def encode(xs):  # item 7 does not decode
        return ["broken" if x == 7 else torch.full((2,), float(x)) for x in xs]

    caches = [ShardCache(tmp_path), ShardCache(tmp_path)]
    done = [
        fill_cache(c, todo, encode, 16, rank=r, world=2, progress=False)
        for r, c in enumerate(caches)
    ]
    assert sum(done) == 300 and min(done) > 100
    assert not set(caches[0]._index) & set(caches[1]._index)
    merged = ShardCache(tmp_path)
    assert len(merged) == 299 and merged.bad == {key[7]: "broken"}
    assert torch.equal(merged.get(key[299]), torch.full((2,), 299.0))
    assert fill_cache(merged, todo, encode, 16, progress=False) == 0  # nothing left to do


def test_images_are_hashed_once_until_they_change(sws, tmp_path, capsys):
    """The image index: a second start only stats the images; a changed file is re-hashed."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sws["root"] / "data", data)
    args = [a for a in sws["args"]]
    args[args.index("--data") + 1] = str(data / "data.jsonl")
    said = []
    for step in range(3):
        if step == 2:  # new bytes: re-hashed; the same bytes as 4.png: nothing to encode
            (data / "3.png").write_bytes((data / "4.png").read_bytes())
        assert cli("train", *args, "--out", tmp_path / "run", "--cache-only") == 0
        said.append(capsys.readouterr().out.split(" skipped, ")[1].strip())
    assert said == [
        "6 images hashed, 6 images and 7 captions encoded",
        "0 images hashed, 0 images and 0 captions encoded",
        "1 images hashed, 0 images and 0 captions encoded",
    ]


def test_rows_are_compact_columns(tmp_path):
    from iap_rt.train.rows import read_rows

    lines = [
        json.dumps({"image": f"img/{i % 3}.png", "zh": f"猫{i}", "en": f"cat {i}"})
        for i in range(3000)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n", "utf-8")
    rows = read_rows(path)
    assert len(rows) == 3000 and len(rows.images) == 3  # each distinct path once
    assert rows.images.paths[0] == str(tmp_path / "img" / "0.png")
    assert rows.zh[2999] == "猫2999" and rows.en[5] == "cat 5" and int(rows.line[5]) == 7
    assert rows.image.dtype.itemsize == 4 and rows.zh.nbytes < 3000 * 24


def test_parquet_data_with_paths_bytes_or_image_structs(sws, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = sws["root"] / "data"
    zh, en = [r["zh"] for r in sws["rows"]], [r["en"] for r in sws["rows"]]
    blobs = [(d / r["image"]).read_bytes() for r in sws["rows"]]
    blobs[1] = b"not an image"
    tables = {
        "paths": pa.table({"image": [r["image"] for r in sws["rows"]], "zh": zh, "en": en}),
        "bytes": pa.table({"image": pa.array(blobs, pa.binary()), "zh": zh, "en": en}),
        "hf": pa.table({"image": [{"bytes": b, "path": None} for b in blobs], "zh": zh, "en": en}),
    }
    args = [a for a in sws["args"]]
    at = args.index("--data") + 1
    for name, table in tables.items():
        pq.write_table(table, d / f"{name}.parquet", row_group_size=4)
        args[at] = str(d / f"{name}.parquet")
        out = tmp_path / name
        assert cli("train", *args, "--out", out, "--cache-only", "--max-bad-fraction", 0.5) == 0
        expect = "6 usable rows, 0 skipped" if name == "paths" else "5 usable rows, 1 skipped"
        assert expect in capsys.readouterr().out, name
    assert (
        cli("train", *args, "--out", tmp_path / "hf", "--max-bad-fraction", 0.5, "--max-steps", 2)
        == 0
    )
    assert (tmp_path / "hf" / "chinese_encoder" / "model.safetensors").is_file()


def test_every_config_field_is_an_option_with_its_default_in_help():
    import dataclasses

    from click.testing import CliRunner

    from iap_rt.config import load_config
    from iap_rt.train.cli import train
    from iap_rt.train.config import TrainConfig

    params = {p.name for p in train.params}
    fields = dataclasses.fields(TrainConfig)
    assert {f.name for f in fields} <= params
    text = " ".join(CliRunner().invoke(train, ["--help"], terminal_width=200).output.split())
    for f in fields:
        if f.default is not None and not isinstance(f.default, bool):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text and f"[default: {f.default}]" in text.split(flag, 1)[1], f.name
    argv = ["--checkpoint-every", "7", "--log-every", "3", "--val-every", "0", "--layer-norm"]
    argv += ["--sample-prompts", "红色", "--sample-prompts", "蓝色", "--keep-checkpoints", "5"]
    ctx = train.make_context("train", argv)
    opts = {k: v for k, v in ctx.params.items() if k in {f.name for f in fields}}
    opts = {k: (v or None) if isinstance(v, tuple) else v for k, v in opts.items()}
    cfg = load_config(TrainConfig, "train", None, opts)
    assert (cfg.checkpoint_every, cfg.log_every, cfg.val_every, cfg.keep_checkpoints) == (
        7,
        3,
        0,
        5,
    )
    assert cfg.layer_norm is True and cfg.sample_prompts == ("红色", "蓝色")
