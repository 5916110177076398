"""One interface for reaching a device: ssh (plugins/backends/ssh.py) and adb (adb.py) implement it.

    t.connect()                               -> None (idempotent; reconnects after a loss)
    t.push(local_path, remote_path)           -> None (a file; parent directories are made)
    t.run(command, timeout) -> Completed      (exit status, stdout, stderr; TransportError when
                                               the device is lost or the command times out)
    t.pull(remote_path, local_path)           -> None
    t.facts() -> dict                         cpu, cores, memory, temperature, os (what it can read)
    t.close()

A lost connection or a timeout raises :class:`TransportError` with ``retryable = True``: the
benchmark retries such a case once and a resumed run repeats it (jobs/benchmark/scheduler.py);
an error in what the device ran (exit status != 0) is ``retryable = False``.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Protocol

from bluelm_v.errors import InputError


class TransportError(InputError):
    """A device could not be reached or did not answer in time (the message says which)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self):                     # keeps ``retryable`` across Ray's pickling
        return (type(self), (str(self), self.retryable))


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


class Transport(Protocol):
    name: str

    def connect(self) -> None: ...
    def push(self, local: str, remote: str) -> None: ...
    def run(self, command: str, timeout: float) -> Completed: ...
    def pull(self, remote: str, local: str) -> None: ...
    def facts(self) -> dict: ...
    def close(self) -> None: ...


# The commands behind facts(): plain POSIX shell, so they work on Linux boards and on Android.
FACTS_COMMAND = ("uname -srm; echo ---; cat /proc/cpuinfo 2>/dev/null; echo ---; "
                 "cat /proc/meminfo 2>/dev/null | head -3; echo ---; "
                 "cat /sys/class/thermal/thermal_zone*/temp 2>/dev/null; echo ---; nproc 2>/dev/null")


def parse_facts(text: str) -> dict:
    """The output of FACTS_COMMAND -> {os, cpu, cores, memory_total_mb, memory_available_mb,
    temperature_c (the hottest thermal zone), ...} with what was readable."""
    parts = (text.split("---\n") + [""] * 5)[:5]
    out: dict = {"os": parts[0].strip() or None}
    cpu = parts[1]
    model = re.search(r"^(?:model name|Hardware|Processor)\s*:\s*(.+)$", cpu, re.M)
    parts_ids = re.findall(r"^CPU part\s*:\s*(0x[0-9a-f]+)$", cpu, re.M)
    out["cpu"] = model.group(1).strip() if model else None
    if parts_ids:
        out["cpu_parts"] = {p: parts_ids.count(p) for p in sorted(set(parts_ids))}
    for key, name in (("MemTotal", "memory_total_mb"), ("MemAvailable", "memory_available_mb")):
        m = re.search(rf"^{key}:\s+(\d+) kB", parts[2], re.M)
        if m:
            out[name] = int(m.group(1)) / 1024
    temps = [int(t) for t in re.findall(r"^-?\d+$", parts[3], re.M)]
    temps = [t / 1000 if abs(t) > 1000 else float(t) for t in temps]
    out["temperature_c"] = max(temps) if temps else None
    cores = parts[4].strip()
    out["cores"] = int(cores) if cores.isdigit() else None
    return out


def quote(path: str) -> str:
    return shlex.quote(str(path))
