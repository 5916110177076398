"""Built-in metrics logger: Weights & Biases, offline by default (no API key is needed).

Mode: ``logging.wandb.mode`` (offline | online | disabled); the WANDB_MODE environment
variable wins, so tests run with WANDB_MODE=disabled. Offline runs land in RUN_DIR/wandb and
can be uploaded later with ``wandb sync RUN_DIR/wandb/offline-run-*``.
"""
from __future__ import annotations

import os

from bluelm_v import hookimpl

_state: dict = {"run": None}


def _mode(config: dict) -> str:
    return os.environ.get("WANDB_MODE") or (config.get("logging", {}).get("wandb", {}) or {}).get("mode", "offline")


@hookimpl
def bluelm_v_job_start(job, config, run_dir):
    mode = _mode(config)
    if mode == "disabled":
        _state["run"] = None
        return
    import wandb

    wb = config.get("logging", {}).get("wandb", {}) or {}
    _state["run"] = wandb.init(project=wb.get("project", "bluelm-v"), entity=wb.get("entity"),
                               name=f"{job}-{os.path.basename(run_dir)}", job_type=job,
                               dir=run_dir, mode=mode, config=config, reinit="finish_previous")


@hookimpl
def bluelm_v_log_metrics(metrics, step):
    run = _state["run"]
    if run is not None:
        run.log(dict(metrics), step=step)


@hookimpl
def bluelm_v_log_images(images, step):
    run = _state["run"]
    if run is not None:
        import wandb

        run.log({k: wandb.Image(v) for k, v in images.items()}, step=step)


@hookimpl
def bluelm_v_job_end(job, summary, run_dir, status):
    run = _state["run"]
    if run is None:
        return
    for k, v in summary.items():
        if isinstance(v, (int, float, str)):
            run.summary[k] = v
    run.finish(exit_code=0 if status == "ok" else 1)
    _state["run"] = None
