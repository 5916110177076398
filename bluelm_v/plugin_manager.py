"""The plugin manager: built-ins and third-party packages, both found through entry points.

    pm, registry = load_plugins(block=["my_tilers"], autoload=True, strict=False)

Switches:
  BLUELM_V_DISABLE_PLUGIN_AUTOLOAD=1   load only the built-in plugins (those of bluelm-v itself)
  plugins.block=[NAME, ...]            never load these entry points (by entry-point name)
  plugins.strict=true                  a plugin that fails to import is fatal (default: reported)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from . import PROJECT, hookspecs
from .errors import PluginLoadError
from .registry import Provider, Registries

ENTRY_POINT_GROUP = "bluelm_v"
DISTRIBUTION = "bluelm-v"
AUTOLOAD_ENV = "BLUELM_V_DISABLE_PLUGIN_AUTOLOAD"

@dataclass
class LoadReport:
    loaded: list[tuple[str, str]] = field(default_factory=list)       # (entry point, distribution)
    blocked: list[str] = field(default_factory=list)
    skipped_autoload: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (entry point, dist, error)


def _entry_points() -> list:
    """Every ``bluelm_v`` entry point: bluelm-v's own built-ins (pyproject.toml) and third parties'."""
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    if not any(ep.dist is not None and ep.dist.name == DISTRIBUTION for ep in eps):
        raise PluginLoadError("bluelm-v is not installed, so its built-in plugins cannot be found: "
                              "run `pip install -e .` (or `make install`) in the checkout")
    return eps


def _dist_name(ep) -> str:
    return ep.dist.name if getattr(ep, "dist", None) is not None else DISTRIBUTION


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(block: Iterable[str] = (), autoload: bool | None = None, strict: bool = False,
                 extra: Iterable[Any] = ()) -> tuple[pluggy.PluginManager, Registries, LoadReport]:
    """Load every plugin, then let each register its components with provenance recorded.
    ``extra`` are plugin objects/modules to add directly (tests, notebooks)."""
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_ENV, "") in ("", "0", "false", "False")
    block = set(block or ())
    pm, report, providers = new_manager(), LoadReport(), {}
    for ep in _entry_points():
        dist = _dist_name(ep)
        if ep.name in block:
            pm.set_blocked(ep.name)
            report.blocked.append(ep.name)
            continue
        if dist != DISTRIBUTION and not autoload:
            report.skipped_autoload.append(ep.name)
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 -- any import failure is reported the same way
            msg = f"{type(exc).__name__}: {exc}"
            report.failed.append((ep.name, dist, msg))
            if strict:
                raise PluginLoadError(f"plugin '{ep.name}' from {dist} failed to import: {msg}") from exc
            print(f"bluelm-v: warning: plugin '{ep.name}' from {dist} failed to import ({msg}); "
                  f"skipped (plugins.strict=true makes this fatal)", file=sys.stderr)
            continue
        pm.register(plugin, name=ep.name)
        providers[ep.name] = Provider(dist, getattr(plugin, "__name__", str(ep.value)), ep.name)
        report.loaded.append((ep.name, dist))
    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", f"extra{i}")
        if name in block:
            continue
        pm.register(plugin, name=name)
        providers[name] = Provider("(registered in process)", name, name)
        report.loaded.append((name, "(registered in process)"))
    registry = Registries()
    # Call each plugin's registration separately so every component records its provider.
    for impl in reversed(pm.hook.bluelm_v_register.get_hookimpls()):
        registry.current_provider = providers.get(impl.plugin_name, Provider(plugin=impl.plugin_name))
        impl.function(registry=registry)
    registry.current_provider = Provider()
    return pm, registry, report


_CACHE: dict[tuple, tuple] = {}


def get(block: Iterable[str] = (), autoload: bool | None = None, strict: bool = False):
    """Cached :func:`load_plugins` (one load per process and switch combination)."""
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_ENV, "") in ("", "0", "false", "False")
    key = (tuple(sorted(block or ())), autoload, strict)
    if key not in _CACHE:
        _CACHE[key] = load_plugins(block, autoload, strict)
    return _CACHE[key]


def from_config(cfg) -> tuple[pluggy.PluginManager, Registries, LoadReport]:
    """The plugin manager and registry for a composed config's ``plugins`` node."""
    node = cfg.get("plugins", {}) if cfg is not None else {}
    return get(list(node.get("block", []) or []), node.get("autoload", None), bool(node.get("strict", False)))
