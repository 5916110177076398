"""Config composition beyond Hydra: component nodes from the registry, a key schema, one-line errors.

    store_component_nodes(registry)   every registered component without conf/FAMILY/NAME.yaml gets
                                      a node in Hydra's ConfigStore, so `tiler=NAME` selects it
    check_overrides(cfg, overrides, schema, job_module)
                                      unknown keys (with `+` or not) and options the job does not use
    one_line(exc, overrides)          a Hydra composition error as one line with the valid choices
    compose(overrides)                Hydra's compose API with the component nodes (tests, notebooks)

The schema of a run is the config composed from the same experiment and group choices without
the user's key=value overrides: conf/ files declare every key a job reads. A key that is not
there fails, except inside the top-level component nodes (their parameters are checked against
the component's signature by the registry), inside nested component nodes (a mapping whose
``name`` is a registered component), under a null or empty mapping, and under the nodes a job
lists in ``OPEN_NODES`` (mappings whose keys the job checks itself, e.g. ``job.cases``).

A job says which top-level nodes it reads with ``USES`` (a tuple of families, plus
``deepspeed``); ``job.uses_ray`` says whether it reads ``ray``. Overriding any other of those
nodes fails naming the option and the job.
"""
from __future__ import annotations

import difflib
from importlib import resources
from typing import Any, Iterable

from . import FAMILIES
from .errors import ConfigError

# Parameters the framework passes to a factory itself (never set in config).
WIRING = {"downsampler": ("in_dim",), "projector": ("in_dim", "out_dim"), "engine": ("model",)}
# Top-level nodes selected from a config group that a job may or may not read (see USES).
SHARED_NODES = (*FAMILIES, "deepspeed")
CONF_MODULE = "bluelm_v.conf"
_REQUIRED = "<required>"            # registry.describe()'s marker of a parameter without default


