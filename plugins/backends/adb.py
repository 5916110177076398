"""``adb``: a real Android phone over the Android Debug Bridge.

    backend: {name: adb, serial: R5CT1234ABC, python: /data/data/com.termux/files/usr/bin/python}
    backend: {name: adb, runner: ./llama-mtmd-cli, model_dir: ./gguf, output_format: llama_cpp,
              command: "cd {remote_dir} && ./{runner} -m {model_dir}/llm.gguf ..."}

Two ways to run a case, both through ``AdbTransport`` (the transport interface of transport.py):
- the device runner (``runner: null``, the default): as the ssh backend does
  (plugins/backends/device_runner.py): the export and bluelm_v/runner.py are pushed and run by
  the phone's ``python`` (e.g. Termux's, with numpy, onnxruntime and Pillow installed);
- a program you provide (``runner: PATH``, e.g. llama.cpp's own binaries): ``model_dir`` and
  ``runner`` are pushed to ``remote_dir``; ``command`` (a template, placeholders below) runs
  with ``adb shell`` while ``dumpsys meminfo <process>`` samples its memory; its output is
  parsed in ``output_format``.
Either way the phone is found with ``adb devices -l`` (``serial: null`` takes the only one
attached) and the thermal state (``dumpsys thermalservice``) is read before and after a case.
cool_down(s): waits at least ``s`` seconds and until the hottest sensor is below
          ``thermal_limit_c`` (or ``max_cool_down_s`` passes).

Runner output formats (``output_format``):
  ``kv``        one metric per line, ``bluelm_v.encode_s=2.06`` (any of load_s, encode_s,
                prefill_s, ttft_s, decode_tokens_per_s, peak_memory_mb, text, ...)
  ``llama_cpp`` llama.cpp's timing lines (llama-cli / llama-mtmd-cli: ``load time``,
                ``prompt eval time``, ``eval time``, ``image slice encoded in``): the paper's
                llama.cpp baseline, MiniCPM-V on the phone's CPU.
Template placeholders: {runner} {remote_dir} {model_dir} {width} {height} {tiles_per_batch}
{prefill_chunk} {prompt_tokens} {decode_tokens} {quantizer} {pipelined}.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bluelm_v.errors import ConfigError, InputError

from .device_runner import RunnerBackend, parse_runner_kv
from .transport import FACTS_COMMAND, Completed, TransportError, parse_facts

DEFAULT_COMMAND = ("cd {remote_dir} && ./{runner} --model-dir {model_dir} --image {width}x{height} "
                   "--tiles-per-batch {tiles_per_batch} --prefill-chunk {prefill_chunk} "
                   "--prompt-tokens {prompt_tokens} --decode-tokens {decode_tokens} "
                   "--quantizer {quantizer} --pipelined {pipelined}")


class AdbError(TransportError):
    """adb failed or a device is not usable (the message says which and what to do)."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message, retryable)


# -- parsing (pure functions; tested on recorded outputs in tests/data/adb/) --------------------
@dataclass
class AdbDeviceEntry:
    serial: str
    state: str                        # device | offline | unauthorized | recovery | ...
    properties: dict = field(default_factory=dict)   # model:, product:, transport_id:, usb:


