"""Device inventory and case grid of the benchmark job (plain dicts; no torch, no Ray).

A device: ``{name, backend, num_cpus?, cases?, overrides?, **backend params}``. ``backend`` is a
registered name or a node ``{name: simulated_npu, profile: ...}``; keys other than the reserved
ones below are folded into the backend node (so ``{name: p1, backend: adb, serial: X}`` works).
``cases`` is a per-device patch of ``job.cases`` ({base: {...}, vary: {...}}); ``overrides``
replaces top-level config nodes for that device only (e.g. ``{llm: {name: hf_causal, preset:
smollm2_135m}}``).

The case grid: ``base`` is one complete case; ``vary`` lists values per field. With
``product: false`` (default) each field is varied alone around ``base`` (the paper's sweeps:
tiles per batch at the base chunk, chunk at the base tiles per batch, ...); with ``true`` the
full cross product. Duplicates collapse; ids are readable and stable across runs.
"""
from __future__ import annotations

import itertools
import re
from typing import Any

from bluelm_v.errors import ConfigError
from bluelm_v.plugins.quantizers import quantizer_label

DEVICE_KEYS = ("name", "backend", "num_cpus", "cases", "overrides")
CASE_FIELDS = {"image": list, "tiles_per_batch": int, "prefill_chunk": int, "prompt_tokens": int,
               "decode_tokens": int, "quantizer": object, "pipelined": bool, "release_encoder": bool,
               "seed": int, "grid": object, "kv_cache_tokens": object}
REQUIRED = ("image", "tiles_per_batch", "prefill_chunk", "prompt_tokens", "decode_tokens")
DEFAULT_CPUS = {"local_torch": 1, "onnxruntime": 1}


def plain(node: Any) -> Any:
    if hasattr(node, "_metadata"):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(node, resolve=True)
    return node


def normalise_device(entry: Any, index: int) -> dict:
    """One inventory entry -> {name, backend: {name, ...}, num_cpus, cases, overrides}."""
    path = f"job.devices[{index}]"
    entry = plain(entry)
    if not isinstance(entry, dict) or not entry.get("name") or "backend" not in entry:
        raise ConfigError(f"{path}: a device needs at least 'name' and 'backend', got {entry!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(entry["name"])):
        raise ConfigError(f"{path}.name: {entry['name']!r} may hold only letters, digits, '.', '_' and '-'")
    backend = entry["backend"]
    backend = {"name": backend} if isinstance(backend, str) else dict(backend or {})
    if "name" not in backend:
        raise ConfigError(f"{path}.backend: needs a 'name' (a registered backend)")
    backend.update({k: v for k, v in entry.items() if k not in DEVICE_KEYS})
    cpus = entry.get("num_cpus")
    return {"name": str(entry["name"]), "backend": backend,
            "num_cpus": float(DEFAULT_CPUS.get(backend["name"], 0) if cpus is None else cpus),
            "cases": entry.get("cases") or {}, "overrides": entry.get("overrides") or {}}


def inventory(job_cfg, hook_results: list) -> list[dict]:
    """Config devices + devices from the bluelm_v_devices hook, names unique."""
    entries = list(plain(job_cfg.get("devices")) or [])
    for extra in hook_results or []:
        entries.extend(extra or [])
    devices = [normalise_device(e, i) for i, e in enumerate(entries)]
    seen = set()
    for d in devices:
        if d["name"] in seen:
            raise ConfigError(f"job.devices: the device name '{d['name']}' is used twice")
        seen.add(d["name"])
    if not devices:
        raise ConfigError("job.devices: the inventory is empty")
    return devices


def check_case(case: dict, path: str) -> dict:
    for key in REQUIRED:
        if key not in case:
            raise ConfigError(f"{path}.{key}: missing")
    for key, value in case.items():
        if key not in CASE_FIELDS:
            raise ConfigError(f"{path}.{key}: unknown case field; known: {sorted(CASE_FIELDS)}")
        kind = CASE_FIELDS[key]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "decode_tokens" else 1)):
            raise ConfigError(f"{path}.{key}: expected a positive integer, got {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{path}.{key}: expected true or false, got {value!r}")
    img = case["image"]
    if not (isinstance(img, (list, tuple)) and len(img) == 2 and all(isinstance(v, int) and v > 0 for v in img)):
        raise ConfigError(f"{path}.image: expected [width, height] in pixels, got {img!r}")
    return case


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in (patch or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "quantizer" else v
    return out


def expand(cases_cfg: dict, device_patch: dict | None = None, path: str = "job.cases") -> list[dict]:
    """The case list of one device, each with a stable ``id``."""
    grid = _merge(plain(cases_cfg) or {}, plain(device_patch) or {})
    base = dict(grid.get("base") or {})
    vary = {k: list(v) for k, v in (grid.get("vary") or {}).items()}
    check_case(base, f"{path}.base")
    for k in vary:
        if k not in CASE_FIELDS:
            raise ConfigError(f"{path}.vary.{k}: unknown case field; known: {sorted(CASE_FIELDS)}")
    if grid.get("product"):
        keys = list(vary)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(vary[k] for k in keys))]
    else:
        combos = [{}] + [{k: v} for k in vary for v in vary[k]]
    out, seen = [], set()
    for patch in combos:
        case = check_case({**base, **patch}, f"{path}.vary")
        case["image"] = list(case["image"])
        case["id"] = case_id(case)
        if case["id"] not in seen:
            seen.add(case["id"])
            out.append(case)
    return out


def case_id(case: dict) -> str:
    w, h = case["image"]
    cid = (f"{w}x{h}_b{case['tiles_per_batch']}_t{case['prefill_chunk']}_p{case['prompt_tokens']}"
           f"_n{case['decode_tokens']}_q-{quantizer_label(case.get('quantizer'))}")
    if case.get("grid"):
        cid += "_g{}x{}".format(*case["grid"])
    for flag, default in (("pipelined", True), ("release_encoder", True)):
        if flag in case and bool(case[flag]) != default:
            cid += f"_{flag}-{str(case[flag]).lower()}"
    for key in ("seed", "kv_cache_tokens"):
        if case.get(key) is not None:
            cid += f"_{key}-{case[key]}"
    return re.sub(r"[^A-Za-z0-9_.,=()+-]", "", cid)
