"""Connecting to Ray: a local cluster started here by default, ``ray.address=auto`` on a cluster
(what ``ray job submit`` sets up), or an explicit ``ray://``/``host:port`` address. A job that
``ray job submit`` started (RAY_ADDRESS set) joins that cluster in any case; a cluster that a
``ray start`` on this machine left running is never joined unless asked for.

A cluster started here stays on this machine (conf/ray/local.yaml):
  loopback_only: true   Ray's single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what Ray uses
                        on macOS and Windows): the node IP is 127.0.0.1, so the GCS, the raylet,
                        the object manager, the workers, the dashboard agent, the runtime-env agent
                        and the metrics exporter all listen on 127.0.0.1 only
  usage_stats: false    RAY_USAGE_STATS_ENABLED=0: nothing is reported to Ray's usage server
  auth: token           RAY_AUTH_MODE=token: every client needs the token (Ray keeps it in
                        ~/.ray/auth_token, or RAY_AUTH_TOKEN)
The same variables make a head started by ``ray start`` local (README: "Submitting to a Ray
cluster"); :data:`LOCAL_ENV` holds them. They are set before Ray is imported where possible, since
Ray reads them at import and its processes inherit them.
"""
from __future__ import annotations

import os
import sys

# What a local, loopback-only, authenticated Ray without usage statistics needs in the environment.
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
# Passed on to every Ray worker of a job (they do not inherit the driver's environment on a cluster).
FORWARDED_ENV = ("WANDB_MODE", "BLUELM_V_DISABLE_PLUGIN_AUTOLOAD", "BLUELM_V_NO_PROGRESS", "OMP_NUM_THREADS",
                 "BLUELM_V_MAX_IMAGE_PIXELS")


def local_env(ray_cfg) -> dict[str, str]:
    """The environment a cluster started here gets, from the ``ray`` config node."""
    get = ray_cfg.get if ray_cfg is not None else (lambda key, default=None: default)
    env = {"RAY_USAGE_STATS_ENABLED": "1" if get("usage_stats", False) else "0",
           "RAY_AUTH_MODE": str(get("auth", "token") or "disabled")}
    if get("loopback_only", True):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _apply(env: dict[str, str]) -> None:
    os.environ.update(env)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        # Ray was imported before this call (a notebook, a test): it read the switch at import.
        constants.ENABLE_RAY_CLUSTER = False


def connect(ray_cfg) -> dict:
    """Initialise Ray once per process from the ``ray`` config node; returns what was done."""
    address = ray_cfg.get("address") if ray_cfg is not None else None
    if address in (None, "", "local") and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]     # set by `ray job submit` (or the user): join that cluster
    local = address in (None, "", "local")
    if local:
        _apply(local_env(ray_cfg))
    import ray

    if ray.is_initialized():
        return {"address": "already-initialised"}
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    get = ray_cfg.get if ray_cfg is not None else (lambda key, default=None: default)
    kwargs = dict(ignore_reinit_error=True, log_to_driver=bool(get("log_to_driver", True)),
                  runtime_env={"env_vars": env_vars} if env_vars else None)
    if local:   # "local": a new cluster, not the one a `ray start` on this machine left behind
        ray.init(address="local", num_cpus=get("num_cpus"), dashboard_host="127.0.0.1",
                 include_dashboard=bool(get("include_dashboard", False)),
                 object_store_memory=get("object_store_memory"), **kwargs)
        return {"address": "local", "num_cpus": ray.cluster_resources().get("CPU")}
    ray.init(address=address, **kwargs)
    return {"address": address, "num_cpus": ray.cluster_resources().get("CPU")}


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
