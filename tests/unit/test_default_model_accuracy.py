"""The shipped default model still draws what Chinese prompts ask for (CI accuracy gate).

Re-runs ``iap-rt toy eval`` on the embedded model (torch-free runtime + numpy checker) on the
small held-out subset ``scripts/make_default_model.py`` evaluated when it built the model, one-
and two-object prompts, and fails when two-object binding or one-object accuracy drops below
the committed figure minus the margin recorded beside it (``bench/results/toy_default_eval.json``).
"""

import json
from pathlib import Path

from iap_rt.modeldir import ModelDir, default_model_dir

RESULT = Path(__file__).resolve().parents[2] / "bench" / "results" / "toy_default_eval.json"


def test_default_model_chinese_accuracy_holds(run_cli):
    committed = json.loads(RESULT.read_text("utf-8"))
    md = ModelDir.open(default_model_dir())
    assert md.manifest["model_id"] == committed["model"]  # the figures belong to this model
    ci = committed["ci_subset"]
    ev = ci["settings"]
    r = run_cli(
        "toy", "eval", "--model", str(md.path), "--lang", "zh", "--combos", ev["combos"],
        "--kind", "all", "--max-combos", str(ev["max_combos"]), "--seeds", str(ev["seeds"]),
        "--steps", str(ev["steps"]), "--guidance", str(ev["guidance"]), "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    got = json.loads(r.out.strip().splitlines()[-1])
    n = ev["max_combos"] * ev["seeds"]
    assert (got["n_one"], got["n_two"]) == (ci["zh"]["n_one"], ci["zh"]["n_two"]) == (n, n)
    assert ci["margin"] <= 0.15
    for metric, floor in ci["min"].items():  # binding (two objects), one_all (one object)
        assert floor == ci["zh"][metric] - ci["margin"]
        assert got[metric] >= floor, (
            f"Chinese {metric} {got[metric]:.3f} < committed {ci['zh'][metric]:.3f} "
            f"- margin {ci['margin']}"
        )
    assert set(ci["min"]) == {"binding", "one_all"}
