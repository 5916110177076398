"""The device inventory file (``devices.yaml``) the benchmark reads with ``job.inventory=PATH``.

    devices:
      - {name: jetson, transport: ssh, address: 192.0.2.7, port: 22, user: ubuntu,
         key: ~/.ssh/id_ed25519, python: python3, num_cpus: 1}
      - {name: x100, transport: adb, serial: R5CT1234ABC,
         python: /data/data/com.termux/files/usr/bin/python}
      - {name: phone-model, transport: simulated, profile: dimensity9300}

``transport`` picks the backend (ssh -> ``ssh``, adb -> ``adb``, simulated -> ``simulated_npu``,
local -> ``local_torch``; a registered backend name also works); ``address`` is the ssh
``host``. Every other key is a parameter of that backend (or a device key of the benchmark:
num_cpus, cases, overrides). Relative key / known_hosts paths are read from the file's folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from bluelm_v.errors import ConfigError

TRANSPORTS = {"ssh": "ssh", "adb": "adb", "simulated": "simulated_npu", "local": "local_torch"}
DEVICE_KEYS = ("name", "num_cpus", "cases", "overrides")


def read_inventory(path) -> list[dict]:
    """devices.yaml -> benchmark device entries {name, backend: {name, ...}, ...}."""
    import yaml

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ConfigError(f"job.inventory: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"job.inventory: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    entries = data.get("devices") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigError(f"job.inventory: {path} needs a list under 'devices:'")
    return [_device(e, i, path) for i, e in enumerate(entries)]


def _device(entry, index: int, path: Path) -> dict:
    where = f"job.inventory {path.name}: devices[{index}]"
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("transport"):
        raise ConfigError(f"{where}: a device needs 'name' and 'transport', got {entry!r}")
    transport = str(entry["transport"])
    backend = {"name": TRANSPORTS.get(transport, transport)}
    for key, value in entry.items():
        if key in DEVICE_KEYS or key == "transport":
            continue
        if key == "address":
            key = "serial" if backend["name"] == "adb" else "host"
        if key in ("key", "known_hosts") and value and not os.path.isabs(os.path.expanduser(str(value))):
            value = str(path.parent / str(value))
        backend[key] = value
    device = {k: entry[k] for k in DEVICE_KEYS if k in entry}
    return {**device, "backend": backend}
