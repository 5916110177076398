"""Run a job: ``python -m bluelm_v.launch +experiment=NAME [overrides]``.

Composes the Hydra config (conf/, shipped as ``pkg://bluelm_v.conf``), loads the plugins,
checks every component name and parameter before any work starts, connects to Ray, runs the
job named by ``job.name``, writes ``summary.json`` into the run directory and prints its path.

    python -m bluelm_v.launch +experiment=ablate_tiling
    python -m bluelm_v.launch +experiment=ablate_tiling hydra.run.dir=/tmp/run1 ray.num_cpus=2
    ray job submit --working-dir . -- python -m bluelm_v.launch +experiment=ablate_tiling ray.address=auto

User errors (unknown names, bad parameters, unusable inputs) print one line and exit with 2.
"""
from __future__ import annotations

import sys
import time
import traceback
from importlib import import_module
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from . import FAMILIES
from . import plugin_manager as plugins
from .errors import BlueLMVError, ConfigError
from .job import JobContext, list_jobs, write_json

# Parameters the framework passes to a factory itself (not set in config).
WIRING = {"downsampler": ("in_dim",), "projector": ("in_dim", "out_dim"), "engine": ("model",)}


def job_module(name: str):
    try:
        return import_module(f"bluelm_v.jobs.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bluelm_v.jobs.{name}":
            raise
        known = ", ".join(sorted({j["job"] for j in list_jobs()}))
        raise ConfigError(f"job.name: no job '{name}'. Jobs: {known}") from None


def validate(cfg: DictConfig, registry) -> None:
    """Every top-level component node names a registered component with valid parameters;
    the job may check more (e.g. the list of tilers an ablation compares)."""
    if "job" not in cfg or not cfg.job.get("name"):
        raise ConfigError("job.name: no job selected. Pick one with +experiment=NAME (see `bluelm-v jobs`)")
    for family in FAMILIES:
        if cfg.get(family) is not None:
            registry.validate_node(family, cfg[family], family, WIRING.get(family, ()))
    mod = job_module(cfg.job.name)
    if hasattr(mod, "validate"):
        mod.validate(cfg, registry)


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Everything the launcher does after composition (also used by tests and notebooks)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pm, registry, report = plugins.from_config(cfg)
    validate(cfg, registry)
    mod = job_module(cfg.job.name)
    ctx = JobContext(cfg=cfg, run_dir=run_dir, registry=registry, pm=pm, job=cfg.job.name)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    from . import cluster
    if cfg.job.get("uses_ray", True):
        cluster.connect(cfg.get("ray"))
    pm.hook.bluelm_v_job_start(job=cfg.job.name, config=plain_cfg, run_dir=str(run_dir))
    t0 = time.perf_counter()
    summary: dict = {"job": cfg.job.name, "status": "failed"}
    try:
        result = mod.run(ctx) or {}
        summary = {"job": cfg.job.name, "status": "ok", **result,
                   "wall_s": round(time.perf_counter() - t0, 3),
                   "plugins_failed": [f"{n} ({d}): {e}" for n, d, e in report.failed]}
        return summary
    except BaseException as exc:
        summary = {"job": cfg.job.name, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                   "wall_s": round(time.perf_counter() - t0, 3)}
        raise
    finally:
        write_json(run_dir / "summary.json", summary)
        pm.hook.bluelm_v_job_end(job=cfg.job.name, summary=summary, run_dir=str(run_dir),
                                 status=summary["status"])


@hydra.main(version_base="1.3", config_path="pkg://bluelm_v.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except BlueLMVError as exc:
        print(f"bluelm-v: error: {exc}", file=sys.stderr)
        print(f"bluelm-v: partial results (if any) are in {run_dir}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nbluelm-v: interrupted; partial results are in {run_dir}", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        print(f"bluelm-v: the job failed; partial results and summary.json are in {run_dir}", file=sys.stderr)
        sys.exit(1)
    headline = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and k != "job"}
    print(f"bluelm-v: {cfg.job.name} finished: " + ", ".join(f"{k}={v}" for k, v in list(headline.items())[:8]))
    print(f"summary: {run_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
