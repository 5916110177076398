"""Where a training step's GPU time goes: kernel seconds by kind, GPU idle time and the CPU work
that was running while the GPU idled, and the host synchronisations of a step.

    summary = profile_step(lambda: one_step(), device, gemm_flops=..., attn_flops=..., attn_work=...)
    syncs = count_syncs(lambda: one_step())          # {"file.py:123": n, ...} (CUDA only)

Kinds (by kernel name): gemm (cuBLAS / CUTLASS / nvjet), attention (flash / cuDNN / fmha), triton
(torch.compile's fused kernels), optimizer (fused Adam, multi-tensor), nccl, copy (memcpy / memset /
copy kernels), eager (every other kernel). Idle gaps between merged kernel intervals are charged
to the innermost CPU event (aten op, CUDA runtime call, ``phase:*`` annotation) covering the gap's
midpoint: the host work the GPU was waiting for. The profiler slows the host, so the span of the
profiled step overstates idle time; kernel seconds are unaffected.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

GEMM_KEYS = ("gemm", "xmma", "nvjet", "cutlass", "gemv", "splitk", "cublas")


def kernel_kind(name: str, cat: str) -> str:
    n = name.lower()
    if cat != "kernel" or "memcpy" in n or "memset" in n:
        return "copy"
    if "flash" in n or "fmha" in n or "sdpa" in n or "attention" in n:
        return "attention"
    if any(k in n for k in GEMM_KEYS):
        return "gemm"
    if "nccl" in n:
        return "nccl"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if n.startswith("triton"):
        return "triton"
    if "copy" in n or "cat" in n.split("_"):
        return "copy"
    return "eager"


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def idle_by_cpu_event(busy: list[tuple[float, float]], cpu: list[dict], min_gap_us: float = 5.0):
    """(seconds by innermost CPU event name, seconds by phase) over the gaps of ``busy``."""
    long = [e for e in cpu if e["dur"] > 1000]
    short = sorted((e for e in cpu if e["dur"] <= 1000), key=lambda e: e["ts"])
    starts = [e["ts"] for e in short]
    by_name: dict[str, float] = {}
    by_phase: dict[str, float] = {}
    for (_, end), (nxt, _) in zip(busy, busy[1:]):
        gap = nxt - end
        if gap < min_gap_us:
            continue
        m = end + gap / 2
        cover = [e for e in long if e["ts"] <= m <= e["ts"] + e["dur"]]
        i = bisect.bisect_right(starts, m) - 1
        while i >= 0 and starts[i] >= m - 1000:
            e = short[i]
            if e["ts"] + e["dur"] >= m:
                cover.append(e)
            i -= 1
        phase = next((e["name"] for e in cover if e["name"].startswith("phase:")), "phase:none")
        inner = min((e for e in cover if not e["name"].startswith("phase:")), key=lambda e: e["dur"], default=None)
        name = inner["name"][:70] if inner else "(no CPU event)"
        by_name[name] = by_name.get(name, 0.0) + gap / 1e6
        by_phase[phase] = by_phase.get(phase, 0.0) + gap / 1e6
    return by_name, by_phase


def profile_step(run_step, device, gemm_flops: float = 0.0, attn_flops: float = 0.0, attn_work: float = 0.0,
                 top: int = 8) -> dict:
    """Run ``run_step()`` once under torch.profiler; returns the summary described above."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=acts) as prof:
        run_step()
        if cuda:
            torch.cuda.synchronize(device)
    path = f"/tmp/bluelm_v_prof_{os.getpid()}.json"
    prof.export_chrome_trace(path)
    events = json.loads(Path(path).read_text()).get("traceEvents", [])
    os.unlink(path)
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
           and "dur" in e and e.get("ph") == "X"]
    by: dict[str, float] = {}
    attn_names: dict[str, float] = {}
    for e in gpu:
        kind = kernel_kind(e["name"], e["cat"])
        by[kind] = by.get(kind, 0.0) + e["dur"] / 1e6
        if kind == "attention":
            attn_names[e["name"][:60]] = attn_names.get(e["name"][:60], 0.0) + e["dur"] / 1e6
    busy = merged([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    out = {"kernel_s": {k: round(v, 4) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
           "busy_s": round(sum(b - a for a, b in busy) / 1e6, 4),
           "span_s": round((busy[-1][1] - busy[0][0]) / 1e6, 4) if busy else 0.0,
           "attn_kernels": sorted(attn_names, key=attn_names.get, reverse=True)[:2]}
    if by.get("gemm") and gemm_flops:
        out["gemm_tflops"] = round(gemm_flops / by["gemm"] / 1e12, 1)
    if by.get("attention") and attn_flops:
        out["attn_tflops_counted"] = round(attn_flops / by["attention"] / 1e12, 1)
        out["attn_tflops_work"] = round(attn_work / by["attention"] / 1e12, 1)
    if busy:
        names, phases = idle_by_cpu_event(busy, cpu)
        out["idle_by_phase_s"] = {k: round(v, 4) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])}
        out["idle_by_cpu_event_s"] = {k: round(v, 4) for k, v in
                                      sorted(names.items(), key=lambda kv: -kv[1])[:top]}
    return out


def count_syncs(run_step, top: int = 8) -> dict:
    """Host-device synchronisations during ``run_step()`` by Python source line (CUDA only)."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        return {}
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            run_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).name}:{w.lineno}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top]) | {"total": sum(counts.values())}
