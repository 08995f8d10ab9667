"""Where does the toy English base lose the relation? Linear probes on its text encoder.

The first base (trained without ``--text-aux``) drew both objects of a two-object prompt right
and on the right axis, but put them on the wrong sides half the time
(``bench/results/toy2_base_noaux.json``, ``relation_diagnosis``; its probes:
``toy2_text_probe_noaux.json``). This script asks whether the *per-token* states of a base's
CLIP text encoder carry the order at all: logistic-regression probes (numpy, standardised
features, L2 1e-3) trained on captions of training combos and scored on captions of held-out
combos:

- ``colour_token_slot``: from the state at an object's colour word, is that object the
  left/top one? Split by whether the colour is named first (a causal encoder cannot know
  there: the relation word comes later in most templates) or second (it has seen the
  relation word and the other object);
- ``relation_word_seen``: from the state at the first colour word after the relation word,
  was that word left/above/over/on top (vs right/below/under/beneath)?
- ``control_colour_is_red``: the same probe on the same states asked what they certainly hold
  (is this colour word's colour red?), so a coin-toss score above means absent, not unprobed.

Usage: ``python bench/toy_text_probe.py [--base iap_rt/data/toy_base] [--out
bench/results/toy_text_probe.json]`` (about a minute on one CPU thread). The committed probes
(``toy2_text_probe.json``, ``toy2_text_probe_noaux.json``) were made as
``bench/toy2_text_probe.py``, the same script before the toy world's rename.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

FIRST_WORDS = ("left", "above", "over", "top")  # the first object is left / on top
RELATION_WORDS = (*FIRST_WORDS, "right", "below", "under", "beneath")


def encode(tok, enc, caption: str) -> tuple[np.ndarray, list[str]]:
    """(states (S, D), the tokens as words) of one caption."""
    ids = tok(caption, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        h = enc(**ids).last_hidden_state[0].numpy()
    words = [w.replace("</w>", "") for w in tok.convert_ids_to_tokens(ids["input_ids"][0])]
    return h, words


def samples(tok, enc, combos, n: int, rng) -> dict[str, list]:
    """Probe rows from ``n`` random captions of ``combos``."""
    from iap_rt.train.toy import captions

    out: dict[str, list] = {"slot_x": [], "slot_y": [], "second": [], "red": [], "rel_x": [],
                            "rel_y": []}  # fmt: skip
    for _ in range(n):
        c = combos[rng.integers(len(combos))]
        h, words = encode(tok, enc, captions.caption_en(c, rng))
        at = [[j for j, w in enumerate(words) if w in captions.EN_COLOUR[o[0]]] for o in c[1:]]
        if all(len(p) == 1 for p in at):
            for slot in (0, 1):
                out["slot_x"].append(h[at[slot][0]])
                out["slot_y"].append(slot == 0)
                out["second"].append(at[slot][0] > at[1 - slot][0])
                out["red"].append(c[1 + slot][0] == "red")
        rel = [j for j, w in enumerate(words) if w in RELATION_WORDS]
        after = [j for p in at for j in p if rel and j > rel[0]]
        if rel and after:
            out["rel_x"].append(h[min(after)])
            out["rel_y"].append(words[rel[0]] in FIRST_WORDS)
    return {k: np.array(v, dtype=np.float64 if k.endswith("_x") else bool) for k, v in out.items()}


def fit(x: np.ndarray, y: np.ndarray, steps: int = 3000, lr: float = 0.5):
    """Logistic regression by gradient descent; returns a predict function."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn, yf = (x - mu) / sd, y.astype(np.float64)
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(xn @ w + b)))
        g = p - yf
        w -= lr * (xn.T @ g / len(yf) + 1e-3 * w)
        b -= lr * g.mean()
    return lambda z: ((z - mu) / sd) @ w + b > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="iap_rt/data/toy_base")
    ap.add_argument("--out", default="bench/results/toy_text_probe.json")
    ap.add_argument("--n-train", type=int, default=3000, help="training captions")
    ap.add_argument("--n-test", type=int, default=1500, help="held-out captions")
    args = ap.parse_args()
    from transformers import CLIPTextModel, CLIPTokenizer

    from iap_rt.fileio import write_json_atomic
    from iap_rt.train.toy import scenes

    torch.set_num_threads(1)
    tok = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder").eval()
    rng = np.random.default_rng(0)
    two = lambda cs: [c for c in cs if scenes.n_objects(c) == 2]  # noqa: E731
    tr = samples(tok, enc, two(scenes.train_combos(0)), args.n_train, rng)
    te = samples(tok, enc, two(scenes.heldout_combos(0)), args.n_test, rng)
    result = {}
    for name, mtr, mte in (("all", slice(None), slice(None)),
                           ("named_second", tr["second"], te["second"]),
                           ("named_first", ~tr["second"], ~te["second"])):  # fmt: skip
        f = fit(tr["slot_x"][mtr], tr["slot_y"][mtr])
        result[f"colour_token_slot_{name}"] = {
            "train": float((f(tr["slot_x"][mtr]) == tr["slot_y"][mtr]).mean()),
            "heldout": float((f(te["slot_x"][mte]) == te["slot_y"][mte]).mean()),
            "n_heldout": int(te["slot_y"][mte].size),
        }
    f = fit(tr["slot_x"], tr["red"])
    result["control_colour_is_red"] = {
        "train": float((f(tr["slot_x"]) == tr["red"]).mean()),
        "heldout": float((f(te["slot_x"]) == te["red"]).mean()),
        "n_heldout": int(te["red"].size),
    }
    f = fit(tr["rel_x"], tr["rel_y"])
    result["relation_word_seen"] = {
        "train": float((f(tr["rel_x"]) == tr["rel_y"]).mean()),
        "heldout": float((f(te["rel_x"]) == te["rel_y"]).mean()),
        "n_heldout": int(te["rel_y"].size),
    }
    record = {"base": args.base, "what": __doc__.split("\n\n")[1].replace("\n", " "),
              "chance": {"slot and relation probes": 0.5,
              "control (majority: not red)": float(1 - te["red"].mean())}, "probes": result}  # fmt: skip
    write_json_atomic(Path(args.out), record)
    print(json.dumps(record["probes"], indent=1))


if __name__ == "__main__":
    main()
