"""The quantize and memory jobs: config composition, end to end on tiny models through the launcher."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

SETTINGS = ["fp32", "w8", "w4_g32", "w4_g64", "w4_g128", "w4_kv8", "w4_kv8_a16"]


def launch(tmp_path, experiment, *overrides):
    env = dict(os.environ, WANDB_MODE="disabled", BLUELM_V_NO_PROGRESS="1", BLUELM_V_CACHE=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "bluelm_v.launch", f"+experiment={experiment}",
                          f"hydra.run.dir={run_dir}", *overrides], capture_output=True, text=True, env=env,
                         timeout=600)
    return out, run_dir


def test_experiments_compose_and_validate(compose):
    from bluelm_v import launch as launcher
    from bluelm_v import plugin_manager

    cfg = compose(["+experiment=quantize"])
    assert (cfg.job.name, cfg.llm.preset, cfg.quantizer.name) == ("quantize", "smollm2_135m", "bluelm_mixed")
    assert list(cfg.job.settings) == SETTINGS
    launcher.validate(cfg, plugin_manager.get()[1])
    cfg = compose(["+experiment=memory"])
    assert (cfg.encoder.preset, cfg.llm.preset, cfg.quantizer.name) == ("so400m", "bluelm_3b_proxy", "bluelm_mixed")
    assert (cfg.job.prompt_tokens, cfg.job.prefill_chunk, cfg.job.decode_tokens) == (2048, 128, 64)
    assert list(cfg.job.image_size) == [768, 1536] and cfg.tiler.max_grid == 4
    launcher.validate(cfg, plugin_manager.get()[1])


def test_bad_job_values_fail_before_any_work(compose):
    from bluelm_v import launch as launcher
    from bluelm_v import plugin_manager
    from bluelm_v.errors import ConfigError

    registry = plugin_manager.get()[1]
    with pytest.raises(ConfigError, match=r"job.settings: unknown \['w3'\]"):
        launcher.validate(compose(["+experiment=quantize", "llm=tiny", "job.settings=[fp32,w3]"]), registry)
    with pytest.raises(ConfigError, match="job.n_tokens"):
        launcher.validate(compose(["+experiment=quantize", "llm=tiny", "job.n_tokens=100"]), registry)
    with pytest.raises(ConfigError, match="job.image_size"):
        launcher.validate(compose(["+experiment=memory", "job.image_size=[768]"]), registry)


@pytest.mark.slow
def test_quantize_job_on_tiny_models(tmp_path):
    out, run_dir = launch(tmp_path, "quantize", "llm=tiny", "encoder=tiny", "job.encoder_presets=[tiny]",
                          "job.n_tokens=128", "job.context=64", "job.chunk=32", "job.n_images=1",
                          "job.decode_tokens=2", "job.decode_prompt=16")
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert list(s["perplexity"]) == SETTINGS and s["n_tokens"] == 128
    assert all(math.isfinite(v) and v > 1 for v in s["perplexity"].values())
    assert all(s["reload_exact"].values())
    disk = s["bytes_on_disk"]
    assert disk["w4_g64"] < disk["w8"] < disk["fp32"] and disk["w4_g32"] > disk["w4_g128"]
    assert s["speed"]["w4_kv8"]["kv_cache"] == "int8" and s["speed"]["w4_g64"]["kv_cache"] == "fp"
    assert s["encoder_cosine"]["tiny"]["mean"] > 0.99
    assert not (run_dir / "checkpoints" / "w4_g64").exists()        # keep_checkpoints: false


@pytest.mark.slow
def test_memory_job_on_tiny_models_measures_its_own_peak(tmp_path):
    out, run_dir = launch(tmp_path, "memory", "encoder=tiny", "llm=tiny", "job.decode_tokens=8",
                          "quantizer.llm_group_size=32")          # the tiny LLM is 64 wide
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert (s["crops"], s["grid"], s["prompt_tokens"], s["visual_tokens"]) == (9, [2, 4], 2048, 9 * 196)
    assert s["kv_cache"] == "Int8KVCache" or s["kv_cache"] == "Int8StaticKVCache"
    assert s["kv_cache_mb"] > 0 and s["weight_mb"]["llm"] > 0
    if s["time_v_max_rss_mb"] is not None:                           # /usr/bin/time -v agrees
        assert abs(s["peak_rss_mb"] - s["time_v_max_rss_mb"]) < 0.05 * s["time_v_max_rss_mb"]
    stages = s["stages_rss_mb"]
    assert list(stages) == ["python", "imports", "vision_loaded", "encoded", "vision_released", "llm_loaded",
                            "prefilled", "decoded"]
    assert max(v["peak_so_far_mb"] for v in stages.values()) <= s["peak_rss_mb"] + 0.5
    # staged schedule: the LLM's weights arrive only after the ViT's were given back
    for stage in ("vision_loaded", "encoded"):
        assert stages[stage]["resident_mb"]["llm"] == 0 and stages[stage]["resident_mb"]["encoder"] > 0
    assert stages["vision_released"]["resident_mb"] == {"encoder": 0, "downsampler": 0, "projector": 0, "llm": 0}
    assert stages["llm_loaded"]["resident_mb"]["llm"] > 0 and stages["llm_loaded"]["resident_mb"]["encoder"] == 0
    assert s["schedule"] == "staged" and s["transformers_imported"] is False and s["heavy_imports"] == []
