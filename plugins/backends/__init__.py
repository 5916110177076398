"""Device backends (family ``backend``): where a built pipeline runs and is measured.

    local_torch    this host's CPU (or CUDA): the real runtime, with the configured quantizer
    onnxruntime    encoder+downsampler+projector and the LLM's prefill/decode steps exported to
                   ONNX and run with ONNX Runtime (CPU provider): the route a phone NPU SDK takes
    simulated_npu  a phone SoC as a roofline cost model of the real model's FLOPs and bytes
    adb            a real Android phone over adb (push model + runner, run, parse, memory, thermal)

Contract (bluelm_v.hookspecs): ``backend.load(cfg, registry) -> dict`` (once per device; the
composed config and the registry the worker built), ``backend.run_case(case) -> dict`` of measured figures; optional ``describe()``,
``cool_down(seconds)``, ``close()``. A case is a plain dict: image [w, h], tiles_per_batch,
prefill_chunk, prompt_tokens, decode_tokens, quantizer (a node or null), pipelined, seed.

This module also answers the ``bluelm_v_devices`` hook: with ``job.discover_adb: true`` every
phone that ``adb devices`` lists joins the benchmark inventory (the adb backend's settings come
from ``job.adb_defaults``).
"""
from __future__ import annotations

from bluelm_v import hookimpl

from .adb import PARSERS, Adb, AdbBackend, AdbError
from .local_torch import LocalTorch
from .onnx_runtime import OnnxRuntimeBackend
from .simulated_npu import SimulatedNpu


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
        "adb", AdbBackend,
        description="a real Android phone over adb: push model + runner, run, parse, memory, thermal",
        choices={"output_format": tuple(PARSERS)},
        ranges={"thermal_limit_c": (0, None), "timeout_s": (1, None), "memory_poll_s": (0.05, None)})


@hookimpl
def bluelm_v_devices(config):
    """Attached phones (``adb devices``) when ``job.discover_adb`` is true; none otherwise or
    when adb is not installed."""
    job = (config or {}).get("job") or {}
    if not job.get("discover_adb"):
        return []
    defaults = dict(job.get("adb_defaults") or {})
    try:
        entries = Adb(defaults.get("adb_path", "adb")).devices()
    except AdbError:
        return []
    return [{"name": f"adb-{e.serial}", "backend": {"name": "adb", **defaults, "serial": e.serial}}
            for e in entries if e.state == "device"]
