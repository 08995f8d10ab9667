"""The transfer grid's result files: ``toy_transfer.json`` and ``toy_transfer.md`` (the
committed records of the grid are ``toy2_transfer.*``, made when the world was ``iap-rt toy2``).

``results``: one object per (objective, fraction, seed) with the cell's scores (see
:mod:`iap_rt.train.toy.evaluate`), agreement with English from the same noise, pixel MSE,
budget, CPU and wall training seconds, steps and samples seen. ``objective`` is ``english``
(the base; fraction 1.0), ``untrained`` (fraction 0.0, one per seed) or a training objective;
``fraction`` is a float (0.01, 0.05, 0.1, 1.0). ``summary``: mean / sd / min / max over seeds
per (objective, fraction). ``claim``: the paper's "pivot at 5-10 % >= denoise at 100 %", by
mean binding over seeds, with each difference's standard error over seeds (on binding and on
``objects``, binding without the relation) and whether it exceeds two of them.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from iap_rt.fileio import write_json_atomic, write_text_atomic

SCORES = ("colour", "shape", "relation", "objects", "binding", "one_all", "agreement",
          "agreement_two", "pixel_mse")  # fmt: skip
COSTS = ("train_cpu_s", "steps", "samples_seen")
ORDER = ("english", "untrained", "embed_pos", "embed", "denoise", "full", "pivot")
NAMES = {
    "english": "English base (upper bound)",
    "untrained": "untrained encoder",
    "embed_pos": "`embed_pos` (old: position-wise MSE)",
    "embed": "`embed` (OT distillation)",
    "denoise": "`denoise`",
    "full": "IAP `full`",
    "pivot": "IAP `pivot`",
}


def fraction_value(name: str) -> float:
    """``"5pct"`` -> 0.05."""
    return round(float(name.removesuffix("pct")) / 100, 4)


def _stats(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


def english_row(work: Path, base: Path) -> dict:
    en = json.loads((work / "english.json").read_text("utf-8"))
    rec = json.loads((base / "toy_base.json").read_text("utf-8"))
    threads = rec.get("torch_threads", 1)
    return {
        "objective": "english",
        "fraction": 1.0,
        "seed": rec["config"]["seed"],
        **{k: v for k, v in en.items() if k != "lang"},
        "train_cpu_s": rec["train_cpu_minutes"] * 60,
        "budget_note": f"base: {threads} threads, CPU time / threads = "
        f"{rec['train_cpu_minutes'] / threads:.1f} min",
        "steps": rec["steps"],
        "samples_seen": rec["samples_seen"],
    }


def collect(work: Path, base: Path) -> list[dict]:
    """Every finished cell as a ``results`` row, the English base first."""
    rows = [english_row(work, base)]
    for f in sorted((work / "cells").glob("*.json")):
        r = json.loads(f.read_text("utf-8"))
        rows.append(r | {"fraction": fraction_value(r["fraction"])})
    key = {o: i for i, o in enumerate(ORDER)}
    return sorted(rows, key=lambda r: (r["fraction"], key[r["objective"]], r["seed"]))


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["objective"], r["fraction"]), []).append(r)
    out = []
    for (obj, frac), rs in groups.items():
        s = {"objective": obj, "fraction": frac, "seeds": [r["seed"] for r in rs]}
        for k in SCORES + COSTS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                s[k] = _stats([float(v) for v in vals])
        out.append(s)
    return out


def versus(a: dict, b: dict, key: str) -> dict | None:
    """Summary ``a`` minus summary ``b`` on the seed-mean of ``key``: the difference, its
    standard error over seeds and whether it is more than two of them (None: ``key`` missing)."""
    if key not in a or key not in b:
        return None
    diff = a[key]["mean"] - b[key]["mean"]
    se = math.sqrt(a[key]["sd"] ** 2 / a[key]["n"] + b[key]["sd"] ** 2 / b[key]["n"])
    return {"diff": diff, "se": se, "beyond_2se": abs(diff) > 2 * se}


def claim(summary: list[dict]) -> dict | None:
    """pivot at 5 % and 10 % vs denoise at 100 % (mean binding over seeds; differences with
    their standard errors on binding and objects)."""
    get = {(s["objective"], s["fraction"]): s for s in summary}
    d100 = get.get(("denoise", 1.0))
    piv = {f: get.get(("pivot", f)) for f in (0.05, 0.1)}
    if d100 is None or None in piv.values():
        return None
    out = {"denoise_100pct": d100["binding"]["mean"]}
    for f, s in piv.items():
        out[f"pivot_{round(f * 100)}pct"] = s["binding"]["mean"]
    out["holds"] = all(s["binding"]["mean"] >= d100["binding"]["mean"] for s in piv.values())
    for f, s in piv.items():
        out[f"pivot_{round(f * 100)}pct_minus_denoise_100pct"] = {
            k: versus(s, d100, k) for k in ("binding", "objects")
        }
    out["denoise_100pct_cpu_s"] = d100["train_cpu_s"]["mean"]
    out["pivot_cpu_s"] = piv[0.1]["train_cpu_s"]["mean"]
    return out


def aggregate(work, results, setup: dict) -> dict:
    """Write ``toy_transfer.json`` / ``.md`` from the finished cells in ``work``."""
    work, results = Path(work), Path(results)
    rows = collect(work, Path(setup["base"]))
    summary = summarise(rows)
    record = {"setup": setup, "base_used": base_used(work), "results": rows, "summary": summary,
              "claim": claim(summary)}  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / "toy_transfer.json", record)
    write_text_atomic(results / "toy_transfer.md", markdown(record))
    return record


def base_used(work) -> dict:
    """The base a work dir's results were made with (``work/base.json``: its path and weights'
    sha256, see :func:`.workdir.check_same_base`), for every result file of a work dir."""
    return json.loads((Path(work) / "base.json").read_text("utf-8"))


def _fmt(st: dict | None, digits: int = 2) -> str:
    if st is None:
        return "–"
    if st["n"] == 1:
        return f"{st['mean']:.{digits}f}"
    return f"{st['mean']:.{digits}f} ± {st['sd']:.{digits}f}"


def glance(summary: list[dict]) -> list[str]:
    """A compact table: one row per objective, one column per data fraction, each cell
    "binding / objects" (seed means); the English base and the untrained encoder in a line
    beneath."""
    get = {(s["objective"], s["fraction"]): s for s in summary}
    fracs = sorted(
        {s["fraction"] for s in summary if s["objective"] not in ("english", "untrained")}
    )

    def cell(s):
        if s is None:
            return "–"
        obj = s.get("objects")
        return f"{s['binding']['mean']:.2f}" + (f" / {obj['mean']:.2f}" if obj else "")

    out = ["| binding / objects | " + " | ".join(f"{f * 100:g} %" for f in fracs) + " |",
           "|---" * (len(fracs) + 1) + "|"]  # fmt: skip
    for o in ORDER:
        if o in ("english", "untrained") or not any((o, f) in get for f in fracs):
            continue
        out.append(f"| {NAMES[o]} | " + " | ".join(cell(get.get((o, f))) for f in fracs) + " |")
    refs = [f"{NAMES[o]} {cell(get[(o, f)])}" for o, f in (("english", 1.0), ("untrained", 0.0))
            if (o, f) in get]  # fmt: skip
    if refs:
        out += ["", "For reference: " + "; ".join(refs) + "."]
    return out


def markdown(record: dict) -> str:
    """The summary as one Markdown table (mean ± sd over seeds), a compact table and the
    claim."""
    setup = record["setup"]
    out = [
        "Toy world transfer: held-out two-object Chinese prompts (192 combos of object pair "
        "and relation never seen in training) and one-object prompts (24), one image each, "
        f"DDIM {setup['eval']['steps']} steps, guidance {setup['eval']['guidance']}. Every "
        f"Chinese row trains a fresh encoder for the same CPU time (~{setup['budget_cpu_s']:.0f} "
        f"CPU s, one thread; `denoise` at 100 % gets {setup['long']['factor']}x), mean ± sd over "
        f"seeds {setup['seeds']}.",
        "",
        "| data | conditioning | colour | shape | relation | objects | **binding** | "
        "one-object all | agreement w/ English | agreement (two-object) | pixel MSE | "
        "train CPU s | steps | samples seen |",
        "|---" * 14 + "|",
    ]
    for s in record["summary"]:
        frac = "–" if s["objective"] in ("untrained",) else f"{s['fraction'] * 100:g} %"
        if s["objective"] == "english":
            frac = "100 % (base)"
        cost = (
            f"{_fmt(s.get('train_cpu_s'), 0)} | {s['steps']['mean']:.0f} | "
            f"{s['samples_seen']['mean']:.0f}"
            if s["objective"] != "untrained" and "steps" in s
            else "– | – | –"
        )
        out.append(
            f"| {frac} | {NAMES[s['objective']]} | {_fmt(s['colour'])} | {_fmt(s['shape'])} | "
            f"{_fmt(s['relation'])} | {_fmt(s.get('objects'))} | **{_fmt(s['binding'])}** | "
            f"{_fmt(s.get('one_all'))} | "
            f"{_fmt(s['agreement'])} | {_fmt(s.get('agreement_two'))} | "
            f"{_fmt(s['pixel_mse'], 4)} | {cost} |"
        )
    out += ["", "At a glance (seed means):", "", *glance(record["summary"]), ""]
    c = record.get("claim")
    if c:
        verdict = "holds" if c["holds"] else "does not hold"
        out += [
            f"The paper's claim (pivot at 5-10 % of the data >= denoise at 100 %) **{verdict}** "
            f"here: binding pivot 5 % {c['pivot_5pct']:.2f}, pivot 10 % {c['pivot_10pct']:.2f}, "
            f"denoise 100 % {c['denoise_100pct']:.2f} (denoise trained "
            f"{c['denoise_100pct_cpu_s']:.0f} CPU s, pivot {c['pivot_cpu_s']:.0f}).",
            "",
        ]
        for f in (5, 10):
            parts = []
            for k, v in c.get(f"pivot_{f}pct_minus_denoise_100pct", {}).items():
                if v is not None:
                    noise = "more than" if v["beyond_2se"] else "within"
                    parts.append(f"{k} {v['diff']:+.2f} ± {v['se']:.2f} ({noise} 2 SE)")
            if parts:
                out += [f"pivot {f} % minus denoise 100 %, seed-mean difference ± its standard "
                        "error over seeds: " + "; ".join(parts) + ".", ""]  # fmt: skip
    out += [
        "Columns: colour / shape = fraction of prompt objects drawn with that colour / shape "
        "(matched to the drawn objects order-free); relation = both objects drawn on the right "
        "axis in the right order; objects = both objects drawn with their colour and shape, "
        "anywhere; binding = the drawn scene equals the prompt's (both objects and the "
        "relation). Agreement = the checker reads the Chinese image as the same scene as "
        "the English image from the same noise (pixel MSE: images in [0, 1]). Steps per "
        "objective = budget / CPU seconds per step "
        + ", ".join(f"`{k}` {v:.3f}" for k, v in setup["s_per_step_cpu"].items())
        + " (measured once, one thread).",
        "",
    ]
    return "\n".join(out)
