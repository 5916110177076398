"""Run a job: ``python -m bluelm_v.launch +experiment=NAME [overrides]`` (= ``bluelm-v run ...``).

Loads the plugins (no torch), gives every registered component without a YAML in conf/ a config
node (so ``tiler=NAME`` selects any installed tiler), composes the Hydra config (conf/, shipped as
``pkg://bluelm_v.conf``), refuses unknown keys and options the job does not use, checks every
component name and parameter before any work starts, connects to Ray, runs the job named by
``job.name``, writes ``summary.json`` into the run directory and prints its path.

    python -m bluelm_v.launch +experiment=ablate_tiling
    python -m bluelm_v.launch +experiment=ablate_tiling hydra.run.dir=/tmp/run1 ray.num_cpus=2
    ray job submit --working-dir . -- python -m bluelm_v.launch +experiment=ablate_tiling ray=cluster

Exit codes: 0 ok or partial (summary.json's ``status`` says which), 1 the job failed (every unit of
work failed, or a crash: the reason is printed and in summary.json), 2 a user error (one line:
Hydra's errors included; those stop before the run directory exists, so they write no
summary.json), 130 interrupted.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from importlib import import_module
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from . import FAMILIES
from . import compose as composition
from . import plugin_manager as plugins
from .compose import WIRING  # noqa: F401 -- re-exported: the parameters the framework wires itself
from .errors import BlueLMVError, ConfigError
from .job import STATUSES, JobContext, list_jobs, write_json

PIXELS_ENV = "BLUELM_V_MAX_IMAGE_PIXELS"   # images.max_pixels, for the job and its workers
_FULL_ERROR = "HYDRA_FULL_ERROR"           # "1": Hydra raises its errors instead of printing them
_RAISING = {"set_by_main": False}


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
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: needs a value (set it with {missing[0]}=VALUE)")
    mod = job_module(cfg.job.name)
    used = composition.uses(mod)
    for family in FAMILIES:
        if cfg.get(family) is not None and family in used:
            registry.validate_node(family, cfg[family], family, WIRING.get(family, ()))
    if hasattr(mod, "validate"):
        mod.validate(cfg, registry)


def _image_limit(cfg) -> None:
    """images.max_pixels -> BLUELM_V_MAX_IMAGE_PIXELS (read where images are opened, here and in
    the Ray workers, which inherit it: bluelm_v.cluster forwards it)."""
    node = cfg.get("images") or {}
    limit = node.get("max_pixels", None) if hasattr(node, "get") else None
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"images.max_pixels: a positive integer (or null: no limit), got {limit!r}")
    os.environ[PIXELS_ENV] = "none" if limit is None else str(limit)


def _drop(cfg: DictConfig, paths: list[str]) -> list[str]:
    """Remove the experiment's settings for a component the user replaced (see
    compose.experiment_leftovers), saying so."""
    for path in paths:
        family, key = path.split(".", 1)
        with open_dict(cfg):
            del cfg[family][key]
    if paths:
        family = paths[0].split(".")[0]
        print(f"bluelm-v: note: {', '.join(paths)} (set by the experiment for its own {family}) not applied: "
              f"{family} '{cfg[family].name}' has no such parameter", file=sys.stderr)
    return paths


def _finish(job: str, result: dict, wall_s: float, report) -> dict:
    """The job's result -> summary.json: its status (ok unless the job says partial/failed)."""
    status = result.get("status", "ok")
    if status not in STATUSES:
        raise ValueError(f"job {job} returned status {status!r}; expected one of {STATUSES}")
    summary = {"job": job, **result, "status": status, "wall_s": round(wall_s, 3),
               "plugins_failed": [f"{n} ({d}): {e}" for n, d, e in report.failed]}
    if status != "ok" and not summary.get("reason"):
        summary["reason"] = f"the job ended {status}"
    return summary


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, schema=None) -> dict:
    """Everything the launcher does after composition (also used by tests and notebooks).
    With the command line's ``overrides`` the keys are checked too, against ``schema`` (the config
    without the user's key=value overrides; composed here inside a Hydra run when not given).
    summary.json is written whatever stops the job."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = str(cfg.get("job", {}).get("name") or "?")
    t0 = time.perf_counter()
    summary: dict = {"job": job, "status": "failed"}
    pm = started = None
    try:
        pm, registry, report = plugins.from_config(cfg)
        dropped = []
        if overrides is not None:
            schema = composition.schema(overrides) if schema is None else schema
            composition.check_overrides(cfg, overrides, schema, job_module(job), registry)
            dropped = _drop(cfg, composition.experiment_leftovers(cfg, overrides, registry))
        validate(cfg, registry)
        _image_limit(cfg)
        mod = job_module(cfg.job.name)
        ctx = JobContext(cfg=cfg, run_dir=run_dir, registry=registry, pm=pm, job=job)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        from . import cluster
        if cfg.job.get("uses_ray", True):
            cluster.connect(cfg.get("ray"))
        pm.hook.bluelm_v_job_start(job=job, config=OmegaConf.to_container(cfg, resolve=True), run_dir=str(run_dir))
        started = True
        summary = _finish(job, mod.run(ctx) or {}, time.perf_counter() - t0, report)
        if dropped:
            summary["not_applied"] = dropped
        return summary
    except BaseException as exc:
        user = isinstance(exc, BlueLMVError)
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        summary = {"job": job, "status": status, "reason": str(exc) if user else f"{type(exc).__name__}: {exc}",
                   "error": type(exc).__name__, "exit_code": 2 if user else 130 if status == "interrupted" else 1,
                   "stage": "running" if started else "checking the config",
                   "wall_s": round(time.perf_counter() - t0, 3)}
        raise
    finally:
        write_json(run_dir / "summary.json", summary)
        if started:
            pm.hook.bluelm_v_job_end(job=job, summary=summary, run_dir=str(run_dir), status=summary["status"])


def _report(job: str, summary: dict, run_dir: Path) -> int:
    """Print the outcome; the exit code."""
    status = summary["status"]
    headline = {k: v for k, v in summary.items()
                if isinstance(v, (int, float, str)) and k not in ("job", "status", "reason")}
    figures = ", ".join(f"{k}={v}" for k, v in list(headline.items())[:8])
    if status == "failed":
        print(f"bluelm-v: {job} failed: {summary.get('reason')}", file=sys.stderr)
    elif status == "partial":
        print(f"bluelm-v: {job} finished partially: {summary.get('reason')}", file=sys.stderr)
    print(f"bluelm-v: {job} finished: status={status}" + (f", {figures}" if figures else ""))
    print(f"summary: {run_dir / 'summary.json'}")
    return 1 if status == "failed" else 0


@hydra.main(version_base="1.3", config_path="pkg://bluelm_v.conf", config_name="config")
def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if _RAISING["set_by_main"]:                  # set by main() for Hydra's own errors only
        os.environ.pop(_FULL_ERROR, None)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        summary = run(cfg, run_dir, list(hc.overrides.task))
    except BlueLMVError as exc:
        print(f"bluelm-v: error: {exc}", file=sys.stderr)
        print(f"bluelm-v: summary.json and partial results (if any) are in {run_dir}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nbluelm-v: interrupted; partial results are in {run_dir}", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        print(f"bluelm-v: the job failed; partial results and summary.json are in {run_dir}", file=sys.stderr)
        sys.exit(1)
    code = _report(str(cfg.job.name), summary, run_dir)
    if code:
        sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """The command line: component nodes first, then Hydra; Hydra's errors as one line, exit 2."""
    saved_argv = list(sys.argv)
    if argv is not None:                       # called from Python: Hydra reads sys.argv
        sys.argv = [sys.argv[0], *argv]
    try:
        _main(composition.command_line_overrides(sys.argv[1:]))
    finally:
        sys.argv = saved_argv


def _main(overrides: list[str]) -> None:
    try:
        switches = composition.plugin_switches(overrides)
        _, registry, _ = plugins.get(switches.get("block") or (), switches.get("autoload"))
        composition.store_component_nodes(registry)
    except BlueLMVError as exc:
        print(f"bluelm-v: error: {exc}", file=sys.stderr)
        sys.exit(2)
    mine = _FULL_ERROR not in os.environ       # the user's HYDRA_FULL_ERROR=1 keeps Hydra's traceback
    if mine:
        os.environ[_FULL_ERROR] = "1"
        _RAISING["set_by_main"] = True
    try:
        _task()
    except Exception as exc:  # noqa: BLE001 -- _task handles the job's own errors; these are Hydra's
        if not mine:
            raise
        print(f"bluelm-v: error: {composition.one_line(exc, overrides, composition.schema_tree(overrides))}",
              file=sys.stderr)
        print("bluelm-v: stopped while composing the config: no run directory, no summary.json", file=sys.stderr)
        sys.exit(2)
    finally:
        if mine:
            os.environ.pop(_FULL_ERROR, None)
            _RAISING["set_by_main"] = False


if __name__ == "__main__":
    main()
