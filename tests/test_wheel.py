"""The conf and the built-in plugins work from an installed wheel, run from outside the repo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_composes_conf_outside_the_checkout(tmp_path):
    wheels, site, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = wheels.glob("bluelm_v-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site))
    code = (
        "import bluelm_v, json\n"
        "from hydra import compose, initialize_config_module\n"
        "from bluelm_v.plugin_manager import get\n"
        "from bluelm_v.launch import validate\n"
        "with initialize_config_module('bluelm_v.conf', version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['+experiment=ablate_tiling'])\n"
        "_, reg, rep = get()\n"
        "validate(cfg, reg)\n"
        "print(json.dumps({'file': bluelm_v.__file__, 'job': cfg.job.name, 'failed': rep.failed,\n"
        "                  'tilers': reg.tiler.names()}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(site))  # the wheel's copy, not the checkout
    assert info["job"] == "ablate_tiling" and not info["failed"]
    assert {"relaxed", "llava_next", "internvl", "single"} <= set(info["tilers"])
