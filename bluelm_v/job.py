"""What a job receives: the composed config, its run directory, the registry and the hooks.

A job is a module in ``jobs/`` (installed as ``bluelm_v.jobs``) with:
    run(ctx: JobContext) -> dict            the headline figures, written to summary.json; with
                                            ``status`` "partial" or "failed" (see outcome()) when
                                            not every unit of work succeeded
    validate(cfg, registry) -> None         optional: check component names before any work
    USES = ("tiler", ...)                   the top-level component nodes it reads (families, and
                                            "deepspeed"); the launcher refuses overrides of others
    OPEN_NODES = ("job.cases",)             optional: config mappings whose keys the job checks
                                            itself (users may add keys there)
Its docstring's first line is its one-line purpose (shown by ``bluelm-v jobs``).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A tqdm progress bar on stderr (quiet when BLUELM_V_NO_PROGRESS=1 or stderr is not a TTY
    and CI is set)."""
    from tqdm.auto import tqdm

    disable = os.environ.get("BLUELM_V_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, **kw)


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays, Paths, tuples and omegaconf nodes -> plain JSON values
    (NaN/inf become null so the file stays valid JSON)."""
    if hasattr(obj, "_metadata"):
        from omegaconf import OmegaConf
        return to_jsonable(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


STATUSES = ("ok", "partial", "failed")


def outcome(ok: int, failed: int, unit: str = "cases", why: str | None = None) -> dict:
    """status/counts/reason for a job made of units of work: ``ok`` when none failed, ``failed``
    (exit code 1) when none succeeded, ``partial`` (exit code 0) otherwise. Merge it into run()'s
    result: ``return {**outcome(n_ok, n_failed, "cases", first_error), ...}``."""
    total = ok + failed
    if failed == 0:
        return {"status": "ok", "counts": {"ok": ok, "failed": 0}}
    status = "failed" if ok == 0 else "partial"
    reason = (f"all {total} {unit} failed" if ok == 0 else f"{failed} of {total} {unit} failed")
    return {"status": status, "counts": {"ok": ok, "failed": failed},
            "reason": reason + (f" (first error: {why})" if why else "")}


def write_json(path: Path | str, data: Any) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class JobContext:
    cfg: Any                 # the composed omegaconf DictConfig
    run_dir: Path
    registry: Any            # bluelm_v.registry.Registries
    pm: Any                  # pluggy.PluginManager
    job: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.pm.hook.bluelm_v_log_metrics(metrics=dict(metrics), step=step)

    def log_images(self, images: dict[str, str], step: int | None = None) -> None:
        self.pm.hook.bluelm_v_log_images(images={k: str(v) for k, v in images.items()}, step=step)

    def create(self, family: str, node=None, path: str | None = None, **wiring):
        """Build a component from a config node (default: the top-level node of that family)."""
        node = self.cfg[family] if node is None else node
        return self.registry.create_from_config(family, node, path or family, **wiring)

    def path(self, name: str) -> Path:
        return self.run_dir / name

    progress = staticmethod(progress)


def list_jobs() -> list[dict]:
    """The experiments in conf/experiment with their job and one-line description."""
    import yaml  # comes with omegaconf

    out = []
    root = resources.files("bluelm_v.conf") / "experiment"
    for item in sorted(root.iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(item.read_text()) or {}
        job = (data.get("job") or {}).get("name") if isinstance(data.get("job"), dict) else None
        if job is None:
            for d in data.get("defaults", []) or []:
                if isinstance(d, dict):
                    for k, v in d.items():
                        if k.strip("/").endswith("job") or k == "override /job":
                            job = v
        out.append({"experiment": item.name[:-5], "job": job or "?", "description": data.get("description", "")})
    return out
