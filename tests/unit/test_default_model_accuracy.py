"""The shipped default model still draws what Chinese prompts ask for (CI accuracy gate).

Re-runs ``iap-rt toy eval`` on the embedded model (torch-free runtime + numpy checker) on the
small held-out subset ``scripts/make_default_model.py`` evaluated when it built the model,
and fails when all-three-correct accuracy drops below the committed figure minus the margin
recorded beside it (``bench/results/toy_default_eval.json``).
"""

import json
from pathlib import Path

from iap_rt.modeldir import ModelDir, default_model_dir

RESULT = Path(__file__).resolve().parents[2] / "bench" / "results" / "toy_default_eval.json"


def test_default_model_chinese_accuracy_holds(run_cli):
    committed = json.loads(RESULT.read_text("utf-8"))
    md = ModelDir.open(default_model_dir())
    assert md.manifest["model_id"] == committed["model"]  # the figure belongs to this model
    ci = committed["ci_subset"]
    ev = ci["settings"]
    r = run_cli(
        "toy", "eval", "--model", str(md.path), "--lang", "zh", "--combos", ev["combos"],
        "--max-combos", str(ev["max_combos"]), "--seeds", str(ev["seeds"]),
        "--steps", str(ev["steps"]), "--guidance", str(ev["guidance"]), "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    got = json.loads(r.out.strip().splitlines()[-1])
    assert got["n"] == ci["zh"]["n"] == ev["max_combos"] * ev["seeds"]
    assert ci["margin"] <= 0.15 and ci["min_all"] == ci["zh"]["all"] - ci["margin"]
    assert got["all"] >= ci["min_all"], (
        f"Chinese all-three accuracy {got['all']:.3f} < committed {ci['zh']['all']:.3f} "
        f"- margin {ci['margin']}"
    )
