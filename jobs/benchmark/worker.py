"""The process that drives one device (a Ray actor): builds its backend from the registry,
loads it once, and measures cases: warm-up runs, N trials, a stability check, a cool-down.

    worker = DeviceWorker(device, config)          # device: a normalised inventory entry
    worker.load()                                  # -> {"load_wall_s", "backend": describe(), ...}
    worker.measure(case, protocol)                 # -> {"metrics", "spread", "stable", "trials", ...}

Figures of a case are the medians over its trials; ``spread`` is (max - min) / median per
timing metric. A case whose spread exceeds ``max_spread`` gets up to ``extra_trials`` more
trials and is marked ``stable: false`` if it stays above.
"""
from __future__ import annotations

import os
import statistics
import time

TIMINGS = ("encode_s", "prefill_s", "ttft_s", "decode_tokens_per_s")


def device_config(cfg: dict, device: dict) -> dict:
    """The config a device sees: its ``overrides`` replace top-level nodes."""
    out = dict(cfg)
    out.update(device.get("overrides") or {})
    return out


def aggregate(runs: list[dict]) -> dict:
    """Median of every numeric metric over the runs; other values from the last run."""
    out = dict(runs[-1])
    for key, value in runs[-1].items():
        values = [r.get(key) for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
    return out


def spread(runs: list[dict]) -> dict:
    out = {}
    for key in TIMINGS:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if len(values) == len(runs) and values:
            mid = statistics.median(values)
            out[key] = (max(values) - min(values)) / mid if mid else 0.0
    return out


class DeviceWorker:
    """One device's backend in its own process (wrapped with ray.remote by the scheduler)."""

    def __init__(self, device: dict, config: dict):
        from omegaconf import OmegaConf

        from bluelm_v.plugin_manager import from_config

        self.device = device
        self.cfg = OmegaConf.create(device_config(config, device))
        self.registry = from_config(self.cfg)[1]
        self.backend = self.registry.create_from_config("backend", device["backend"],
                                                        f"job.devices[{device['name']}].backend")

    def pid(self) -> int:
        return os.getpid()

    def load(self) -> dict:
        t0 = time.perf_counter()
        info = self.backend.load(self.cfg, self.registry) or {}
        describe = self.backend.describe() if hasattr(self.backend, "describe") else {}
        return {"load_wall_s": time.perf_counter() - t0, "info": info, "backend": describe,
                "kind": getattr(self.backend, "kind", "real"), "pid": os.getpid()}

    def measure(self, case: dict, protocol: dict) -> dict:
        t0 = time.perf_counter()
        for _ in range(int(protocol.get("warmup", 1))):
            self.backend.run_case(case)
        runs = [self.backend.run_case(case) for _ in range(max(1, int(protocol.get("trials", 3))))]
        max_spread, extra = float(protocol.get("max_spread", 0.1)), int(protocol.get("extra_trials", 0))
        while extra > 0 and any(v > max_spread for v in spread(runs).values()):
            runs.append(self.backend.run_case(case))
            extra -= 1
        spreads = spread(runs)
        cooled = None
        cool = float(protocol.get("cool_down_s", 0) or 0)
        if cool > 0:
            cooled = self.backend.cool_down(cool) if hasattr(self.backend, "cool_down") else time.sleep(cool)
        return {"metrics": aggregate(runs), "spread": spreads,
                "stable": all(v <= max_spread for v in spreads.values()), "trials": len(runs),
                "per_trial": [{k: r.get(k) for k in (*TIMINGS, "peak_memory_mb") if k in r} for r in runs],
                "cool_down": cooled, "measure_wall_s": time.perf_counter() - t0, "pid": os.getpid()}

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()
