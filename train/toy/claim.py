"""The paper's claim at equal compute (``iap-rt toy claim``): ``pivot`` on 10 % of the triples
against ``denoise`` on 100 %, the same CPU budget each, several seeds; ``denoise`` on 100 % at
:data:`LONG_FACTOR` x the budget too.

Every run is a transfer-grid cell (:func:`.transfer.run_cell`: train in-process on one thread,
export, evaluate every held-out combo through the runtime from the English base's noise), so
the figures compare directly with the grid's (``toy_transfer.json``; the committed grid:
``toy2_transfer.json``). The record (``bench/results/toy_claim.json``) is rewritten after every finished run, so a session cut
short keeps what finished; a finished run is never re-run.

Record: ``english_binding`` / ``english_objects`` (the base), ``results`` (one object per run:
``objective``, ``fraction``, ``seed``, ``budget_cpu_s``, ``binding``, ``objects``,
``relation``, ``samples_seen``, ...), ``summary`` (seed means per objective, fraction and
budget, with binding per CPU second and per thousand samples) and ``verdict`` (what holds,
per CPU second and per sample).
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from iap_rt.errors import ArtifactNotFoundError, InputError
from iap_rt.fileio import write_json_atomic
from iap_rt.train.toy import transfer
from iap_rt.train.toy.report import base_used, fraction_value
from iap_rt.train.toy.workdir import run_workers

PIVOT = ("pivot", "10pct")
DENOISE = ("denoise", "100pct")
LONG_FACTOR = 5
KEYS = ("binding", "objects", "relation", "colour", "shape", "one_all", "agreement")


def claim_specs(common: dict, spp: dict, seeds, long_seeds, budget_s: float) -> list[dict]:
    """pivot 10 % and denoise 100 % per seed at ``budget_s``; denoise 100 % at 5x per long
    seed (tag ``_x5``). Longest first, so the 5x run never runs alone at the end."""
    specs = []
    for s in long_seeds:
        specs.append(_spec(common, spp, DENOISE, s, LONG_FACTOR * budget_s, tag=f"_x{LONG_FACTOR}"))
    for s in seeds:
        specs.append(_spec(common, spp, DENOISE, s, budget_s))
        specs.append(_spec(common, spp, PIVOT, s, budget_s))
    return specs


def _spec(common, spp, run, seed, budget, tag=""):
    objective, fraction = run
    steps = max(1, int(budget / spp[objective]))
    return common | {"objective": objective, "fraction": fraction, "seed": seed, "steps": steps,
                     "budget_cpu_s": budget, "tag": tag}  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """Seed means (and spread) per objective, fraction and budget; binding per CPU second of
    training and per thousand samples seen."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["objective"], r["fraction"], r["budget_cpu_s"]), []).append(r)
    out = []
    for (obj, frac, budget), rs in sorted(groups.items()):
        s = {"objective": obj, "fraction": frac, "budget_cpu_s": budget,
             "seeds": [r["seed"] for r in rs]}  # fmt: skip
        for k in (*KEYS, "samples_seen", "train_cpu_s"):
            vals = [float(r[k]) for r in rs if r.get(k) is not None]
            if vals:
                s[k] = statistics.fmean(vals)
                s[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        s["binding_per_cpu_ks"] = s["binding"] / (s["train_cpu_s"] / 1000)
        s["binding_per_k_samples"] = s["binding"] / (s["samples_seen"] / 1000)
        out.append(s)
    return out


def verdict(summary: list[dict], budget_s: float) -> dict | None:
    """What holds: pivot 10 % vs denoise 100 % at the same budget (per CPU second), against
    denoise 100 % at 5x, and per sample seen."""
    get = {(s["objective"], s["fraction"], s["budget_cpu_s"]): s for s in summary}
    piv = get.get(("pivot", 0.1, budget_s))
    den = get.get(("denoise", 1.0, budget_s))
    long = get.get(("denoise", 1.0, LONG_FACTOR * budget_s))
    if piv is None or den is None:
        return None
    out = {
        "pivot_10pct_binding": piv["binding"],
        "denoise_100pct_binding": den["binding"],
        "equal_cpu_holds": piv["binding"] >= den["binding"],
        "equal_cpu_diff": piv["binding"] - den["binding"],
        "equal_cpu_diff_se": (
            (
                piv["binding_sd"] ** 2 / len(piv["seeds"])
                + den["binding_sd"] ** 2 / len(den["seeds"])
            )
            ** 0.5
        ),
        "pivot_samples_seen": piv["samples_seen"],
        "denoise_samples_seen": den["samples_seen"],
        "per_sample_pivot_ahead": piv["binding_per_k_samples"] >= den["binding_per_k_samples"],
    }
    if long is not None:
        out |= {
            "denoise_100pct_x5_binding": long["binding"],
            "pivot_vs_5x_denoise_holds": piv["binding"] >= long["binding"],
            "denoise_x5_samples_seen": long["samples_seen"],
        }
    return out


def write_record(work: Path, results: Path, setup: dict) -> dict:
    """``results/toy_claim.json`` from the finished runs in ``work/cells``."""
    en = json.loads((work / "english.json").read_text("utf-8"))
    rows = []
    for f in sorted((work / "cells").glob("*.json")):
        r = json.loads(f.read_text("utf-8"))
        rows.append(r | {"fraction": fraction_value(r["fraction"])})
    summary = summarise(rows)
    record = {
        "english_binding": en["binding"],
        "english_objects": en["objects"],
        "setup": setup,
        "base_used": base_used(work),
        "results": rows,
        "summary": summary,
        "verdict": verdict(summary, setup["budget_cpu_s"]),
    }
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / "toy_claim.json", record)
    return record


