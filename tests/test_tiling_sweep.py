"""The tiling sweep (Pareto front), the zoo's statistics and phone pricing through a backend's
public run_case (docs/design.md §5.9, §5.10)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bluelm_v.errors import ConfigError
from bluelm_v.jobs import tiling_sweep
from bluelm_v.plugin_manager import get
from bluelm_v.plugins.tilers import Qwen2VLTiler, RelaxedTiler
from bluelm_v.plugins.tilers.pricing import PhonePricer
from bluelm_v.plugins.tilers.zoo import decide_all, pareto_front, rule_stats

ONLY_TILERS = ["~encoder", "~downsampler", "~projector", "~llm", "~quantizer", "~backend"]
REGISTRY = get()[1]


@pytest.fixture
def sweep_cfg(compose):
    return lambda *overrides: compose(["+experiment=tiling_sweep", *ONLY_TILERS, *overrides])


def test_pareto_front_marks_exactly_the_undominated_points():
    tokens = np.array([100, 200, 200, 300, 150, 100])
    kept = np.array([0.5, 0.9, 0.8, 0.9, 0.5, 0.5])
    # 2 is dominated by 1 (same tokens, less kept), 3 by 1, 4 by 0; 0 and 5 are equal: neither dominates
    assert pareto_front(tokens, kept).tolist() == [True, True, False, False, False, True]


def test_rule_stats_budget_shares_kept_and_upscale_by_hand():
    tiler = Qwen2VLTiler()
    w, h = np.array([28, 2800, 1000, 201]), np.array([28, 2800, 10, 1])
    d, _ = decide_all({"q": tiler}, w, h)[0]["q"]
    st = rule_stats(d, w, h, budgets=(1000, 5000))
    # 28x28 -> 56x56 (4 tokens, upscale 4); 2800x2800 -> 2800x2800 (10,000 tokens); 1000x10 -> 1008x28:
    # round(10/28) = 0 -> min_pixels: beta = sqrt(3136/10000) = 0.56 -> ceil(5.6/28)*28 = 28, ceil(560/28)*28 = 560
    assert d.tokens.tolist() == [4, 10_000, 20, -1] and st["skip_reasons"] == {"aspect_ratio_over_200": 1}
    assert st["share_over"] == {"1000": pytest.approx(1 / 3), "5000": pytest.approx(1 / 3)}
    scale = np.array([56 * 56 / 784, 1.0, 560 * 28 / 10_000])
    assert st["mean_upscale"] == pytest.approx(scale.mean())
    assert st["mean_kept"] == pytest.approx(np.minimum(scale, 1).mean())
    assert st["n_decided"] == 3 and st["mean_tokens"] == pytest.approx((4 + 10_000 + 20) / 3)


class LinearPhone:
    """A backend with known costs: encode 0.25 s a crop, prefill 0.01 s a token, floor 196."""

    def __init__(self):
        self.cases = []

    def run_case(self, case):
        self.cases.append(case)
        crops = case["grid"][0] * case["grid"][1]
        prompt = max(case["prompt_tokens"], 196 * crops)
        return {"crops": crops, "prompt_tokens": prompt, "encode_s": 0.25 * crops, "prefill_s": 0.01 * prompt}


def test_pricing_interpolates_the_backends_answers_and_floors_short_prompts():
    backend = LinearPhone()
    pricer = PhonePricer(backend, tiles_per_batch=4, prefill_chunk=128, text_tokens=10)
    enc, pre, below = pricer.price(np.array([384.0**2 * 2.5, 384.0**2, 0.0, 5.0]), np.array([1000, 100, 50, -1]))
    assert enc[:3] == pytest.approx([0.625, 0.25, 0.0]) and np.isnan(enc[3])          # linear in crop-equivalents
    assert pre[:3] == pytest.approx([10.10, 1.96, 1.96]) and np.isnan(pre[3])           # 1010 tokens; floor 196
    assert below == 2                                                                     # 110 and 60 < 196
    assert all(c["tiles_per_batch"] == 4 and c["prefill_chunk"] == 128 for c in backend.cases)


def test_pricing_refuses_a_backend_that_ignores_the_grid():
    class OneCrop(LinearPhone):
        def run_case(self, case):
            return {**super().run_case(case), "crops": 1}

    with pytest.raises(ConfigError, match="honours case\\['grid'\\]"):
        PhonePricer(OneCrop()).price(np.array([3 * 384.0**2]), np.array([600]))


def test_pricing_on_the_simulated_phone_equals_run_case_at_whole_crops():
    node = {"backend": {"name": "simulated_npu", "profile": "dimensity9300"}, "tiles_per_batch": 4,
            "prefill_chunk": 128}
    pricer = PhonePricer.from_config(node, REGISTRY)
    relaxed = RelaxedTiler(max_grid=4)
    d = relaxed.decide_many(np.array([768, 640]), np.array([1536, 480]))
    enc, pre, _ = pricer.price(d.encoder_pixels, d.tokens)
    for i, (w, h) in enumerate([(768, 1536), (640, 480)]):
        m, n = relaxed.select(w, h)
        crops = relaxed.num_crops(m, n)
        direct = pricer.backend.run_case({**pricer.base, "grid": [crops, 1], "prompt_tokens": crops * 196})
        assert enc[i] == pytest.approx(direct["encode_s"]) and pre[i] == pytest.approx(direct["prefill_s"])


def test_settings_expand_the_cross_product_and_validate(sweep_cfg):
    cfg = sweep_cfg("sweep.only=[relaxed,v16]", "sweep.grid.relaxed.params={alpha: [0.0, 0.2], max_grid: [3, 4]}",
                    "+sweep.grid.v16={tiler: llava_next_v16}")
    found = tiling_sweep.settings(cfg, REGISTRY)
    assert [s["label"] for s in found] == ["relaxed[alpha=0.0,max_grid=3]", "relaxed[alpha=0.0,max_grid=4]",
                                           "relaxed[alpha=0.2,max_grid=3]", "relaxed[alpha=0.2,max_grid=4]", "v16"]
    assert found[-1]["tiler"] == "llava_next" and found[-1]["params"]["tile_size"] == 336
    tiling_sweep.validate(cfg, REGISTRY)
    with pytest.raises(ConfigError, match=r"sweep.grid.relaxed.params.alpha: 1.5 is out of range"):
        tiling_sweep.validate(sweep_cfg("sweep.grid.relaxed.params.alpha=[0.1,1.5]"), REGISTRY)
    with pytest.raises(ConfigError, match=r"sweep.grid.relaxed.params.alpha: a non-empty list"):
        tiling_sweep.validate(sweep_cfg("sweep.grid.relaxed.params.alpha=0.1"), REGISTRY)
    with pytest.raises(ConfigError, match=r"sweep.grid.foo.tiler: no tiler named 'foo'"):
        tiling_sweep.validate(sweep_cfg("+sweep.grid.foo={params: {x: [1]}}"), REGISTRY)
    with pytest.raises(ConfigError, match=r"sweep.only: 'relaxd' is not a sweep.grid label"):
        tiling_sweep.validate(sweep_cfg("sweep.only=[relaxd]"), REGISTRY)
    with pytest.raises(ConfigError, match=r"tiler.alpha=0.3: the tiling_sweep job sweeps sweep.grid"):
        tiling_sweep.validate(sweep_cfg("tiler.alpha=0.3"), REGISTRY)


@pytest.mark.slow
def test_end_to_end_sweep_writes_the_front(sweep_cfg, tmp_path):
    import ray

    from bluelm_v.launch import run

    manifest = tmp_path / "sizes.csv"
    manifest.write_text("width,height\n640,480\n1200,300\n300,2000\n28,28\n1,100000\n,\n")
    grid = ["sweep.only=[relaxed,qwen2_vl]", "sweep.grid.relaxed.params={alpha: [0.0, 0.5], max_grid: [3]}",
            "sweep.grid.qwen2_vl.params.max_pixels=[3136,1003520]"]
    try:
        summary = run(sweep_cfg(f"dataset.manifest={manifest}", *grid, "ray.num_cpus=2", "pricing.enabled=false"),
                      tmp_path / "run")
    finally:
        ray.shutdown()
    assert summary["status"] == "ok" and summary["n_images"] == 5 and summary["n_skipped"] == 1
    table = pd.read_csv(tmp_path / "run" / "sweep.csv")
    assert len(table) == 4 and table["mean_tokens"].is_monotonic_increasing
    tiny = table[table.label == "qwen2_vl[max_pixels=3136]"].iloc[0]
    tokens = Qwen2VLTiler(max_pixels=3136).tokens(np.array([640, 1200, 300, 28]), np.array([480, 300, 2000, 28]))
    assert tiny["mean_tokens"] == pytest.approx(tokens.mean()) and tiny["n_skipped"] == 1   # 1 x 100000: ratio > 200
    assert tiny["pareto"]                                                                 # fewest tokens of all
    expected = pareto_front(table["mean_tokens"].to_numpy(), table["mean_kept"].to_numpy())
    assert table["pareto"].tolist() == expected.tolist()
    for _, part in table.groupby("family"):
        assert part["family_front"].tolist() == pareto_front(part["mean_tokens"].to_numpy(),
                                                             part["mean_kept"].to_numpy()).tolist()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["front"] == table.loc[table.pareto, "label"].tolist()
    assert "](pareto.png)" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "pareto.png").stat().st_size > 1000
