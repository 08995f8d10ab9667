"""Image editing on the embedded toy model, measured (issue 29.7): one command, results in
``bench/results/toy_edit.json`` and a before/after grid ``docs/toy_edit.png``.

Two tasks on drawn two-object scenes (side by side), read back by the toy checker
(``iap_rt/data/toy_checker.safetensors``, numpy):

- **recolour** (image to image, strength 0.6): the prompt names the same scene with the left
  object in another colour. Scored: *colour taken* (the left object read in the new colour),
  *layout kept* (axis, both shapes and the right object's colour read as before), and both.
- **repaint half** (inpainting, the right half masked, strength 1): the prompt names the left
  object and a new right object (another colour and shape). Scored: *new object drawn* (read
  on the right in its colour and shape), *left kept* (the left object still read), and the
  largest pixel change outside the mask (0 by construction: the composite).

    python bench/toy_edit.py                 # 24 cases each -> bench/results/toy_edit.json
    python bench/toy_edit.py --cases 4 --out /tmp/e.json --grid /tmp/e.png   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def scenes_side_by_side(n: int, seed: int) -> list[tuple[tuple, np.ndarray]]:
    """``n`` (combo, image) pairs of two-object horizontal scenes whose left object lies wholly
    in the left half and right object wholly in the right half (so a half mask is clean)."""
    from iap_rt.train.toy import scenes

    rng = np.random.default_rng(seed)
    combos = [c for c in scenes.two_object_combos() if c[0] == "h"]
    out = []
    while len(out) < n:
        combo = combos[rng.integers(len(combos))]
        scene = scenes.draw_scene(combo, rng)
        a, b = scene.objects
        if a.cx + a.radius < 15.5 and b.cx - b.radius > 16.5:
            out.append((combo, scenes.render(scene)))
    return out


def other(values, *avoid, rng) -> str:
    choices = [v for v in values if v not in avoid]
    return choices[rng.integers(len(choices))]


def run(cases: int, seed: int, steps: int) -> tuple[dict, list]:
    from iap_rt.pipeline import Pipeline
    from iap_rt.requests import PromptRequest
    from iap_rt.train.toy import scenes
    from iap_rt.train.toy.captions import caption_zh
    from iap_rt.train.toy.checker import Checker

    pipe, checker = Pipeline.from_dir(progress=False), Checker()
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    rows, grid = {"recolour": [], "repaint_half": []}, []
    for k, (combo, image) in enumerate(scenes_side_by_side(cases, seed)):
        _, (ca, sa), (cb, sb) = combo
        # recolour the left object
        new_a = other(scenes.COLOURS, ca, cb, rng=rng)
        want = ("h", (new_a, sa), (cb, sb))
        req = PromptRequest(caption_zh(want, rng), seed=seed + k, image=image, strength=0.6,
                            steps=steps)  # fmt: skip
        out = pipe.generate([req])[0].images[0]
        got = checker.predict(out[None])[0]
        ok_a = len(got) == 3 and got[0] == "h" and got[1] == (new_a, sa)
        kept = len(got) == 3 and got[0] == "h" and got[1][1] == sa and got[2] == (cb, sb)
        rows["recolour"].append({"from": scenes.combo_to_json(combo),
                                 "to": scenes.combo_to_json(want), "prompt": req.prompt,
                                 "read": scenes.combo_to_json(got), "colour_taken": ok_a,
                                 "layout_kept": kept, "both": ok_a and kept})  # fmt: skip
        # repaint the right half with a new object
        new_b = (other(scenes.COLOURS, ca, cb, rng=rng), other(scenes.SHAPES, sb, rng=rng))
        want2 = ("h", (ca, sa), new_b)
        req2 = PromptRequest(caption_zh(want2, rng), seed=seed + k, image=image, mask=mask,
                             strength=1.0, steps=steps)  # fmt: skip
        out2 = pipe.generate([req2])[0].images[0]
        got2 = checker.predict(out2[None])[0]
        drawn = len(got2) == 3 and got2[2] == new_b
        left = len(got2) == 3 and got2[1] == (ca, sa)
        outside = int(np.abs(out2[:, :16].astype(int) - image[:, :16]).max())
        rows["repaint_half"].append({"from": scenes.combo_to_json(combo),
                                     "to": scenes.combo_to_json(want2), "prompt": req2.prompt,
                                     "read": scenes.combo_to_json(got2), "new_object_drawn": drawn,
                                     "left_kept": left, "both": drawn and left,
                                     "max_change_outside_mask": outside})  # fmt: skip
        if k < 6:
            grid.append((image, out, out2))
    summary = {
        task: {key: float(np.mean([r[key] for r in rs]))
               for key in rs[0] if isinstance(rs[0][key], bool)}
        for task, rs in rows.items()
    }  # fmt: skip
    summary["repaint_half"]["max_change_outside_mask"] = max(
        r["max_change_outside_mask"] for r in rows["repaint_half"]
    )
    return {"summary": summary, "cases": rows}, grid


def save_grid(grid: list, path: Path) -> None:
    """Rows: input, recoloured, right half repainted (x4, nearest)."""
    from PIL import Image

    cols = [np.concatenate(triple, axis=0) for triple in grid]  # each column: 3 images stacked
    sheet = np.concatenate([np.pad(c, ((0, 0), (0, 2), (0, 0)), constant_values=255) for c in cols],
                           axis=1)  # fmt: skip
    img = Image.fromarray(sheet).resize((sheet.shape[1] * 4, sheet.shape[0] * 4), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=24, help="scenes per task [24]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "toy_edit.json"))
    ap.add_argument("--grid", default=str(ROOT / "docs" / "toy_edit.png"))
    args = ap.parse_args(argv)
    from iap_rt.bench.machine import machine_info
    from iap_rt.fileio import write_json_atomic

    t0 = time.perf_counter()
    doc, grid = run(args.cases, args.seed, args.steps)
    doc = {"command": " ".join(["python", "bench/toy_edit.py", *(argv or sys.argv[1:])]),
           "config": vars(args) | {"recolour_strength": 0.6, "repaint_strength": 1.0,
                                   "model": "the embedded toy model (DDIM, guidance 3)"},
           "machine": machine_info(), **doc, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    write_json_atomic(args.out, doc)
    save_grid(grid, Path(args.grid))
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {args.out} and {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
