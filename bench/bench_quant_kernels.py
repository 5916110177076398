"""Time every candidate matmul path for quantised weights and print a table.

w4 rows use asymmetric groups (float zero points) unless marked (symmetric): ONNX Runtime's
MatMulNBits falls back to a slow path with float zero points, so it is timed both ways.

    .venv/bin/python bench/bench_quant_kernels.py                      # 2304x5760, batch 1 and 128, 2 threads
    .venv/bin/python bench/bench_quant_kernels.py --shape 576x1536 --batch 1 --threads 2
    .venv/bin/python bench/bench_quant_kernels.py --device cuda        # GPU paths (fp16, int4 tinygemm)

A "2304x5760 layer" is nn.Linear(2304, 5760) (MiniCPM-2B's MLP up-projection): weight [5760, 2304].
Each path is checked against the fp32 matmul of the *dequantised* weight (max relative error) so
a fast but wrong kernel shows up. Times are medians over ``--reps`` calls after warm-up.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bluelm_v.nn import packing
from bluelm_v.nn.kernels import quant_matmul as kernels  # noqa: E402


STAT = "median"


def median_ms(fn, reps: int, sync=lambda: None) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times) if STAT == "min" else statistics.median(times)


def candidates(weight: torch.Tensor, group_size: int, device: str):
    """name -> (weight bytes, callable x -> y, reference weight used for the error check)."""
    q8, s8 = packing.quantize_int8(weight)
    w8_ref = packing.dequantize_int8(q8, s8)
    p4, s4, z4 = packing.quantize_int4(weight, group_size, symmetric=False)
    w4_ref = packing.dequantize_int4(p4, s4, z4, group_size)
    b8 = q8.numel() + s8.numel() * 4
    b4 = p4.numel() + 2 * s4.numel() * 2
    # name -> (weight bytes, a function building the kernel (None: not on this device), reference weight);
    # kernels are built right before they are timed and dropped after (no idle ORT pools meanwhile)
    out: dict[str, tuple] = {"fp32 F.linear": (weight.numel() * 4, lambda: lambda x: F.linear(x, weight), weight)}
    if device == "cuda":
        w16 = weight.half()
        out["fp16 F.linear"] = (w16.numel() * 2, lambda: lambda x: F.linear(x.half(), w16).float(), weight)
    for name in kernels.INT8_PATHS:
        out[f"w8 {name}"] = (b8, lambda name=name: kernels.make_int8(name, q8, s8, device), w8_ref)
    for name in kernels.INT4_PATHS:
        out[f"w4 {name}"] = (b4, lambda name=name: kernels.make_int4(name, p4, s4, z4, group_size, device), w4_ref)
    # ONNX Runtime only has a fast path without float zero points: time it on symmetric weights too
    p4s, s4s, _ = packing.quantize_int4(weight, group_size, symmetric=True)
    w4s_ref = packing.dequantize_int4(p4s, s4s, None, group_size)
    for name in ("ort", "ort_int8act", "cpu_fused", "cpu_tiled"):
        out[f"w4 {name} (symmetric)"] = (p4s.numel() + s4s.numel() * 2,
                                         lambda name=name: kernels.make_int4(name, p4s, s4s, None, group_size, device),
                                         w4s_ref)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="2304x5760", help="IN x OUT features")
    ap.add_argument("--batch", default="1,128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stat", default="median", choices=["median", "min"], help="min is steadier on a busy machine")
    ap.add_argument("--only", default="", help="comma list of substrings of path names to run")
    args = ap.parse_args(argv)
    global STAT
    STAT = args.stat
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, n = (int(v) for v in args.shape.split("x"))
    weight = (torch.randn(n, k) * 0.02).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    cands = candidates(weight, args.group_size, args.device)
    only = [s for s in args.only.split(",") if s]
    print(f"# torch {torch.__version__}, device {args.device}, threads {args.threads}, "
          f"layer {k}x{n} (weight [{n}, {k}]), w4 group {args.group_size}, timing: {args.stat} of {args.reps}")
    print(f"| path | weight MB | " + " | ".join(f"batch {b} ms" for b in args.batch.split(",")) + " | max rel err |")
    print("|---|---|" + "---|" * len(args.batch.split(",")) + "---|")
    for name, (nbytes, build, ref_w) in cands.items():
        if only and not any(s in name for s in only):
            continue
        fn = build()
        if fn is None:
            continue
        cells, err = [], 0.0
        for b in (int(v) for v in args.batch.split(",")):
            x = torch.randn(b, k, device=args.device)
            try:
                y = fn(x)
                ref = F.linear(x, ref_w)
                err = max(err, ((y.float() - ref).abs().max() / ref.abs().max()).item())
                cells.append(f"{median_ms(lambda: fn(x), args.reps, sync):.3f}")
            except Exception as exc:  # noqa: BLE001 -- a path that fails is reported, not fatal
                cells.append(f"failed: {type(exc).__name__}: {str(exc)[:60]}")
        print(f"| {name} | {nbytes / 2**20:.1f} | " + " | ".join(cells) + f" | {err:.1e} |", flush=True)
        del fn
        gc.collect()


if __name__ == "__main__":
    main()