def parse_devices(text: str) -> list[AdbDeviceEntry]:
    """``adb devices [-l]`` -> entries (daemon start-up chatter and blank lines are skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("*", "#")) or line.lower().startswith("list of devices"):
            continue
        parts = line.split()
        if len(parts) < 2:
            continue
        props = dict(p.split(":", 1) for p in parts[2:] if ":" in p)
        out.append(AdbDeviceEntry(parts[0], parts[1], props))
    return out


def _kb(text: str) -> int:
    return int(text.replace(",", "").rstrip("K"))


def parse_meminfo_process(text: str) -> dict:
    """``dumpsys meminfo <process>`` -> {pid, process, pss_mb, rss_mb} (None where absent)."""
    out = {"pid": None, "process": None, "pss_mb": None, "rss_mb": None}
    head = re.search(r"\*\* MEMINFO in pid (\d+) \[([^\]]+)\] \*\*", text)
    if head:
        out["pid"], out["process"] = int(head.group(1)), head.group(2)
    pss = re.search(r"TOTAL PSS:\s+([\d,]+)", text) or re.search(r"^\s*TOTAL\s+([\d,]+)", text, re.M)
    rss = re.search(r"TOTAL RSS:\s+([\d,]+)", text)
    if pss:
        out["pss_mb"] = _kb(pss.group(1)) / 1024
    if rss:
        out["rss_mb"] = _kb(rss.group(1)) / 1024
    return out


def parse_meminfo_device(text: str) -> dict:
    """``dumpsys meminfo`` (no argument) -> {total_ram_mb, free_ram_mb, used_ram_mb}."""
    out = {}
    for key, name in (("Total RAM", "total_ram_mb"), ("Free RAM", "free_ram_mb"), ("Used RAM", "used_ram_mb")):
        m = re.search(rf"{key}:\s+([\d,]+)K", text)
        if m:
            out[name] = _kb(m.group(1)) / 1024
    return out


TEMPERATURE_TYPES = {0: "cpu", 1: "gpu", 2: "battery", 3: "skin", 4: "usb_port", 5: "power_amplifier",
                     6: "bcl_voltage", 7: "bcl_current", 8: "bcl_percentage", 9: "npu"}


def parse_thermal(text: str) -> dict:
    """``dumpsys thermalservice`` -> {status, max_c, by_type: {cpu: max, skin: max, ...}, sensors}.
    Prefers the 'Current temperatures from HAL' block over the cached one."""
    status = re.search(r"Thermal Status:\s*(-?\d+)", text)
    block = text.split("Current temperatures from HAL:", 1)
    source = block[1] if len(block) == 2 else text
    sensors = []
    for m in re.finditer(r"Temperature\{mValue=(-?[\d.]+), mType=(-?\d+), mName=([^,]+), mStatus=(-?\d+)\}", source):
        sensors.append({"name": m.group(3), "type": TEMPERATURE_TYPES.get(int(m.group(2)), m.group(2)),
                        "celsius": float(m.group(1)), "status": int(m.group(4))})
    by_type: dict[str, float] = {}
    for s in sensors:
        by_type[s["type"]] = max(by_type.get(s["type"], -1e9), s["celsius"])
    return {"status": int(status.group(1)) if status else None,
            "max_c": max((s["celsius"] for s in sensors), default=None), "by_type": by_type, "sensors": sensors}


def parse_llama_cpp(text: str) -> dict:
    """llama.cpp timing lines -> {load_s, prefill_s, prompt_tokens, decode_tokens_per_s, encode_s}."""
    out: dict = {}
    m = re.search(r"load time\s*=\s*([\d.]+) ms", text)
    if m:
        out["load_s"] = float(m.group(1)) / 1e3
    m = re.search(r"prompt eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) tokens", text)
    if m:
        out["prefill_s"], out["prompt_tokens"] = float(m.group(1)) / 1e3, int(m.group(2))
    m = re.search(r"(?<!prompt )eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) runs", text)
    if m and int(m.group(2)) > 0:
        out["decode_tokens_per_s"] = int(m.group(2)) / (float(m.group(1)) / 1e3)
    enc = [float(x) for x in re.findall(r"image slice encoded in (\d+(?:\.\d+)?) ms", text)]
    if enc:
        out["encode_s"] = sum(enc) / 1e3
    return out


PARSERS = {"kv": parse_runner_kv, "llama_cpp": parse_llama_cpp}


# -- the adb command line ---------------------------------------------------------------------
def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


class Adb:
    """Builds and runs adb command lines; ``execute`` is injectable (tests use recorded outputs)."""

    def __init__(self, adb_path: str = "adb", serial: str | None = None, execute=_run, timeout_s: float = 600.0):
        self.adb_path, self.serial, self.execute, self.timeout_s = adb_path, serial, execute, timeout_s

    def argv(self, *args: str) -> list[str]:
        return [self.adb_path, *(["-s", self.serial] if self.serial else []), *args]

    def call(self, *args: str, timeout: float | None = None, check: bool = True) -> str:
        return self.complete(*args, timeout=timeout, check=check).stdout

    def complete(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = self.argv(*args)
        try:
            done = self.execute(argv, timeout or self.timeout_s)
        except FileNotFoundError:
            raise AdbError(f"adb not found ('{self.adb_path}'): install Android platform-tools "
                           f"(apt-get install adb) or set backend.adb_path to the adb binary") from None
        except subprocess.TimeoutExpired:
            raise AdbError(f"'{shlex.join(argv)}' did not finish in {timeout or self.timeout_s:.0f} s", True) from None
        if done.returncode != 0 and re.search(r"device '.*' not found|no devices/emulators|device offline",
                                              done.stderr or ""):
            raise AdbError(f"'{shlex.join(argv)}': the phone went away ({done.stderr.strip()[-200:]})", True)
        if check and done.returncode != 0:
            raise AdbError(f"'{shlex.join(argv)}' failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
        return done

    def shell(self, command: str, **kw) -> str:
        return self.call("shell", command, **kw)

    def devices(self) -> list[AdbDeviceEntry]:
        return parse_devices(Adb(self.adb_path, None, self.execute, self.timeout_s).call("devices", "-l", timeout=30))

    def choose(self) -> str:
        """The serial to use: the configured one if attached and usable, else the only device."""
        entries = self.devices()
        ready = [e for e in entries if e.state == "device"]
        if self.serial:
            found = [e for e in entries if e.serial == self.serial]
            if not found:
                seen = ", ".join(f"{e.serial} ({e.state})" for e in entries) or "none"
                raise AdbError(f"backend.serial: device '{self.serial}' is not attached (adb devices: {seen})")
            if found[0].state != "device":
                hint = {"unauthorized": "unlock the phone and accept the USB debugging prompt",
                        "offline": "reconnect the cable or run `adb reconnect`"}.get(found[0].state, "check the connection")
                raise AdbError(f"backend.serial: device '{self.serial}' is {found[0].state}: {hint}")
            return self.serial
        if not ready:
            seen = ", ".join(f"{e.serial} ({e.state})" for e in entries) or "no devices"
            raise AdbError(f"no usable Android device attached (adb devices: {seen}); "
                           f"connect a phone with USB debugging enabled")
        if len(ready) > 1:
            raise AdbError("several devices attached (" + ", ".join(e.serial for e in ready)
                           + "): set backend.serial, or list each as its own device in job.devices")
        return ready[0].serial


class AdbTransport:
    """The transport interface (transport.py) over adb: push, shell with a timeout, pull, facts."""

    name = "adb"

    def __init__(self, adb: Adb):
        self.adb = adb

    def connect(self) -> None:
        self.adb.serial = self.adb.choose()

    def push(self, local: str, remote: str) -> None:
        self.adb.call("push", str(local), remote)

    def pull(self, remote: str, local: str) -> None:
        self.adb.call("pull", remote, str(local))

    def run(self, command: str, timeout: float) -> Completed:
        done = self.adb.complete("shell", command, timeout=timeout, check=False)
        return Completed(done.returncode, done.stdout or "", done.stderr or "")

    def facts(self) -> dict:
        out = parse_facts(self.adb.shell(FACTS_COMMAND, check=False, timeout=60))
        out.update({"model": self.adb.shell("getprop ro.product.model", check=False).strip(),
                    "soc": self.adb.shell("getprop ro.soc.model", check=False).strip(),
                    **parse_meminfo_device(self.adb.shell("dumpsys meminfo", check=False))})
        thermal = self.thermal()
        if thermal["max_c"] is not None:
            out["temperature_c"] = thermal["max_c"]
        return out

    def thermal(self) -> dict:
        return parse_thermal(self.adb.shell("dumpsys thermalservice", check=False))

    def close(self) -> None:
        pass


class AdbBackend(RunnerBackend):
    """A real Android phone: the device runner (or a program you provide) over adb."""

    def __init__(self, serial: str | None = None, adb_path: str = "adb", runner: str | None = None,
                 model_dir: str | None = None, remote_dir: str = "/data/local/tmp/bluelm_v",
                 command: str = DEFAULT_COMMAND, output_format: str = "kv", process_name: str | None = None,
                 thermal_limit_c: float = 42.0, max_cool_down_s: float = 300.0,
                 memory_poll_s: float = 0.5, timeout_s: float = 900.0, push: bool = True,
                 python: str = "python3", threads: int = 0, opset: int = 17, export_dir: str | None = None):
        if output_format not in PARSERS:
            raise ValueError(f"output_format must be one of {sorted(PARSERS)}")
        self.adb = Adb(adb_path, serial, timeout_s=timeout_s)
        super().__init__(AdbTransport(self.adb), python=python, remote_dir=remote_dir, threads=threads, opset=opset,
                         export_dir=export_dir, timeout_s=timeout_s, push=push)
        self.runner, self.model_dir = runner, model_dir
        self.command, self.output_format = command, output_format
        self.process_name = process_name or (os.path.basename(runner) if runner else None)
        self.thermal_limit_c, self.max_cool_down_s, self.memory_poll_s = thermal_limit_c, max_cool_down_s, memory_poll_s
        self.info: dict = {}

    # -- set-up ----------------------------------------------------------------------------
    def check_local_files(self) -> None:
        for key, path in (("runner", self.runner), ("model_dir", self.model_dir)):
            if path and not Path(path).exists():
                raise InputError(f"backend.{key}: {path} does not exist")

    def load(self, cfg=None, registry=None) -> dict:
        if self.runner is None:
            if cfg is None:
                raise ConfigError("backend.runner: without a program of your own the adb backend runs the device "
                                  "runner, which needs the model config")
            self.info = super().load(cfg, registry)
            return dict(self.info)
        self.transport.connect()
        self.check_local_files()
        t0 = time.perf_counter()
        if self.push:
            self.adb.shell(f"mkdir -p {shlex.quote(self.remote_dir)}")
            if self.model_dir:
                self.adb.call("push", str(self.model_dir), f"{self.remote_dir}/model")
            self.adb.call("push", str(self.runner), f"{self.remote_dir}/{os.path.basename(self.runner)}")
            self.adb.shell(f"chmod 755 {shlex.quote(self.remote_dir + '/' + os.path.basename(self.runner))}")
        model = self.adb.shell("getprop ro.product.model", check=False).strip()
        soc = self.adb.shell("getprop ro.soc.model", check=False).strip()
        self.info = {"serial": self.adb.serial, "model": model, "soc": soc,
                     "push_s": time.perf_counter() - t0, **parse_meminfo_device(self.adb.shell("dumpsys meminfo", check=False))}
        return dict(self.info)

    def describe(self) -> dict:
        base = super().describe() if self.runner is None else {"backend": "adb", "kind": self.kind,
                                                               "compute_unit": "cpu", "runtime": self.process_name}
        return {**base, "backend": "adb", **{k: v for k, v in self.info.items() if k != "device"}}

    # -- one case --------------------------------------------------------------------------
    def command_for(self, case: dict, grid=None, int8=()) -> str:
        if self.runner is None:
            return super().command_for(case, grid, int8)
        from ..quantizers import quantizer_label

        w, h = case["image"]
        values = {"runner": os.path.basename(self.runner or "runner"), "remote_dir": self.remote_dir,
                  "model_dir": f"{self.remote_dir}/model", "width": w, "height": h,
                  "tiles_per_batch": case["tiles_per_batch"], "prefill_chunk": case["prefill_chunk"],
                  "prompt_tokens": case["prompt_tokens"], "decode_tokens": case["decode_tokens"],
                  "quantizer": shlex.quote(quantizer_label(case.get("quantizer"))),
                  "pipelined": int(bool(case.get("pipelined", True)))}
        try:
            return self.command.format(**values)
        except KeyError as exc:
            raise ConfigError(f"backend.command: unknown placeholder {exc}; known: {sorted(values)}") from None

    def thermal(self) -> dict:
        return self.transport.thermal()

    def process_memory(self) -> dict:
        return parse_meminfo_process(self.adb.shell(f"dumpsys meminfo {self.process_name}", check=False, timeout=30))

    def run_case(self, case: dict) -> dict:
        if self.runner is None:
            metrics = super().run_case(case)
            metrics["thermal_status"] = self.thermal()["status"]
            return metrics
        before = self.thermal()
        peak = {"pss_mb": None, "rss_mb": None}
        stop = threading.Event()

        def sample():
            while not stop.wait(self.memory_poll_s):
                try:
                    mem = self.process_memory()
                except AdbError:
                    continue
                for k in peak:
                    if mem.get(k) is not None:
                        peak[k] = max(peak[k] or 0.0, mem[k])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            output = self.adb.shell(self.command_for(case))
        finally:
            stop.set()
            sampler.join(timeout=5)
        wall = time.perf_counter() - t0
        metrics = PARSERS[self.output_format](output)
        if not metrics:
            raise AdbError(f"the runner printed no metrics in the '{self.output_format}' format; "
                           f"last output: {output.strip()[-300:]!r}")
        after = self.thermal()
        metrics.setdefault("peak_memory_mb", metrics.get("peak_rss_mb") or peak["pss_mb"] or peak["rss_mb"])
        metrics.update({"wall_s": wall, "thermal_before_c": before["max_c"], "thermal_after_c": after["max_c"],
                        "thermal_status": after["status"], "sampled_peak_pss_mb": peak["pss_mb"]})
        return metrics

    def cool_down(self, seconds: float) -> dict:
        """Sleep ``seconds``, then until the hottest sensor is under thermal_limit_c."""
        time.sleep(seconds)
        t0, state = time.perf_counter(), self.thermal()
        while state["max_c"] is not None and state["max_c"] > self.thermal_limit_c \
                and time.perf_counter() - t0 < self.max_cool_down_s:
            time.sleep(5.0)
            state = self.thermal()
        return {"cooled_s": seconds + time.perf_counter() - t0, "thermal_c": state["max_c"]}
