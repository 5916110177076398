"""Connecting to Ray: a local in-process cluster by default, ``ray.address=auto`` on a cluster
(what ``ray job submit`` sets up), or an explicit ``ray://``/``host:port`` address."""
from __future__ import annotations

import os


def connect(ray_cfg) -> dict:
    """Initialise Ray once per process from the ``ray`` config node; returns what was done."""
    import ray

    if ray.is_initialized():
        return {"address": "already-initialised"}
    address = ray_cfg.get("address") if ray_cfg is not None else None
    env_vars = {k: os.environ[k] for k in ("WANDB_MODE", "BLUELM_V_DISABLE_PLUGIN_AUTOLOAD",
                                            "BLUELM_V_NO_PROGRESS", "OMP_NUM_THREADS") if k in os.environ}
    kwargs = dict(ignore_reinit_error=True, log_to_driver=bool(ray_cfg.get("log_to_driver", True)),
                  runtime_env={"env_vars": env_vars} if env_vars else None)
    if address in (None, "", "local"):
        num_cpus = ray_cfg.get("num_cpus")
        ray.init(num_cpus=num_cpus, include_dashboard=bool(ray_cfg.get("include_dashboard", False)),
                 object_store_memory=ray_cfg.get("object_store_memory"), **kwargs)
        return {"address": "local", "num_cpus": ray.cluster_resources().get("CPU")}
    ray.init(address=address, **kwargs)
    return {"address": address, "num_cpus": ray.cluster_resources().get("CPU")}


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
