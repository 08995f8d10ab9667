"""The result document of ``iap-rt bench``: its required fields, a layout check, the notes it
carries and the table printed to the terminal."""

from __future__ import annotations

import math

from iap_rt.bench.config import BenchConfig

# figures every entry of ``results`` carries (medians in seconds, peak RSS in MiB)
TIMING_FIELDS = ("text_encoder_s", "unet_step_s", "vae_decode_s", "overhead_step_s", "e2e_s")
RESULT_FIELDS = ("backend", "device", *TIMING_FIELDS, "cold_start_s", "peak_rss_mb")
CONFIG_FIELDS = ("arch", "height", "width", "steps", "batch_size", "repeat")
UNITS = "seconds (medians over the measured runs); peak_rss_mb/peak_gpu_mb in MiB"


def notes(cfg: BenchConfig) -> list[str]:
    """What a reader of the result needs to know to read it right."""
    out = []
    if cfg.model is None and cfg.arch in ("tiny", "sd15"):
        out.append(
            f"{cfg.arch}: the architecture from its configs with random seeded weights (latency "
            "does not depend on weight values), exported by the project's export stage."
        )
    if cfg.steps < 25:
        out.append(
            f"e2e_s is one image at {cfg.steps} denoising steps, not a full 25-50 step image; "
            "e2e_50_steps_est_s extrapolates it (text encoder + 50 x (UNet step + overhead) + "
            "VAE decode)."
        )
    out.append(
        "backends ran one after the other, each in its own subprocess; on a shared machine "
        "compare loadavg_before_after, and unet_step_cpu_s (process CPU time, robust to other "
        "processes taking the cores) beside the wall times."
    )
    return out


def precision_notes(results: list[dict]) -> list[str]:
    """Where a backend ran a network at another precision than ``torch`` (its figures for that
    network, and e2e, are then not like for like), and the VAE decode at both precisions
    where a worker measured both."""
    ref = next((r for r in results if r["backend"] == "torch"), None)
    out = []
    for r in results:
        if ref is None or r is ref or not r.get("precision") or not ref.get("precision"):
            continue
        differ = {
            n: (p, ref["precision"][n])
            for n, p in r["precision"].items()
            if n in ref["precision"] and p != ref["precision"][n]
        }
        if differ:
            what = ", ".join(f"{n} in {p} (torch: {t})" for n, (p, t) in differ.items())
            out.append(f"{r['backend']} runs {what}: not like for like with torch.")
    for r in results:
        both = r.get("vae_decode_by_precision")
        if both:
            figures = ", ".join(f"{p} {s:.4g} s" for p, s in sorted(both.items()))
            out.append(f"{r['backend']}: VAE decode by precision (median): {figures}.")
    return out


def check_document(doc: dict) -> list[str]:
    """Problems with a result document's layout (empty list: it is well formed)."""
    problems = []
    for key in ("machine", "config", "results"):
        if key not in doc:
            problems.append(f"missing top-level key {key!r}")
    for key in CONFIG_FIELDS:
        if key not in doc.get("config", {}):
            problems.append(f"config lacks {key!r}")
    for r in doc.get("results", []):
        for key in RESULT_FIELDS:
            if key not in r:
                problems.append(f"result {r.get('backend')} lacks {key!r}")
            elif key not in ("backend", "device"):
                v = r[key]
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    problems.append(f"result {r.get('backend')}: {key} = {v!r} is not > 0")
    return problems


def format_table(doc: dict) -> str:
    """The results side by side, with speed-ups over torch."""
    cols = [
        ("backend", "backend", "{}"),
        ("device", "device", "{}"),
        ("text_encoder_s", "text enc", "{:.4g}"),
        ("unet_step_s", "UNet/step", "{:.4g}"),
        ("vae_decode_s", "VAE", "{:.4g}"),
        ("overhead_step_s", "ovh/step", "{:.3g}"),
        ("e2e_s", "e2e", "{:.4g}"),
        ("cold_start_s", "cold", "{:.4g}"),
        ("peak_rss_mb", "RSS MiB", "{:.0f}"),
    ]
    header = [c[1] for c in cols] + ["UNet x torch", "e2e x torch", "UNet CPU-time x"]
    rows = [header]
    for r in doc["results"]:
        row = [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols]
        row[1] = row[1].split(" (")[0]
        s = r.get("speedup_vs_torch")
        row += [f"{s['unet_step']:.2f}x", f"{s['e2e']:.2f}x"] if s else ["-", "-"]
        cpu = s.get("unet_step_cpu") if s else None
        row.append(f"{cpu:.2f}x" if cpu else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    c = doc["config"]
    title = (
        f"{c['arch']} {c['height']}x{c['width']}, {c['steps']} steps, batch {c['batch_size']} "
        f"(UNet batch {c['unet_batch']}), {c['scheduler']}, {c['repeat']} runs; seconds (medians); "
        "x torch = torch time / backend time"
    )
    lines = [title, *lines]
    for s in doc.get("skipped", []):
        lines.append(f"{s['backend']}: not run: {s['reason']}")
    return "\n".join(lines)
