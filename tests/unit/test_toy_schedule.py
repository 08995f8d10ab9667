"""The transfer grid's run order (longest_first): long runs first, then big fractions."""

from iap_rt.train.toy.transfer import grid_specs, longest_first


def test_long_runs_first_then_larger_fractions_untrained_last():
    spp = {"pivot": 0.3, "full": 0.5, "embed": 0.1, "denoise": 0.7, "embed_pos": 0.08}
    specs = grid_specs({}, spp, (0, 1), ("1pct", "5pct", "10pct"), budget_s=100.0)
    order = longest_first(specs)
    assert sorted(map(id, order)) == sorted(map(id, specs))  # same cells, reordered
    assert [s["fraction"] for s in order[:2]] == ["100pct", "100pct"]
    assert order[0]["budget_cpu_s"] == 500.0
    fractions = [s["fraction"] for s in order[2:]]
    assert fractions == sorted(fractions, key=lambda f: -float(f.removesuffix("pct")))
    assert {s["objective"] for s in order[-2:]} == {"untrained"}
