"""The built-in wandb logger plugin writes an offline run (no API key) into the run directory."""
from __future__ import annotations

import pytest

from bluelm_v.plugin_manager import load_plugins


@pytest.mark.slow
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    pm, _, _ = load_plugins(autoload=False)
    config = {"logging": {"wandb": {"mode": "offline", "project": "bluelm-v-test"}}}
    pm.hook.bluelm_v_job_start(job="unit", config=config, run_dir=str(tmp_path))
    for step in range(3):
        pm.hook.bluelm_v_log_metrics(metrics={"loss": 1.0 / (step + 1)}, step=step)
    pm.hook.bluelm_v_job_end(job="unit", summary={"n": 3}, run_dir=str(tmp_path), status="ok")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("*.wandb"))
    assert files and files[0].stat().st_size > 0


def test_disabled_mode_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    pm, _, _ = load_plugins(autoload=False)
    pm.hook.bluelm_v_job_start(job="unit", config={}, run_dir=str(tmp_path))
    pm.hook.bluelm_v_log_metrics(metrics={"loss": 1.0}, step=0)
    pm.hook.bluelm_v_job_end(job="unit", summary={}, run_dir=str(tmp_path), status="ok")
    assert not (tmp_path / "wandb").exists()
