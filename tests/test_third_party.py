"""A separate plugin distribution (tests/plugin_fixture, installed with pip into a temporary
target) is discovered through its `bluelm_v` entry point, shows in `bluelm-v plugins` and is
selectable by name; its broken sibling is reported and does not stop the others."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "bluelm_v.cli"]


def test_fixture_tiler_is_listed_with_its_provider(third_party_env):
    out = subprocess.run([*CLI, "plugins", "--json"], capture_output=True, text=True, env=third_party_env, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {(r["family"], r["name"]): r for r in json.loads(out.stdout)}
    assert rows[("tiler", "square")]["provider"] == "bluelm-v-square"
    assert rows[("tiler", "square")]["description"] == "always one 384 tile"
    assert ("tiler", "relaxed") in rows  # built-ins still there
    # the broken entry point is reported with its name and exception, and skipped
    assert "square_broken" in out.stderr and "ImportError" in out.stderr


def test_autoload_switch_hides_third_party(third_party_env):
    env = dict(third_party_env, BLUELM_V_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run([*CLI, "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    names = {r["name"] for r in json.loads(out.stdout)}
    assert "square" not in names and "relaxed" in names
    assert "square_broken" not in out.stderr


def test_third_party_tiler_selectable_in_config(third_party_env):
    code = ("from bluelm_v.plugin_manager import load_plugins\n"
            "_, reg, rep = load_plugins(block=['square_broken'])\n"
            "t = reg.create_from_config('tiler', {'name': 'square', 'tile_size': 448})\n"
            "print(t.select(1000, 200), t.tile_size, rep.failed)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=third_party_env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 1) 448 []"


@pytest.mark.slow
def test_third_party_tiler_in_the_ablation_job(third_party_env, tmp_path):
    manifest = tmp_path / "sizes.csv"
    manifest.write_text("width,height\n640,480\n394,390\n380,76\n1920,1080\n")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bluelm_v.launch", "+experiment=ablate_tiling", f"hydra.run.dir={run_dir}",
           f"dataset.manifest={manifest}", "ablation.tilers=[relaxed,square]", "ray.num_cpus=1",
           "plugins.block=[square_broken]"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=third_party_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["n_images"] == 4
    pair = summary["pairs"]["relaxed_vs_square"]
    # square always picks 1 tile, relaxed picks >= 1: relaxed is never smaller
    assert pair["smaller"] == 0 and pair["larger"] + pair["same"] == 4


def test_strict_mode_fails_on_the_broken_plugin(third_party_env, tmp_path):
    cmd = [sys.executable, "-m", "bluelm_v.launch", "+experiment=ablate_tiling", f"hydra.run.dir={tmp_path}",
           "plugins.strict=true"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=third_party_env, timeout=120)
    assert out.returncode == 2
    assert "square_broken" in out.stderr and "bluelm-v-square" in out.stderr
    assert "Traceback" not in out.stderr
