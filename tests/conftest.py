"""Shared fixtures: quiet loggers, config composition, a tiny third-party plugin package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("BLUELM_V_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURE_PACKAGE = Path(__file__).resolve().parent / "plugin_fixture"


@pytest.fixture
def compose():
    """compose(["+experiment=ablate_tiling", "tiler.alpha=0.2"]) -> DictConfig (with hydra.*)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def _compose(overrides=(), return_hydra_config=False):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="bluelm_v.conf", version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def third_party_env(tmp_path_factory):
    """Install tests/plugin_fixture (a separate distribution with a `bluelm_v` entry point)
    into a temporary target directory with pip, and return an environment that sees it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(FIXTURE_PACKAGE)],
                   check=True, capture_output=True, text=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
