"""Calibrate the simulated_npu `dimensity9300` profile against the paper and print the table.

    .venv/bin/python bench/calibrate_simulated_npu.py            # fit + table (needs scipy)
    .venv/bin/python bench/calibrate_simulated_npu.py --check    # table of the shipped profile only

What is fixed, what is fitted (documented in conf/backend/dimensity9300.yaml):
  fixed from the SoC's data sheet: memory_bandwidth_gbps 76.8 (LPDDR5T-9600, 64 bit)
  fixed priors (not identifiable from the paper's figures): call_overhead_ms 3, rows_half 8,
      int8_tops = 2 x fp16_tflops (a usual NPU ratio; the paper's scheme never uses the path),
      on_chip_mb = 72 (the middle of the window the paper's two optima leave: a 4-tile ViT
      call's attention-score tensor is 68.0 MB, a 512-token chunk's 75.5 MB)
  closed form: cpu_conv_gflops (the paper's 40 ms Conv2D per tile), storage_read_gbps
      (0.47 s to load both parts), runtime_base_mb (2.2 GB peak with the ViT released)
  least squares (log error): bandwidth_efficiency, fp16_tflops, int4_tops, batch_half against
      ViT 300 ms (1 tile) and 800 ms (4 tiles) per call, 2.06 s encode of a 2:4 image at 4
      tiles per batch, 2.7 s prefill of 2048 tokens at t128, 24.4 decode tokens/s.
The orderings (4 tiles fastest, t128 fastest) are NOT fitted: the table shows whether they
come out of the model.
"""
from __future__ import annotations

import argparse
import math
import sys

from bluelm_v.plugins.backends.npu_cost import CostModel, NpuProfile
from bluelm_v.plugins.backends.simulated_npu import SimulatedNpu

PAPER = {"vit_1_tile_s": 0.3, "vit_4_tiles_s": 0.8, "encode_s": 2.06, "prefill_s": 2.7,
         "decode_tokens_per_s": 24.4, "load_s": 0.47, "peak_memory_mb": 2200.0}
BASE_CASE = {"image": [768, 1536], "tiles_per_batch": 4, "prefill_chunk": 128, "prompt_tokens": 2048,
             "decode_tokens": 0, "kv_cache_tokens": 2048, "quantizer": {"name": "bluelm_mixed"}}
FIXED = {"memory_bandwidth_gbps": 76.8, "call_overhead_ms": 3.0, "rows_half": 8.0, "on_chip_mb": 72.0}
FITTED = ("bandwidth_efficiency", "fp16_tflops", "int4_tops", "batch_half")


def loaded_sim() -> SimulatedNpu:
    from bluelm_v import plugin_manager

    sim = SimulatedNpu(profile="dimensity9300")
    sim.load({"tiler": {"name": "relaxed", "max_grid": 4}, "plugins": {}}, plugin_manager.get()[1])
    return sim


def use(sim: SimulatedNpu, profile: NpuProfile) -> None:
    sim.profile, sim.cost = profile, CostModel(profile)


def figures(sim: SimulatedNpu) -> dict:
    from bluelm_v.plugins.backends.precision import precision_plan

    vit = precision_plan(BASE_CASE["quantizer"])["encoder"]
    enc = sim.shapes["encoder"]
    out = {"vit_1_tile_s": sim.cost.call_time(sim.cost.vit_call(enc, 1, vit)),
           "vit_4_tiles_s": sim.cost.call_time(sim.cost.vit_call(enc, 4, vit))}
    base = sim.run_case(BASE_CASE)
    out.update({k: base[k] for k in ("encode_s", "prefill_s", "decode_tokens_per_s", "load_s", "peak_memory_mb",
                                      "encode_hidden_by_pipeline_s")})
    out["encode_by_tiles_per_batch"] = {b: sim.run_case({**BASE_CASE, "tiles_per_batch": b})["encode_s"] for b in (1, 2, 4, 6)}
    out["prefill_by_chunk"] = {t: sim.run_case({**BASE_CASE, "prefill_chunk": t})["prefill_s"] for t in (32, 128, 512, 2048)}
    return out


