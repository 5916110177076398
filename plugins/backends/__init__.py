"""Device backends (family ``backend``): where a built pipeline runs and is measured.

    local_torch    this host's CPU (or CUDA): the real runtime, with the configured quantizer
    onnxruntime    encoder+downsampler+projector and the LLM's prefill/decode steps exported to
                   ONNX and run with ONNX Runtime (CPU provider): the route a phone NPU SDK takes
    simulated_npu  a phone SoC as a roofline cost model of the real model's FLOPs and bytes
    ssh            a Linux board over SSH running the device runner (bluelm_v/runner.py)
    adb            a real Android phone over adb: the device runner, or a program you provide
                   (llama.cpp's binaries), with memory and thermal readings
The ssh and adb backends reach their device through one transport interface (transport.py).

Contract (bluelm_v.hookspecs): ``backend.load(cfg, registry) -> dict`` (once per device; the
composed config and the registry the worker built), ``backend.run_case(case) -> dict`` of measured figures; optional ``describe()``,
``cool_down(seconds)``, ``close()``. A case is a plain dict: image [w, h], tiles_per_batch,
prefill_chunk, prompt_tokens, decode_tokens, quantizer (a node or null), pipelined, seed.

This module also answers the ``bluelm_v_devices`` hook: the devices of ``job.inventory`` (a
devices.yaml file, inventory.py) and, with ``job.discover_adb: true``, every phone that ``adb
devices`` lists that the inventory does not already name (settings from ``job.adb_defaults``).
"""
from __future__ import annotations

from bluelm_v import hookimpl

from .adb import PARSERS, Adb, AdbBackend, AdbError
from .inventory import read_inventory
from .local_torch import LocalTorch
from .onnx_runtime import OnnxRuntimeBackend
from .simulated_npu import SimulatedNpu
from .ssh import SshBackend

RUNNER_RANGES = {"threads": (0, None), "timeout_s": (1, None), "opset": (14, None)}


@hookimpl
def bluelm_v_register(registry):
    registry.backend.register(
        "local_torch", LocalTorch,
        description="this host (CPU, or CUDA if present): the real runtime with the configured quantizer",
        choices={"device": ("auto", "cpu", "cuda"), "engine": ("auto", "fast", "hf")},
        ranges={"threads": (0, None), "check_rtol": (0, None), "check_rtol_kv_quantized": (0, None)})
    registry.backend.register(
        "onnxruntime", OnnxRuntimeBackend,
        description="ONNX export of encoder+projector and LLM prefill/decode steps, run by ONNX Runtime (CPU)",
        ranges={"opset": (14, None), "threads": (0, None), "check_rtol": (0, None), "check_rtol_quantized": (0, None)})
    registry.backend.register(
        "simulated_npu", SimulatedNpu,
        description="roofline cost model of a phone SoC (profile: dimensity9300, or any in config)",
        choices={"model": ("paper", "config")}, ranges={"realtime_scale": (0, None)})
    registry.backend.register(
        "ssh", SshBackend,
        description="a Linux board over SSH: the export and the device runner pushed, cases run there",
        ranges={**RUNNER_RANGES, "port": (1, 65535), "connect_timeout_s": (0.1, None), "keepalive_s": (0, None)})
    registry.backend.register(
        "adb", AdbBackend,
        description="a real Android phone over adb: the device runner or your program, memory, thermal",
        choices={"output_format": tuple(PARSERS)},
        ranges={**RUNNER_RANGES, "thermal_limit_c": (0, None), "memory_poll_s": (0.05, None)})


@hookimpl
def bluelm_v_devices(config):
    """The devices of ``job.inventory`` + attached phones (``adb devices``) when
    ``job.discover_adb`` is true (none when adb is not installed)."""
    job = (config or {}).get("job") or {}
    found = read_inventory(job["inventory"]) if job.get("inventory") else []
    if not job.get("discover_adb"):
        return found
    defaults = dict(job.get("adb_defaults") or {})
    try:
        entries = Adb(defaults.get("adb_path", "adb")).devices()
    except AdbError:
        return found
    known = {d["backend"].get("serial") for d in found if d["backend"]["name"] == "adb"}
    return found + [{"name": f"adb-{e.serial}", "backend": {"name": "adb", **defaults, "serial": e.serial}}
                    for e in entries if e.state == "device" and e.serial not in known]
