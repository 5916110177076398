"""Shared by the evaluation tests: a Ray cluster whose workers see the test-only generate_batch
stand-in (tests/batch_shim, used only while the runtime has no generate_batch of its own), and
a checkpoint written the way the train job exports one."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHIM = Path(__file__).resolve().parent / "batch_shim"


def shim_environment() -> dict:
    """os.environ with the stand-in first on PYTHONPATH (for subprocesses and Ray workers)."""
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SHIM), old) if p))


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray cluster (any earlier one is shut down first) whose workers get the stand-in."""
    import ray

    sys.path.insert(0, str(SHIM))
    import sitecustomize
    sitecustomize.install()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = shim_environment()["PYTHONPATH"]
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


def write_checkpoint(compose, out: Path) -> tuple[Path, dict]:
    """A stage-2 checkpoint exactly as the train job exports it (train_tiny's model, every weight
    moved far enough from its initial value that the model answers with varied text, not at once
    with the end token)."""
    import torch
    from safetensors.torch import save_file

    from bluelm_v.checkpoint import export_train_checkpoint, tied_names
    from bluelm_v.model import BlueLMV
    from bluelm_v.plugin_manager import get

    cfg = compose(["+experiment=train_tiny"])
    torch.manual_seed(int(cfg.train.seed))
    model = BlueLMV.from_config(cfg, get()[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied_names(model)}
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"))
    info = export_train_checkpoint(cfg, {"stages_run": [1, 2], "stage2": {"model": str(out / "model.safetensors"),
                                                                          "final_loss": 1.5, "steps": 3}},
                                   out / "checkpoint")
    return out / "checkpoint", {"info": info, "state": model.state_dict()}


def compose_config(overrides: list[str]):
    """The composed config (for module-scoped fixtures; tests use conftest's ``compose``)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="bluelm_v.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)