def fit(sim: SimulatedNpu) -> NpuProfile:
    import numpy as np
    from scipy.optimize import least_squares

    enc = sim.shapes["encoder"]
    conv = enc.patch.flops(enc.tokens_per_item) / 0.040 / 1e9          # 40 ms per tile

    def profile(x, storage=3.5, base=0.0):
        v = dict(zip(FITTED, np.exp(x)))
        v["bandwidth_efficiency"] = min(v["bandwidth_efficiency"], 1.0)
        return NpuProfile.from_dict({**FIXED, **v, "int8_tops": 2 * v["fp16_tflops"], "cpu_conv_gflops": conv,
                                     "storage_read_gbps": storage, "runtime_base_mb": base})

    def residuals(x):
        use(sim, profile(x))
        f = figures(sim)
        return [math.log(f[k] / PAPER[k]) * (2 if k == "encode_s" else 1)
                for k in ("vit_1_tile_s", "vit_4_tiles_s", "encode_s", "prefill_s", "decode_tokens_per_s")]

    sol = least_squares(residuals, np.log([0.6, 4.0, 8.0, 0.8]))
    use(sim, profile(sol.x))
    f = figures(sim)
    storage = f["load_s"] * 3.5 / PAPER["load_s"]                       # load_s scales as 1/storage
    base = PAPER["peak_memory_mb"] - f["peak_memory_mb"]                 # f computed with base 0
    return profile(sol.x, storage, base)


def table(f: dict) -> str:
    rows = [("ViT call, 1 tile (s)", f["vit_1_tile_s"], PAPER["vit_1_tile_s"]),
            ("ViT call, 4 tiles (s)", f["vit_4_tiles_s"], PAPER["vit_4_tiles_s"]),
            ("encode 2:4 image, 4 tiles/batch (s)", f["encode_s"], PAPER["encode_s"]),
            ("hidden by pipelining (s)", f["encode_hidden_by_pipeline_s"], 0.2),
            ("load ViT + LLM (s)", f["load_s"], PAPER["load_s"]),
            ("prefill 2048 tokens, t128 (s)", f["prefill_s"], PAPER["prefill_s"]),
            ("decode (tokens/s)", f["decode_tokens_per_s"], PAPER["decode_tokens_per_s"]),
            ("peak memory (MB)", f["peak_memory_mb"], PAPER["peak_memory_mb"])]
    lines = ["| figure | simulated | paper |", "|---|---|---|"]
    lines += [f"| {n} | {a:.3f} | {b} |" for n, a, b in rows]
    enc, pre = f["encode_by_tiles_per_batch"], f["prefill_by_chunk"]
    lines.append("\n| tiles per batch | " + " | ".join(map(str, enc)) + " |\n" + "|---" * (len(enc) + 1) + "|")
    lines.append("| encode 2:4 (s) | " + " | ".join(f"{v:.3f}" for v in enc.values()) + " |")
    lines.append("\n| prefill chunk | " + " | ".join(f"t{t}" for t in pre) + " |\n" + "|---" * (len(pre) + 1) + "|")
    lines.append("| prefill 2048 (s) | " + " | ".join(f"{v:.3f}" for v in pre.values()) + " |")
    lines.append(f"\nfastest tiles per batch: {min(enc, key=enc.get)}; fastest chunk: t{min(pre, key=pre.get)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only print the table of the shipped profile")
    args = ap.parse_args(argv)
    sim = loaded_sim()
    if not args.check:
        p = fit(sim)
        use(sim, p)
        print("# fitted profile (paste under `profile:` in conf/backend/dimensity9300.yaml)")
        for k, v in p.to_dict().items():
            print(f"  {k}: {v:.4g}")
        print()
    print(table(figures(sim)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
