"""A separate plugin distribution (tests/plugin_fixture: one working plugin of every family, a
logger, a device inventory, and a module that fails to import), installed with pip into a
temporary target, is discovered through its `bluelm_v` entry points, listed by `bluelm-v
plugins`, selectable as FAMILY=NAME with no YAML in this repository, and runs through the jobs
that use it: generate (tiler, encoder, downsampler, projector, llm, engine, quantizer, logger)
and benchmark (backend, bluelm_v_devices)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "bluelm_v.cli"]
LAUNCH = [sys.executable, "-m", "bluelm_v.launch"]
FIXTURE = {"tiler": "square", "encoder": "patch_embed", "downsampler": "token_pool", "projector": "linear",
           "llm": "bag_lm", "engine": "recompute", "quantizer": "fp16_round", "backend": "wallclock"}
MODEL = [f"{family}={name}" for family, name in FIXTURE.items() if family in
         ("tiler", "encoder", "downsampler", "projector", "llm")]


def run(cmd, env, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def failure(out) -> str:
    """What a failed run printed from its first traceback on (else its last lines)."""
    err = out.stderr
    return err[err.find("Traceback"):][:6000] if "Traceback" in err else err[-3000:]


def test_every_fixture_family_is_listed_with_its_provider(third_party_env):
    out = run([*CLI, "plugins", "--json"], third_party_env, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {(r["family"], r["name"]): r for r in json.loads(out.stdout)}
    for family, name in FIXTURE.items():
        assert rows[(family, name)]["provider"] == "bluelm-v-fixture", (family, name)
    assert rows[("tiler", "square")]["description"] == "always one 384 tile"
    assert ("tiler", "relaxed") in rows  # built-ins still there
    # the broken entry point is reported with its name and exception, and skipped
    assert "square_broken" in out.stderr and "ImportError" in out.stderr


def test_autoload_switch_hides_third_party(third_party_env):
    env = dict(third_party_env, BLUELM_V_DISABLE_PLUGIN_AUTOLOAD="1")
    out = run([*CLI, "plugins", "--json"], env, timeout=120)
    names = {r["name"] for r in json.loads(out.stdout)}
    assert "square" not in names and "relaxed" in names
    assert "square_broken" not in out.stderr


def test_third_party_tiler_selectable_in_config(third_party_env):
    code = ("from bluelm_v.plugin_manager import load_plugins\n"
            "_, reg, rep = load_plugins(block=['square_broken'])\n"
            "t = reg.create_from_config('tiler', {'name': 'square', 'tile_size': 448})\n"
            "print(t.select(1000, 200), t.tile_size, rep.failed)\n")
    out = run([sys.executable, "-c", code], third_party_env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 1) 448 []"


def test_docs_show_the_fixture_files_as_they_are():
    """docs/plugins.md's examples are the tested fixture files, character for character."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "plugins.md").read_text()
    shown = dict(re.findall(r"```python\n# (tests/plugin_fixture/\S+)\n(.*?)\n```", text, re.S))
    files = sorted(p.name for p in (repo / "tests/plugin_fixture/bluelm_v_fixture").glob("*.py")
                   if p.name not in ("__init__.py", "broken.py"))
    assert sorted(Path(k).name for k in shown) == files
    for path, code in shown.items():
        assert code == (repo / path).read_text().rstrip(), f"docs/plugins.md shows an old {path}"


