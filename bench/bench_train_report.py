"""Helpers of bench/bench_train_gpu.py: phase timing, the result table, and the timing of the
document-masked attention kernels the train job can use for packed rows (jobs/train/decoder.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

ROW_TAG = "BENCH_ROW "


def compiled_graphs() -> int:
    """Graphs torch.compile has made so far in this process (a count that moves while timing
    means recompiles inside the timed steps)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """GPU time per phase (forward / backward / step) of one optimizer step, from CUDA events on
    the current stream (no synchronisation inside the step); wall time on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self):
        self.marks = []

    def mark(self, phase: str):
        import torch

        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((phase, ev))
        else:
            self.marks.append((phase, time.perf_counter()))

    def totals(self) -> dict:
        out: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[phase] = out.get(phase, 0.0) + dt
        return {p: round(v, 4) for p, v in out.items()}


def report(rows, out: str | None) -> None:
    lines = ["| variant | data | fill | samples/step | real tokens/step | step (s) | real tokens/s | model TFLOP/s "
             "| MFU | MFU fwd+bwd only | peak GPU mem (GiB) | GPU s fwd / bwd / step | graphs while timed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['label']} | {r.get('data', '?')}{' packed' if r.get('pack') else ''} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} | | | | | | | | | | |")
            continue
        g = r["gpu_s"]
        lines.append(head + f"| {100 * r['fill']:.1f}% | {r['samples_per_step']:.1f} | {r['tokens_per_step']:.0f} "
                     f"| {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% "
                     f"| {100 * r['mfu_fwd_bwd']:.1f}% | {r['peak_gib']:.1f} "
                     f"| {g.get('forward', 0):.3f} / {g.get('backward', 0):.3f} / {g.get('step', 0):.3f} "
                     f"| {r.get('graphs_compiled_while_timed', 0)} |")
    lines.append(f"peak: {next((r['peak_src'] for r in rows if 'peak_src' in r), '?')}")
    for r in rows:
        if r.get("profile"):
            lines.append(f"profile of one step, {r['label']}: {json.dumps(r['profile'])}")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def attention_table(device, tiny: bool = False, repeats: int = 5) -> str:
    """Forward + backward time of one layer's attention over packed rows (4 samples of a
    LLaVA-like row) for each layout of jobs/train/decoder.py, against plain causal attention
    over the same rows (which would let samples see each other). Where a kernel has no
    backward on this device, its forward alone is timed and the row says so."""
    import torch

    from bluelm_v.jobs.train.decoder import attend, attention_layout, varlen_available

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    b, length, heads, d = (2, 512, 4, 16) if tiny else ((4, 4096, 36, 64) if cuda else (1, 2048, 8, 64))
    docs = [round(length * f) for f in (0.30, 0.22, 0.34)]
    docs.append(length - sum(docs))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, length, heads, d, generator=gen).to(device, dtype) for _ in range(3))   # [B, L, H, d]
    work = b * sum(n * n for n in docs) / 2 * 4 * heads * d                   # causal FLOPs of the real documents, fwd
    lines = [f"attention over packed rows: {b} x {length} tokens, documents {docs}, {heads} heads x {d}, "
             f"{dtype}, {device.type}",
             "| layout | fwd+bwd ms | fwd ms | document-causal TFLOP/s (fwd+bwd) | max abs diff vs sdpa | note |",
             "|---|---|---|---|---|---|"]
    ref = attend(q.float(), k.float(), v.float(), attention_layout("sdpa", [docs] * b, length, device), d ** -0.5)
    kinds = ["causal", "sdpa", "flex", "varlen"]
    for kind in kinds:
        note = "no document mask: samples see each other (reference only)" if kind == "causal" else ""
        if kind in ("flex", "varlen") and not cuda:
            note = "FlexAttention has no CPU backward" if kind == "flex" else "CUDA only"
        if kind == "varlen" and not varlen_available():
            note = "this torch has no torch.nn.attention.varlen"
        if note and kind != "causal":
            lines.append(f"| {kind} | - | - | - | - | {note} |")
            continue
        layout = attention_layout(kind, None if kind == "causal" else [docs] * b, length, device)
        fn = attend
        if kind == "flex":
            fn = torch.compile(attend)
        times = {}
        for grad in (False, True):
            qq, kk, vv = (t.detach().requires_grad_(grad) for t in (q, k, v))
            best = float("inf")
            for _ in range(repeats + 1):
                sync(device)
                t0 = time.perf_counter()
                o = fn(qq, kk, vv, layout, d ** -0.5)
                if grad:
                    o.sum().backward()
                sync(device)
                best = min(best, time.perf_counter() - t0)
            times[grad] = best
        tflops = 3 * work / times[True] / 1e12
        with torch.no_grad():
            diff = float((fn(q, k, v, layout, d ** -0.5).float() - ref).abs().max())
        lines.append(f"| {kind} | {1e3 * times[True]:.2f} | {1e3 * times[False]:.2f} | {tflops:.1f} | {diff:.2e} "
                     f"| {note} |")
    return "\n".join(lines)