def run_claim(
    data_dir,
    base,
    work,
    results="bench/results",
    seeds: tuple[int, ...] = (0, 1, 2),
    long_seeds: tuple[int, ...] = (0,),
    budget_s: float = 900.0,
    batch: int = 64,
    jobs: int = 2,
    ev: dict | None = None,
    log=print,
    calib_lengths=(10, 40),
) -> dict:
    """Every run (resumable); the record is rewritten as each finishes. ``jobs`` worker
    processes, or 0: in this process."""
    data, base, work, results = Path(data_dir), Path(base), Path(work), Path(results)
    for f in (PIVOT[1], DENOISE[1]):
        if not (data / f"train_{f}.jsonl").is_file():
            raise ArtifactNotFoundError(
                f"{data / f'train_{f}.jsonl'} is missing", fix=f"iap-rt toy data --out {data}"
            )
    if budget_s <= 0:
        raise InputError(f"--budget-s must be > 0, got {budget_s}")
    ev = ev or transfer.default_eval()
    common, spp = transfer.prepare(
        data, base, work, seeds, batch, ev, jobs, log, calib_lengths, (PIVOT[0], DENOISE[0])
    )
    specs = claim_specs(common, spp, seeds, long_seeds, budget_s)
    setup = {
        "budget_cpu_s": budget_s,
        "long_factor": LONG_FACTOR,
        "s_per_step_cpu": {k: spp[k] for k in (PIVOT[0], DENOISE[0])},
        "batch_size": batch,
        "lr": transfer.LR,
        "seeds": list(seeds),
        "long_seeds": list(long_seeds),
        "eval": ev | {"combos": "heldout", "noise": "numpy initial_noise"},
        "base": str(base),
        "threads_per_run": 1,
        "parallel_runs": jobs,
        "commit": _commit(),
    }
    tasks = [
        ("cell", transfer.cell_name(s), s, work / "cells" / f"{transfer.cell_name(s)}.json")
        for s in specs
    ]

    def done(_name):
        write_record(work, results, setup)

    if jobs > 0:
        run_workers(tasks, work, jobs, log, module=transfer.MODULE, on_done=done)
    else:  # in this process (tests)
        for _, name, spec, result in tasks:
            if not result.is_file():
                transfer.run_cell(spec)
                done(name)
    return write_record(work, results, setup)


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
