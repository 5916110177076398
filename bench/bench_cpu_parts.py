"""Two CPU kernels of the generate path, alone (SmolLM2-135M shapes, 2 threads by default):

    .venv/bin/python bench/bench_cpu_parts.py              # both tables
    .venv/bin/python bench/bench_cpu_parts.py --keys 4096  # a longer context

1. decode attention over all layers for one token: attn_decode over the fp32 KV cache against
   attn_decode_f16 over the fp16 mirror (bluelm_v/nn/kernels/cpu_layer_ops.py; keys in transposed blocks
   of 16), random cache of ``--keys`` keys;
2. the prefill GEMMs of one 128-row chunk: oneDNN's linear in fp32 against bf16 (what
   quantizer kernel=cpu_bf16 / cpu_lowp runs after dequantising to bf16);
3. the INT4 (g64) decode GEMVs of all layers for one token: fp32 activations (int4_gemm_small,
   kernel=auto) against int8-rounded ones with integer dot products (int4_gemv_q8, cpu_lowp).
Each figure is the best of ``--repeats`` timed loops; the machine is shared, so compare the
rows of one run.
"""
from __future__ import annotations

import argparse
import time

import torch


def best_us(fn, repeats: int, loops: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t0) / loops * 1e6)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keys", type=int, default=2150, help="cached keys attended by the decode step")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bluelm_v.nn.kernels import cpu_layer_ops

    lib = cpu_layer_ops.library()
    if lib is None or lib.has_fast_f16() != 1:
        raise SystemExit("bench_cpu_parts: the C helpers (with AVX-512 + F16C) are needed; see cpu_layer_ops.py")
    layers, kv, heads, d = 30, 3, 9, 64                                        # SmolLM2-135M
    s = -(-(args.keys + 1) // 64) * 64
    k, v = torch.randn(layers, kv, s, d), torch.randn(layers, kv, s, d)        # [L, KV, S, d]
    k_blocks = k.unflatten(2, (s // 16, 16)).transpose(-1, -2).contiguous().half()   # [L, KV, S/16, d, 16]
    v_half = v.half()
    q, out = torch.randn(heads, d), torch.empty(heads * d)
    scratch = torch.empty(args.threads * heads * (d + 2) + heads // kv * s)

    def attention(half: bool):
        for i in range(layers):
            if half:
                lib.attn_decode_f16(q.data_ptr(), k[i].data_ptr(), v[i].data_ptr(), k_blocks[i].data_ptr(),
                                    v_half[i].data_ptr(), heads, kv, d, s, args.keys, 0.125, out.data_ptr(),
                                    scratch.data_ptr(), args.threads)
            else:
                lib.attn_decode(q.data_ptr(), k[i].data_ptr(), v[i].data_ptr(), heads, kv, d, s, args.keys, 0.125,
                                out.data_ptr(), scratch.data_ptr(), args.threads)
    print(f"## decode attention, {layers} layers, {args.keys} keys, {args.threads} threads (ms a token)")
    print("| cache | ms |\n|---|---:|")
    for label, half in (("fp32 (attn_decode)", False), ("fp16 mirror (attn_decode_f16)", True)):
        print(f"| {label} | {best_us(lambda: attention(half), args.repeats, 5) / 1e3:.2f} |")

    linear = torch.ops.mkldnn._linear_pointwise
    print("\n## prefill GEMM, 128 rows (us; oneDNN linear)")
    print("| [K -> N] | fp32 | bf16 | bf16 GFLOP/s |\n|---|---:|---:|---:|")
    for kk, n in ((576, 960), (576, 576), (576, 3072), (1536, 576)):           # qkv, o, gate|up, down
        x, w = torch.randn(128, kk), torch.randn(n, kk)
        xb, wb = x.bfloat16(), w.bfloat16()
        f32 = best_us(lambda: linear(x, w, None, "none", [], ""), args.repeats)
        b16 = best_us(lambda: linear(xb, wb, None, "none", [], ""), args.repeats)
        print(f"| {kk} -> {n} | {f32:.0f} | {b16:.0f} | {2 * 128 * kk * n / b16 / 1e3:.0f} |")

    import torch.nn as nn

    from bluelm_v.nn.kernels import cpu_quant as cpu_kernels
    from bluelm_v.nn.quant_linear import Int4Linear

    qlib, q8 = cpu_kernels.library(), cpu_kernels.q8_gemv()
    if q8 is None:
        print("\n(no INT4 int8-activation kernel in this build: AVX-512 VNNI needed)")
        return
    print(f"\n## INT4 g64 decode GEMVs, {layers} layers (ms a token)")
    print("| activations | ms |\n|---|---:|")
    mats = [Int4Linear.from_linear(nn.Linear(kk, n, bias=False), group_size=64)
            for kk, n in ((576, 960), (576, 576), (576, 3072), (1536, 576))]
    xs = [torch.randn(m.in_features) for m in mats]
    ys = [torch.empty(m.out_features) for m in mats]

    def gemvs(int8_act: bool):
        for m, x, y in zip(mats, xs, ys):
            q, s_, z = m.qweight.data_ptr(), m.scales.data_ptr(), m.zeros.data_ptr()
            if int8_act:
                q8(x.data_ptr(), m.in_features, q, s_, z, None, m.out_features, 64, y.data_ptr(), args.threads)
            else:
                qlib.int4_gemm_small(x.data_ptr(), 1, m.in_features, q, s_, z, None, m.out_features, 64,
                                     y.data_ptr(), args.threads)
    for label, int8_act in (("fp32 (int4_gemm_small)", False), ("int8-rounded (int4_gemv_q8)", True)):
        print(f"| {label} | {best_us(lambda: gemvs(int8_act), args.repeats, 50) * layers / 1e3:.2f} |")


if __name__ == "__main__":
    main()
