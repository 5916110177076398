"""Shared fixtures: quiet loggers, a local-only Ray, config composition, the third-party plugin package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bluelm_v.cluster import LOCAL_ENV

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("BLUELM_V_NO_PROGRESS", "1")
# Every Ray cluster a test starts (ray.init, `ray start`, the launcher's) listens on 127.0.0.1
# only, reports no usage statistics and needs a token: set before anything imports Ray.
os.environ.update(LOCAL_ENV)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_PACKAGE = Path(__file__).resolve().parent / "plugin_fixture"


@pytest.fixture
def compose():
    """compose(["+experiment=ablate_tiling", "tiler.alpha=0.2"]) -> DictConfig (with hydra.*
    when asked), every registered component selectable as `FAMILY=NAME` (as in the launcher)."""
    from hydra.core.global_hydra import GlobalHydra

    from bluelm_v.compose import compose as compose_config

    def _compose(overrides=(), return_hydra_config=False):
        return compose_config(overrides, return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def third_party_env(tmp_path_factory):
    """Install tests/plugin_fixture (a separate distribution with `bluelm_v` entry points: one
    working plugin of every family, plus a broken module) into a temporary target directory
    with pip, and return an environment that sees it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(FIXTURE_PACKAGE)],
                   check=True, capture_output=True, text=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
