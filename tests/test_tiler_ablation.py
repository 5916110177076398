"""The tiler ablation end to end on CPU (tiler_ablation_tiny: two tilers, a small fine_print split,
train + evaluate per tiler through launch.run inside Ray tasks): the report and its table, the
same stage-1 run for every tiler (same seed, init, steps and data order), coarse questions
answered above chance, a rerun that redoes nothing, and generate answering with a trained
checkpoint exactly as the evaluation did."""
from __future__ import annotations

import json

import pytest
from evaluation_helpers import compose_config, ray_cluster  # noqa: F401 (a fixture)

from bluelm_v import launch

@pytest.fixture(scope="module")
def ablation(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiler_ablation")
    cfg = compose_config(["+experiment=tiler_ablation_tiny", "ray.num_cpus=2"])
    return cfg, run_dir, launch.run(cfg, run_dir)


@pytest.mark.slow
def test_report_table_and_coarse_accuracy_above_chance(ablation):
    cfg, run_dir, summary = ablation
    assert summary["status"] == "ok" and summary["tilers"] == ["relaxed", "single"]
    rows = {r["tiler"]: r for r in summary["table"]}
    chance = summary["chance"]["coarse"]
    for name, row in rows.items():
        assert row["coarse"]["n"] == row["reading"]["n"] // 2 > 0          # 2 coarse and 4 reading kinds a picture
        assert row["coarse"]["ci95"][0] > chance, (name, row["coarse"], chance)   # the lower bound, not the mean
        assert row["mean_visual_tokens"] > 0 and row["train_tokens_per_s"] > 0 and row["phone_s_per_image"] > 0
    assert rows["relaxed"]["mean_visual_tokens"] > rows["single"]["mean_visual_tokens"]   # tiles cost tokens
    assert rows["relaxed"]["phone_s_per_image"] > rows["single"]["phone_s_per_image"]
    report = (run_dir / "report.md").read_text()
    assert "| relaxed |" in report and "| single |" in report and "accuracy_vs_tokens.png" in report
    assert (run_dir / "accuracy_vs_tokens.png").stat().st_size > 0


@pytest.mark.slow
def test_every_tiler_trains_the_same_stage1_then_differs(ablation):
    _, run_dir, _ = ablation
    metrics = {n: [json.loads(x) for x in (run_dir / "runs" / n / "train" / "metrics.jsonl").read_text().splitlines()]
               for n in ("relaxed", "single")}
    stage1 = {n: [(m["step"], m["loss"]) for m in ms if m["stage"] == 1] for n, ms in metrics.items()}
    assert stage1["relaxed"] == stage1["single"] and len(stage1["relaxed"]) == 10    # same init, data order, steps
    first2 = {n: next(m["loss"] for m in ms if m["stage"] == 2) for n, ms in metrics.items()}
    assert first2["relaxed"] != first2["single"]                                      # stage 2 sees other crops
    steps2 = {n: sum(1 for m in ms if m["stage"] == 2) for n, ms in metrics.items()}
    assert steps2 == {"relaxed": 300, "single": 300}


@pytest.mark.slow
def test_rerun_resumes_without_redoing_anything(compose, ablation):
    cfg, run_dir, summary = ablation
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("runs/*/*/summary.json")}
    again = launch.run(cfg, run_dir)
    assert again["status"] == "ok" and again["table"] == summary["table"]
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("runs/*/*/summary.json")} == stamps


@pytest.mark.slow
def test_generate_answers_with_the_trained_checkpoint(compose, ablation, tmp_path):
    _, run_dir, _ = ablation
    preds = [json.loads(x) for x in (run_dir / "runs" / "relaxed" / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    asked = next(p for p in preds if p["l2_category"] == "background")
    typed = asked["prompt"].replace("\n", "\\n")               # as typed on a command line: \n, not a newline
    cfg = compose(["+experiment=generate", f"checkpoint={run_dir / 'runs' / 'relaxed' / 'train' / 'checkpoint'}",
                   f"image={asked['images'][0]}", "max_new_tokens=10", "stream=false", f'prompt="{typed}"'])
    out = launch.run(cfg, tmp_path)
    assert out["text"].strip() == asked["prediction"]          # the evaluation's answer, from the same weights
    from bluelm_v.data.fine_print import BACKGROUNDS
    assert out["text"].strip() in BACKGROUNDS                   # a colour name: the trained output space
