"""One Registry per component family, populated by plugins (see hookspecs.bluelm_v_register).

    registry.tiler.register("square", SquareTiler, description="always one 384 tile")
    registry.tiler.names("l*")                  -> ["llava_next"]
    registry.tiler.describe("relaxed")          -> {"provider": ..., "parameters": {...}}
    registry.tiler.create("relaxed", alpha=0.1) -> a tiler object
    registry.create_from_config("tiler", {"name": "relaxed", "alpha": 0.1})

Parameters are checked against the factory's signature before anything is built: an unknown
key, a value of the wrong type or one outside a declared range fails with its key path.

Shapes are checked against the family's Protocol (bluelm_v.types): a class factory when it
registers, every created object when ``create`` returns it; either fails with ContractError
naming the component, its plugin and what is missing. Two registrations of one name are both
kept and listed (``rows``), and the name is unusable (DuplicateComponentError naming both)
until one plugin is blocked or uninstalled.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from . import FAMILIES
from .errors import ConfigError, ContractError, DuplicateComponentError, UnknownComponentError
from .types import CONTRACTS, contract_problems

_NO_DEFAULT = "<required>"


@dataclass
class Provider:
    """Where a registration came from: the distribution and module of the plugin."""

    distribution: str = "unknown"
    module: str = "unknown"
    plugin: str = "unknown"

    def __str__(self) -> str:
        return f"{self.distribution} ({self.module})"

    def plugin_label(self) -> str:
        return f"plugin '{self.plugin}' from {self.distribution}"


@dataclass
class Entry:
    family: str
    name: str
    factory: Callable[..., Any]
    description: str
    provider: Provider
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    choices: dict[str, tuple] = field(default_factory=dict)
    requires: Callable[[], str | None] | None = None   # -> why it cannot run on this machine, or None

    def parameters(self) -> dict[str, inspect.Parameter]:
        target = self.factory.__init__ if inspect.isclass(self.factory) else self.factory
        params = dict(inspect.signature(target).parameters)
        params.pop("self", None)
        return params

    def accepts_any_keyword(self) -> bool:
        return any(p.kind is p.VAR_KEYWORD for p in self.parameters().values())


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of a config value against a simple annotation (unknown forms pass)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if isinstance(annotation, str):  # postponed annotations: evaluate the simple ones only
        table = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "tuple": tuple, "dict": dict}
        base = annotation.split("|")
        kinds = [table.get(b.strip()) for b in base]
        if "None" in [b.strip() for b in base] and value is None:
            return True
        kinds = [k for k in kinds if k is not None]
        if not kinds:
            return True
        return any(_type_ok(value, k) for k in kinds)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (list, tuple):
        return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"
    if annotation is dict:
        return isinstance(value, Mapping) or type(value).__name__ == "DictConfig"
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


class Registry:
    """The registered components of one family (tiler, encoder, ...)."""

    def __init__(self, family: str, owner: "Registries | None" = None):
        self.family = family
        self._entries: dict[str, Entry] = {}
        self._clashes: dict[str, list[Entry]] = {}    # name -> every registration of it
        self._owner = owner

    # -- registration -----------------------------------------------------------------------
    def register(self, name: str, factory: Callable[..., Any], description: str = "", *,
                 ranges: Mapping[str, tuple] | None = None, choices: Mapping[str, tuple] | None = None,
                 requires: Callable[[], str | None] | None = None):
        """Add ``factory`` under ``name``. ``ranges`` maps a parameter to (low, high), inclusive,
        either end None; ``choices`` maps a parameter to its allowed values; ``requires()``
        returns why the component cannot run on this machine (None: it can), checked with the
        config before any work starts."""
        if not name or not isinstance(name, str):
            raise ConfigError(f"{self.family}: a component name must be a non-empty string, got {name!r}")
        provider = self._owner.current_provider if self._owner else Provider()
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        entry = Entry(self.family, name, factory, doc, provider, dict(ranges or {}),
                      {k: tuple(v) for k, v in (choices or {}).items()}, requires)
        if inspect.isclass(factory):       # a function's objects are checked when created
            self._check_contract(entry, factory)
        if name in self._entries:
            self._clashes.setdefault(name, [self._entries[name]]).append(entry)
        else:
            self._entries[name] = entry
        return factory

    def _check_contract(self, entry: Entry, obj: Any) -> None:
        problems = contract_problems(self.family, obj)
        if problems:
            what = getattr(obj if inspect.isclass(obj) else type(obj), "__qualname__", "?")
            raise ContractError(
                f"{self.family} '{entry.name}' ({what}, {entry.provider.plugin_label()}) does not meet the "
                f"{self.family} contract (bluelm_v.types.{CONTRACTS[self.family].__name__}): {', '.join(problems)}")

    # -- lookup -----------------------------------------------------------------------------
    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clashes(self) -> dict[str, list[Entry]]:
        """Names registered more than once -> every registration of each."""
        return {n: list(es) for n, es in self._clashes.items()}

    def entry(self, name: str, path: str | None = None) -> Entry:
        path = path or self.family
        if name in self._clashes:
            es = self._clashes[name]
            raise DuplicateComponentError(
                f"{path}: {self.family} '{name}' is registered {len(es)} times: by "
                + " and by ".join(str(e.provider) for e in es)
                + f". Uninstall one of them or block one with plugins.block=[{es[-1].provider.plugin}]")
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = "; ".join(f"'{c}' from {self._entries[c].provider}" for c in close)
        known = ", ".join(self.names()) or "(none: is the plugin that provides it installed?)"
        raise UnknownComponentError(
            f"{path}: no {self.family} named '{name}'. "
            + (f"Did you mean {hint}? " if hint else "")
            + f"Registered {self.family}s: {known}. See `bluelm-v plugins`.")

    def describe(self, name: str) -> dict[str, Any]:
        return self._describe(self.entry(name))

    def _describe(self, e: Entry) -> dict[str, Any]:
        name = e.name
        params = {}
        for pname, p in e.parameters().items():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            params[pname] = _NO_DEFAULT if p.default is p.empty else p.default
        return {"family": self.family, "name": name, "provider": e.provider.distribution,
                "module": e.provider.module, "plugin": e.provider.plugin,
                "description": e.description, "parameters": params,
                "ranges": {k: list(v) for k, v in e.ranges.items()},
                "choices": {k: list(v) for k, v in e.choices.items()}}

    # -- validation and creation ----------------------------------------------------------
    def validate(self, name: str, params: Mapping[str, Any], path: str | None = None,
                 wiring: tuple[str, ...] = ()) -> Entry:
        """Check ``params`` against the factory of ``name`` without building anything.
        ``wiring`` names parameters the framework passes itself (e.g. a projector's in_dim)."""
        path = path or self.family
        e = self.entry(name, path)
        sig = e.parameters()
        for key, value in params.items():
            if key not in sig:
                if e.accepts_any_keyword():
                    continue
                close = difflib.get_close_matches(key, list(sig), n=1)
                accepted = ", ".join(k for k in sig if k not in wiring) or "none"
                raise ConfigError(f"{path}.{key}: unknown parameter for {self.family} '{name}'"
                                  + (f" (did you mean '{close[0]}'?)" if close else "")
                                  + f". Accepted: {accepted}")
            ann = sig[key].annotation
            if not _type_ok(value, ann):
                want = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
                raise ConfigError(f"{path}.{key}: expected {want}, got {type(value).__name__} {value!r}")
            if key in e.ranges and value is not None:
                lo, hi = e.ranges[key]
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    raise ConfigError(f"{path}.{key}: {value!r} is out of range [{lo}, {hi}]")
            if key in e.choices and value not in e.choices[key]:
                raise ConfigError(f"{path}.{key}: {value!r} is not one of {list(e.choices[key])}")
        missing = [k for k, p in sig.items() if p.default is p.empty and k not in params
                   and k not in wiring and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if missing:
            raise ConfigError(f"{path}: {self.family} '{name}' needs parameter(s) {', '.join(missing)}")
        reason = e.requires() if e.requires is not None else None
        if reason:
            raise ConfigError(f"{path}: {self.family} '{name}' cannot run on this machine: {reason}")
        return e

    def create(self, name: str, *, _path: str | None = None, **params):
        e = self.validate(name, {k: v for k, v in params.items()}, _path,
                          wiring=tuple(k for k in params))
        try:
            made = e.factory(**params)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{_path or self.family} ({self.family} '{name}'): {exc}") from exc
        self._check_contract(e, made)
        return made

    def rows(self) -> list[dict[str, Any]]:
        """One row per registration (both of a clashing name, each with ``clash``: the others)."""
        out = []
        for name in self.names():
            if name not in self._clashes:
                out.append(self._describe(self._entries[name]))
                continue
            es = self._clashes[name]
            for e in es:
                out.append({**self._describe(e), "clash": [str(o.provider) for o in es if o is not e]})
        return out


class Registries:
    """All eight families: ``registry.tiler``, ``registry.encoder``, ..."""

    def __init__(self, families=FAMILIES):
        self.current_provider = Provider()
        self._families: dict[str, Registry] = {f: Registry(f, self) for f in families}

    def __getattr__(self, family: str) -> Registry:
        fams = self.__dict__.get("_families", {})
        if family in fams:
            return fams[family]
        raise AttributeError(f"no component family '{family}'; families: {', '.join(fams)}")

    def __getitem__(self, family: str) -> Registry:
        if family not in self._families:
            raise ConfigError(f"no component family '{family}'; families: {', '.join(self._families)}")
        return self._families[family]

    def families(self) -> list[str]:
        return list(self._families)

    @staticmethod
    def split_node(node: Mapping[str, Any], path: str) -> tuple[str, dict[str, Any]]:
        """A config node ``{name: X, **params}`` -> (X, params) as plain Python values."""
        if hasattr(node, "_metadata"):  # an omegaconf node: resolve to plain containers
            from omegaconf import OmegaConf
            node = OmegaConf.to_container(node, resolve=True)
        if isinstance(node, str):
            return node, {}
        if not isinstance(node, Mapping) or "name" not in node:
            raise ConfigError(f"{path}: expected a mapping with a 'name' key, got {node!r}")
        params = {k: v for k, v in node.items() if k != "name"}
        return node["name"], params

    def validate_node(self, family: str, node, path: str | None = None, wiring: tuple[str, ...] = ()):
        name, params = self.split_node(node, path or family)
        return self[family].validate(name, params, path or family, wiring)

    def create_from_config(self, family: str, node, path: str | None = None, **wiring):
        path = path or family
        name, params = self.split_node(node, path)
        self[family].validate(name, params, path, wiring=tuple(wiring))
        return self[family].create(name, _path=path, **params, **wiring)

    def rows(self) -> list[dict[str, Any]]:
        """One row per registered component, for `bluelm-v plugins` (clashing names: one row
        per provider, each with ``clash``)."""
        return [row for f in self._families for row in self[f].rows()]

    def clashes(self) -> dict[str, dict[str, list[Entry]]]:
        """family -> {name registered more than once -> its registrations}."""
        return {f: c for f in self._families if (c := self[f].clashes())}
