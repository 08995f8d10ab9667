"""The statistics of ``iap-rt bench``: a worker's raw runs -> medians, spreads and estimates;
each backend's speed-up over ``torch`` and its final-latents difference to ``torch``."""

from __future__ import annotations

import statistics

import numpy as np

from iap_rt.bench.protocol import RunTimes


def _median_spread(values: list[float]) -> tuple[float, list[float]]:
    return statistics.median(values), [min(values), max(values)]


def by_steps(runs: list[RunTimes]) -> dict:
    """One step count's runs -> e2e and UNet step: median, [min, max] and the 90th
    percentile of the steps (the tail a median hides), with the sample counts."""
    e2e = [r.e2e_s for r in runs]
    steps = [s for r in runs for s in r.unet_s]
    return {
        "e2e_s": statistics.median(e2e),
        "e2e_spread": [min(e2e), max(e2e)],
        "unet_step_s": statistics.median(steps),
        "unet_step_spread": [min(steps), max(steps)],
        "unet_step_p90_s": float(np.percentile(steps, 90)),
        "samples": {"e2e_s": len(e2e), "unet_step_s": len(steps)},
    }


def summarise(raw: dict) -> dict:
    """A worker's raw runs -> the result entry (medians + spreads)."""
    runs = [RunTimes(**r) for r in raw["runs"]]
    per_run = {
        "text_encoder_s": [r.text_encoder_s for r in runs],
        "unet_step_s": [s for r in runs for s in r.unet_s],  # every step of every run
        "vae_decode_s": [r.vae_decode_s for r in runs],
        "overhead_step_s": [r.overhead_step_s for r in runs],
        "e2e_s": [r.e2e_s for r in runs],
    }
    entry = {"backend": raw["backend"], "device": raw["device"]}
    spread = {}
    for name, values in per_run.items():
        entry[name], spread[name] = _median_spread(values)
    # the mean shows the tail a median hides (a descheduled ORT thread on a busy machine)
    entry["unet_step_mean_s"] = statistics.fmean(per_run["unet_step_s"])
    cpu = [c for r in runs for c in r.unet_cpu_s]
    entry["unet_step_cpu_s"] = statistics.median(cpu) if cpu else None
    entry["cold_start_s"] = raw["cold_start_s"]
    entry["peak_rss_mb"] = raw["peak_rss_mb"]
    entry["peak_gpu_mb"] = raw.get("peak_gpu_mb")
    entry["overhead_pct_of_step"] = 100.0 * entry["overhead_step_s"] / entry["unet_step_s"]
    # an estimate, not a measurement: what one image would take at 50 steps
    entry["e2e_50_steps_est_s"] = (
        entry["text_encoder_s"]
        + 50 * (entry["unet_step_s"] + entry["overhead_step_s"])
        + entry["vae_decode_s"]
    )
    entry["spread"] = spread  # [min, max] over the measured runs (UNet: over all steps)
    entry["samples"] = {k: len(v) for k, v in per_run.items()}
    entry["load_s"] = raw["load_s"]
    entry["first_image_s"] = raw["first_image_s"]
    entry["import_s"] = raw["import_s"]
    entry["loadavg_before_after"] = raw.get("loadavg")
    entry["latents_absmax"] = raw.get("latents_absmax")  # final latents, last run
    for key in ("unet_graph", "cuda_graph", "precision", "vae_decode_by_precision"):
        if key in raw:
            entry[key] = raw[key]
    # per step count: --steps and every --also-steps, each from the same loaded backend
    more = {k: [RunTimes(**r) for r in v] for k, v in raw.get("runs_by_steps", {}).items()}
    entry["by_steps"] = {str(raw.get("steps", len(runs[0].unet_s))): by_steps(runs)}
    entry["by_steps"].update({k: by_steps(v) for k, v in more.items()})
    entry["iap_rt"] = raw.get("iap_rt")  # where the worker imported iap_rt from
    entry["runs"] = raw["runs"]  # the raw per-run timings the figures above come from
    if raw.get("runs_by_steps"):
        entry["runs_by_steps"] = raw["runs_by_steps"]
    return entry


def add_ratios(
    results: list[dict], latents: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None
) -> None:
    """Each backend's speed-up over ``torch`` (torch time / backend time; > 1 is faster), its
    final-latents max abs difference to ``torch`` and its images' max and mean abs
    difference to ``torch``'s (uint8 levels)."""
    images = images or {}
    ref = next((r for r in results if r["backend"] == "torch"), None)
    for r in results:
        r["speedup_vs_torch"] = (
            {
                "unet_step": ref["unet_step_s"] / r["unet_step_s"],
                "e2e": ref["e2e_s"] / r["e2e_s"],
                "unet_step_cpu": (
                    ref["unet_step_cpu_s"] / r["unet_step_cpu_s"]
                    if ref.get("unet_step_cpu_s") and r.get("unet_step_cpu_s")
                    else None
                ),
            }
            if ref is not None
            else None
        )
        diff = None
        if ref is not None and r is not ref and {"torch", r["backend"]} <= set(latents):
            a, b = latents["torch"], latents[r["backend"]]
            if a.shape == b.shape:
                diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        r["latents_max_abs_diff_vs_torch"] = diff
        pix = pixel_diff(images.get("torch"), images.get(r["backend"])) if r is not ref else None
        r["pixels_max_abs_diff_vs_torch"] = pix and pix["max"]
        r["pixels_mean_abs_diff_vs_torch"] = pix and pix["mean"]


def pixel_diff(a: np.ndarray | None, b: np.ndarray | None) -> dict | None:
    """Max and mean abs difference of two uint8 image batches, in levels (None: either is
    missing or the shapes differ)."""
    if a is None or b is None or a.shape != b.shape:
        return None
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(d.max()), "mean": float(d.mean())}
