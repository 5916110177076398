"""The generate job end to end through the launcher: streamed answer, summary.json, bad inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

TINY_LLM = ["llm=tiny", "+llm.config.num_hidden_layers=2"]


def launch(tmp_path, *overrides, name="run"):
    env = dict(os.environ, WANDB_MODE="disabled", BLUELM_V_NO_PROGRESS="1", HYDRA_FULL_ERROR="0")
    run_dir = tmp_path / name
    out = subprocess.run([sys.executable, "-m", "bluelm_v.launch", "+experiment=generate",
                          f"hydra.run.dir={run_dir}", *overrides],
                         capture_output=True, text=True, env=env, timeout=300)
    return out, run_dir


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "screen.png"
    Image.new("RGB", (768, 1536), (20, 200, 90)).save(path)
    return path


def test_experiment_defaults_match_the_issue(compose):
    cfg = compose(["+experiment=generate"])
    assert cfg.job.name == "generate" and cfg.runtime.prefill_chunk == 128
    assert (cfg.tiler.name, cfg.tiler.max_grid, cfg.tiler.thumbnail) == ("relaxed", 3, "first")
    assert (cfg.encoder.preset, cfg.downsampler.name, cfg.projector.name, cfg.llm.preset) == \
        ("tiny", "vila_2x2", "mlp2x_gelu", "smollm2_135m")


def test_generate_writes_a_summary_with_the_timings(tmp_path, photo):
    out, run_dir = launch(tmp_path, f"image={photo}", "prompt='<image>\nWhat is this?'",
                          "max_new_tokens=5", "runtime.prefill_chunk=32", *TINY_LLM)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "ok" and s["grid"] == [2, 3] and s["crops"] == 7
    assert s["visual_tokens"] == 7 * 196 and s["prompt_tokens"] > s["visual_tokens"]
    for key in ("image_encode_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_rss_mb"):
        assert isinstance(s[key], (int, float)) and s[key] >= 0, key
    assert s["config"]["runtime"]["prefill_chunk"] == 32 and s["config"]["llm"]["preset"] == "tiny"
    assert s["text"] in out.stdout       # streamed to stdout as it was generated


@pytest.mark.parametrize("case, match", [
    ("missing", "image: '.*nope.png' does not exist"),
    ("corrupt", "is not a readable image"),
    ("no_placeholder", "prompt: has 0 <image>"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, photo, case, match):
    import re

    image, prompt = str(photo), "'<image>\nx'"
    if case == "missing":
        image = str(tmp_path / "nope.png")
    elif case == "corrupt":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        image = str(bad)
    else:
        prompt = "'describe it'"
    out, _ = launch(tmp_path, f"image={image}", f"prompt={prompt}", *TINY_LLM)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and re.search(match, out.stderr), out.stderr[-1500:]


@pytest.mark.slow
def test_generate_with_the_real_smollm2(tmp_path):
    out, run_dir = launch(tmp_path, "image=null", "prompt='What is the capital of France?'",
                          "max_new_tokens=12")
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert "Paris" in s["text"] and "Paris" in out.stdout and s["visual_tokens"] == 0
