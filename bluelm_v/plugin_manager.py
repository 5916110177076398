"""The plugin manager: built-ins and third-party packages, both found through entry points.

    pm, registry = load_plugins(block=["my_tilers"], autoload=True, strict=False)

Switches:
  BLUELM_V_DISABLE_PLUGIN_AUTOLOAD=1   load only the built-in plugins (those of bluelm-v itself)
  plugins.block=[NAME, ...]            never load these entry points (by entry-point name)
  plugins.strict=true                  a plugin that fails to import, and a component name two
                                       plugins register, are fatal at load (default: reported;
                                       the clashing name fails only where it is used)

Always fatal, as in pytest: a hook implementation no hookspec declares (a misspelled
``bluelm_v_*`` name; ``@hookimpl(optionalhook=True)`` exempts one), and a component whose class
does not meet its family's contract (bluelm_v.types). Both errors name the plugin and its
distribution; ``plugins.block=[NAME]`` (or uninstalling it) gets past a broken plugin.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from . import PROJECT, hookspecs
from .errors import ContractError, PluginLoadError
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
    clashes: list[str] = field(default_factory=list)   # one line per name registered twice


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
    check_hooks(pm, providers)
    registry = Registries()
    # Call each plugin's registration separately so every component records its provider.
    for impl in reversed(pm.hook.bluelm_v_register.get_hookimpls()):
        provider = providers.get(impl.plugin_name, Provider(plugin=impl.plugin_name))
        registry.current_provider = provider
        try:
            impl.function(registry=registry)
        except ContractError as exc:
            raise ContractError(f"{exc}. Fix the plugin, uninstall {provider.distribution} or block it "
                                f"with plugins.block=[{provider.plugin}]") from None
    registry.current_provider = Provider()
    for family, names in registry.clashes().items():
        for name, entries in names.items():
            report.clashes.append(f"{family} '{name}' is registered by "
                                  + " and by ".join(str(e.provider) for e in entries))
            if strict:   # the registry's own error, naming every provider
                registry[family].entry(name)
    return pm, registry, report


def check_hooks(pm: pluggy.PluginManager, providers: dict[str, Provider]) -> None:
    """pluggy's check_pending: every hook implementation matches a hookspec. Fails with one
    line naming each plugin (and distribution) and its unknown hook, with the closest name."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        known = [n for n in vars(pm.hook) if not n.startswith("_") and getattr(pm.hook, n).has_spec()]
        bad = []
        for name in sorted(vars(pm.hook)):
            caller = getattr(pm.hook, name)
            if name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                close = difflib.get_close_matches(name, known, n=1)
                where = providers.get(impl.plugin_name, Provider(plugin=impl.plugin_name))
                bad.append(f"{where.plugin_label()} implements unknown hook '{name}'"
                           + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise PluginLoadError("; ".join(bad) + f". Hooks: {', '.join(sorted(known))} "
                              "(@hookimpl(optionalhook=True) marks one meant for another version)") from None


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