# -- component nodes in the ConfigStore ------------------------------------------------------------
def _plain_default(value: Any) -> tuple[Any, bool]:
    """(value, representable): config nodes hold None, bool, int, float, str, lists and dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value, True
    if isinstance(value, (list, tuple)):
        items = [_plain_default(v) for v in value]
        return [v for v, _ in items], all(ok for _, ok in items)
    if isinstance(value, dict):
        items = {str(k): _plain_default(v) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, all(ok for _, ok in items.values())
    return None, False


def component_node(registry, family: str, name: str) -> dict:
    """{name, **defaults} from the factory's signature: a parameter without a default is '???'
    (Hydra's mandatory value: `tiler.NAME=VALUE` sets it), one whose default a config cannot hold
    is left to the factory."""
    node: dict[str, Any] = {"name": name}
    for key, default in registry[family].describe(name)["parameters"].items():
        if key in WIRING.get(family, ()):
            continue
        if default == _REQUIRED:
            node[key] = "???"
            continue
        value, ok = _plain_default(default)
        if ok:
            node[key] = value
    return node


def store_component_nodes(registry) -> list[tuple[str, str]]:
    """Put a node for every registered component that has no YAML in conf/ into Hydra's
    ConfigStore under its family's group; returns the (family, name) pairs stored."""
    from hydra.core.config_store import ConfigStore

    store, conf, stored = ConfigStore.instance(), resources.files(CONF_MODULE), []
    for family in registry.families():
        clashing = registry[family].clashes()
        for name in registry[family].names():
            if (conf / family / f"{name}.yaml").is_file() or name in clashing:
                continue                  # a name two plugins register fails where it is used
            provider = registry[family].describe(name)["provider"]
            store.store(group=family, name=name, node=component_node(registry, family, name),
                        provider=str(provider))
            stored.append((family, name))
    return stored


# -- overrides -------------------------------------------------------------------------------------
def config_groups() -> set[str]:
    """The config groups of conf/ (folders): family groups, job, experiment, ray, deepspeed."""
    conf = resources.files(CONF_MODULE)
    return {p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}


def parse(overrides: Iterable[str]) -> list:
    """Hydra's parse of command-line overrides (raises Hydra's OverrideParseException)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _key(override) -> str:
    return override.key_or_group.lstrip("/")


def _text(override) -> str:
    return override.input_line or _key(override)


def group_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that choose config-group options (+experiment=X, tiler=Y, ~ray, ...):
    what the schema is composed from."""
    groups = config_groups()
    return [_text(o) for o in parse(overrides)
            if _key(o).split("@")[0] in groups and not _key(o).startswith("hydra")]


def plugin_switches(overrides: Iterable[str]) -> dict:
    """plugins.block / plugins.autoload given on the command line (read before composition, so
    the component nodes come from the same plugins the run loads)."""
    out: dict = {}
    try:
        parsed = parse(overrides)
    except Exception:  # noqa: BLE001 -- a bad override is reported by the composition itself
        return out
    for o in parsed:
        if _key(o) in ("plugins.block", "plugins.autoload") and not o.is_delete() and not o.is_sweep_override():
            out[_key(o).split(".")[1]] = o.value()
    return out


# -- the schema check ------------------------------------------------------------------------------
def _paths(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    out = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.append(path)
        out.extend(_paths(value, path))
    return out


def _suggest(schema: dict, parent: str, key: str, rest: list[str], known: set[str]) -> str | None:
    """The closest key beside ``key`` when the path it makes exists in the schema (``known``)."""
    for close in difflib.get_close_matches(key, [str(k) for k in schema], n=3, cutoff=0.6):
        path = ".".join(p for p in (parent, close, *rest) if p)
        if path in known:
            return path
    return None


def _first_unknown(value: Any, schema: Any, path: str, open_paths: set[str], components: set[str],
                   skip_families: bool = True) -> tuple[str, str, dict] | None:
    """(path of the first key not in the schema, its parent path, the parent's schema node)."""
    if not isinstance(value, dict) or not isinstance(schema, dict) or not schema or path in open_paths:
        return None
    if path and isinstance(schema.get("name"), str) and schema["name"] in components:
        return None                   # a nested component node: the registry checks its parameters
    for key, sub in value.items():
        child = f"{path}.{key}" if path else str(key)
        if key not in schema:
            return child, path, schema
        if not path and key in FAMILIES and skip_families:
            continue                  # top-level component nodes: checked by the registry
        found = _first_unknown(sub, schema[key], child, open_paths, components, skip_families)
        if found:
            return found
    return None


def unknown_key_error(cfg_tree: dict, schema_tree: dict, open_paths: Iterable[str] = (),
                      components: Iterable[str] = (), overrides: Iterable[str] = (),
                      skip_families: bool = True) -> str | None:
    """The one-line error for the first key of ``cfg_tree`` that ``schema_tree`` does not
    declare (both plain dicts), or None when every key is declared."""
    found = _first_unknown(cfg_tree, schema_tree, "", set(open_paths), set(components), skip_families)
    if found is None:
        return None
    path, parent, parent_schema = found
    key = path[len(parent) + 1:] if parent else path
    given = next((o for o in overrides
                  if (o.lstrip("+~").split("=")[0] + ".").startswith(path + ".")), None)
    leaf = given.lstrip("+").split("=")[0] if given else path
    rest = leaf[len(path) + 1:].split(".") if leaf != path else []
    known = set(_paths(schema_tree))
    hint = _suggest(parent_schema, parent, key, [r for r in rest if r], known)
    if hint is None:                  # the right key at another level, e.g. +manifest= -> dataset.manifest
        last = leaf.split(".")[-1]
        hint = next((p for p in sorted(known) if p.split(".")[-1] == last), None)
    where = f"keys of {parent}" if parent else "top-level keys"
    known = ", ".join(sorted(str(k) for k in parent_schema))
    return (f"{leaf}: unknown key" + (f" (given as `{given}`)" if given else "")
            + (f"; did you mean {hint}?" if hint else ".") + f" The {where}: {known}")


def uses(job_module) -> tuple[str, ...]:
    """The shared top-level nodes a job reads (every one when the job does not say)."""
    return tuple(getattr(job_module, "USES", SHARED_NODES))


def not_applicable_error(overrides: Iterable[str], job: str, job_module, uses_ray: bool) -> str | None:
    """One line for the first override of a top-level node the job does not read, else None."""
    used = uses(job_module)
    for o in parse(overrides):
        top = _key(o).split("@")[0].split(".")[0].split("/")[0]
        if top in SHARED_NODES and top not in used:
            reads = ", ".join(n for n in SHARED_NODES if n in used) or "none of them"
            return (f"{_text(o)}: the {job} job does not use the top-level `{top}` node, so this "
                    f"option would change nothing (of the component nodes it reads: {reads})")
        if top == "ray" and not uses_ray:
            return f"{_text(o)}: the {job} job does not use Ray, so this option would change nothing"
    return None


def _option_keys(family: str, option: str) -> set[str]:
    """The keys conf/FAMILY/OPTION.yaml sets (empty for a component node from the registry)."""
    import yaml  # comes with omegaconf

    path = resources.files(CONF_MODULE) / family / f"{option}.yaml"
    return set(yaml.safe_load(path.read_text()) or {}) if path.is_file() else set()


def experiment_leftovers(cfg, overrides: Iterable[str], registry) -> list[str]:
    """Keys an experiment set for its own default component (generate: tiler.max_grid=3) that
    the component the user chose instead (`tiler=square`) does not take: they belong to the
    replaced component. Keys the user gave, and keys of the chosen option's own YAML, are never
    listed (the registry reports those)."""
    parsed = parse(overrides)
    chosen = {_key(o): o.value() for o in parsed
              if _key(o) in FAMILIES and not o.is_delete() and isinstance(o.value(), str)}
    given = {_key(o) for o in parsed}
    out = []
    for family, option in sorted(chosen.items()):
        node = cfg.get(family)
        if node is None or not hasattr(node, "get") or node.get("name") not in registry[family]:
            continue
        entry = registry[family].entry(node.get("name"))
        if entry.accepts_any_keyword():
            continue
        keep = set(entry.parameters()) | _option_keys(family, option) | {"name"}
        out += [f"{family}.{k}" for k in node if k not in keep and f"{family}.{k}" not in given]
    return out


def check_overrides(cfg, overrides: list[str], schema, job_module, registry) -> None:
    """Raise ConfigError for an unknown key or an option the job does not use (see the module
    docstring). ``schema`` is the config composed without the user's key=value overrides."""
    from omegaconf import OmegaConf

    job = str(cfg.job.name)
    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    line = not_applicable_error(user, job, job_module, bool(cfg.job.get("uses_ray", True)))
    if line:
        raise ConfigError(line)
    components = {n for f in registry.families() for n in registry[f].names()}
    line = unknown_key_error(OmegaConf.to_container(cfg, resolve=False),
                             OmegaConf.to_container(schema, resolve=False),
                             getattr(job_module, "OPEN_NODES", ()), components, user)
    if line:
        raise ConfigError(line)


# -- Hydra's own errors as one line ----------------------------------------------------------------
def _options_line(group: str, name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=2, cutoff=0.5)
    hint = f"Did you mean {' or '.join(close)}? " if close else ""
    if group in FAMILIES:
        return (f"{group}={name}: no {group} named '{name}' in conf/{group}/ or among the registered "
                f"{group}s. {hint}Options: {', '.join(options)} (`bluelm-v plugins` lists what is installed)")
    if group == "experiment":
        return f"+experiment={name}: no experiment '{name}'. {hint}Experiments: {', '.join(options)} (`bluelm-v jobs`)"
    return f"{group}={name}: no option '{name}' in the config group {group}. {hint}Options: {', '.join(options)}"


def _bad_override(overrides: list[str]) -> str | None:
    for text in overrides:
        try:
            parse([text])
        except Exception:  # noqa: BLE001 -- Hydra's parse error: this is the bad one
            return text
    return None


def one_line(exc: BaseException, overrides: list[str], schema_tree: dict | None = None) -> str:
    """A Hydra composition error as one line naming the override, with the valid choices."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, name = exc.missing_cfg_file.rsplit("/", 1)
        return _options_line(group, name, sorted(exc.options or []))
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if isinstance(exc, OverrideParseException):
        bad = _bad_override(overrides)
        detail = lines[0] if lines else "cannot parse"
        return (f"{bad or 'an override'}: bad override syntax ({detail}); "
                "see https://hydra.cc/docs/advanced/override_grammar/basic/")
    first = lines[0] if lines else type(exc).__name__
    if first.startswith("Could not override '") and "No match in the defaults list" in first:
        key = first.split("'")[1]
        given = next((o for o in overrides if o.split("=")[0].lstrip("/") == key), key)
        job = ((schema_tree or {}).get("job") or {}).get("name", "this")
        return (f"{given}: '{key}' is not in this config's defaults list; add it with +{given}"
                if key == "experiment" else
                f"{given}: the {job} job selects no `{key}` config, so this option would change nothing")
    if first.startswith("Could not override '") and schema_tree is not None:
        key = first.split("'")[1]
        given = next((o for o in overrides if o.split("=")[0] == key), key)
        line = unknown_key_error(_nested(key), schema_tree, overrides=[given], skip_families=False)
        if line:
            return line
    keep = [ln for ln in lines if not ln.startswith(("Config search path", "provider=", "Set the environment"))]
    return " ".join(keep) or type(exc).__name__


def _nested(dotted: str) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = None
    return out


def command_line_overrides(argv: list[str]) -> list[str]:
    """The overrides of a launcher command line (Hydra's own argument parser)."""
    from hydra._internal.utils import get_args_parser

    try:
        return list(get_args_parser().parse_known_args(argv)[0].overrides or [])
    except SystemExit:
        return [a for a in argv if not a.startswith("-")]


def schema(overrides: Iterable[str]):
    """The config of these overrides' experiment and group choices without their key=value
    overrides (inside a Hydra run: its GlobalHydra is initialised)."""
    from hydra import compose as hydra_compose

    return hydra_compose(config_name="config", overrides=group_overrides(overrides))


def schema_tree(overrides: Iterable[str]) -> dict | None:
    """:func:`schema` as a plain dict, composed from scratch (after a failed composition), or
    None when the group choices themselves do not compose."""
    from omegaconf import OmegaConf

    try:
        chosen = group_overrides(overrides)
    except Exception:  # noqa: BLE001 -- unparsable: reported without a suggestion
        return None
    experiment = [o for o in chosen if o.lstrip("+").split("=")[0] in ("experiment", "job")]
    for attempt in (chosen, experiment):     # the group choice itself may be what failed
        try:
            return OmegaConf.to_container(compose(attempt), resolve=False)
        except Exception:  # noqa: BLE001 -- then the error is reported without a suggestion
            continue
    return None


# -- composition for tests and notebooks -----------------------------------------------------------
def compose(overrides: Iterable[str] = (), return_hydra_config: bool = False, registry=None):
    """Hydra's compose API over pkg://bluelm_v.conf, with every registered component selectable."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if registry is None:
        from .plugin_manager import get
        registry = get()[1]
    store_component_nodes(registry)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
