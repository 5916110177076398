"""Shared by the evaluation tests: a small Ray cluster of their own, and a checkpoint written the
way the train job exports one."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray cluster (any earlier one in this process is shut down first)."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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
    from bluelm_v.compose import compose

    return compose(overrides)