def test_fixture_quantizer_rounds_saves_and_loads(third_party_env, tmp_path, monkeypatch):
    import torch

    monkeypatch.syspath_prepend(third_party_env["PYTHONPATH"].split(":")[0])
    from bluelm_v_fixture.quantizers import Fp16Round

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.fill_(1.0001)                 # not a float16 value: 1 + 2**-10 is the next one
    q = Fp16Round(targets=["all"])
    q.apply(model)
    assert model[0].weight[0, 0].item() == 1.0 and q.describe()["rounded_tensors"] == 2
    q.save(model, tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8))
    q.load(fresh, tmp_path)
    assert torch.equal(fresh[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="saved with"):
        Fp16Round(targets=["llm"]).load(fresh, tmp_path)
    from bluelm_v.nn.meta_build import RandomInit

    with torch.device("meta"):                        # the memory job's way: built on meta, filled per layer
        meta = torch.nn.Sequential(torch.nn.Linear(8, 8))
    Fp16Round(targets=["all"]).apply(meta, materialize=RandomInit(0))
    assert not meta[0].weight.is_meta and torch.equal(meta[0].weight, meta[0].weight.half().float())


def test_fixture_model_engine_quantizer_and_logger_through_generate(third_party_env, tmp_path):
    """FAMILY=NAME selects each third-party component with its signature's defaults (no YAML here);
    the experiment's settings for its own tiler (max_grid, thumbnail) are not carried over."""
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (640, 480), (20, 120, 220)).save(image)
    run_dir = tmp_path / "run"
    out = run([*LAUNCH, "+experiment=generate", f"hydra.run.dir={run_dir}", "plugins.block=[square_broken]",
               *MODEL, "engine=recompute", "quantizer=fp16_round", "quantizer.targets=[all]", f"image={image}",
               "max_new_tokens=4", "stream=false"], third_party_env)
    assert out.returncode == 0, failure(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["new_tokens"] == 4 and summary["engine"] == "recompute"
    assert summary["grid"] == [1, 1] and summary["crops"] == 1
    assert summary["visual_tokens"] == 36                      # (384/32)^2 = 144 patches, pooled by 4
    assert summary["config"]["tiler"] == {"name": "square", "tile_size": 384}
    assert summary["config"]["encoder"] == {"name": "patch_embed", "image_size": 384, "patch": 32,
                                            "hidden_size": 32, "tiles_per_batch": 4, "seed": 0}
    assert summary["not_applied"] == ["tiler.max_grid", "tiler.thumbnail"]
    events = [json.loads(line) for line in (run_dir / "fixture_events.jsonl").read_text().splitlines()]
    assert events[0] == {"event": "start", "job": "generate", "tiler": "square"}
    assert events[-1] == {"event": "end", "job": "generate", "status": "ok"}
    assert any(e["event"] == "metrics" and e["metrics"]["prefill_s"] > 0 for e in events)


@pytest.mark.slow
def test_fixture_backend_and_device_inventory_through_benchmark(third_party_env, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(third_party_env, BLUELM_V_FIXTURE_DEVICES="hooked-host")
    out = run([*LAUNCH, "+experiment=benchmark", f"hydra.run.dir={run_dir}", "plugins.block=[square_broken]",
               *MODEL, "job.devices=[{name: host, backend: {name: wallclock}}]", "~job.cases.vary",
               "job.cases.base.quantizer={name: fp16_round}", "job.cases.base.prompt_tokens=256",
               "job.warmup=0", "job.trials=2", "job.extra_trials=0", "job.plots=false", "ray.num_cpus=1"], env)
    assert out.returncode == 0, failure(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["cases"] == 2 and summary["ok"] == 2
    for device in ("host", "hooked-host"):                     # config inventory + the hook's device
        dev = summary["devices"][device]
        assert dev["backend"] == "wallclock" and dev["load"]["backend"]["engine"] == "recompute"
        base = dev["base"]
        assert base["grid"] == "1:1" and base["prefill_s"] > 0 and base["decode_tokens_per_s"] > 0
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert {r["case"]["quantizer"]["name"] for r in records} == {"fp16_round"}
    assert all(r["metrics"]["prompt_tokens"] == 256 and r["trials"] == 2 for r in records)


@pytest.mark.slow
def test_third_party_tiler_in_the_ablation_job(third_party_env, tmp_path):
    manifest = tmp_path / "sizes.csv"
    manifest.write_text("width,height\n640,480\n394,390\n380,76\n1920,1080\n")
    run_dir = tmp_path / "run"
    cmd = [*LAUNCH, "+experiment=ablate_tiling", f"hydra.run.dir={run_dir}",
           f"dataset.manifest={manifest}", "ablation.tilers=[relaxed,square]", "ray.num_cpus=1",
           "plugins.block=[square_broken]"]
    out = run(cmd, third_party_env, timeout=300)
    assert out.returncode == 0, failure(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["n_images"] == 4
    pair = summary["pairs"]["relaxed_vs_square"]
    # square always picks 1 tile, relaxed picks >= 1: relaxed is never smaller
    assert pair["smaller"] == 0 and pair["larger"] + pair["same"] == 4


def test_strict_mode_fails_on_the_broken_plugin(third_party_env, tmp_path):
    cmd = [*LAUNCH, "+experiment=ablate_tiling", f"hydra.run.dir={tmp_path}", "plugins.strict=true"]
    out = run(cmd, third_party_env, timeout=120)
    assert out.returncode == 2
    assert "square_broken" in out.stderr and "bluelm-v-fixture" in out.stderr
    assert "Traceback" not in out.stderr
