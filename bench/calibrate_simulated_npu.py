"""Calibrate the simulated Dimensity 9300 on one set of the paper's figures, predict the others.

    .venv/bin/python bench/calibrate_simulated_npu.py            # fit + predicted-vs-published table
    .venv/bin/python bench/calibrate_simulated_npu.py --check    # the table of the shipped profile only

Where each number of conf/backend/dimensity9300.yaml comes from:
  data sheet   memory_bandwidth_gbps 76.8 (LPDDR5T-9600, 64 bit), on_chip_mb 10 (the 10 MB
               system-level cache the APU shares; the APU's own SRAM is unpublished),
               storage_read_gbps 4.2 (UFS 4.0 sequential read)
  priors       call_overhead_ms 3, rows_half 8, runtime_base_mb 150, int8_tops = 2 x fp16,
               int4_tops = fp16_tflops (the LLM's activations are 16-bit: INT4 weights save
               bytes, the MACs stay 16-bit wide)
  fitted       on the CALIBRATION set only: ViT call 300 ms (1 tile) and 800 ms (4 tiles) ->
               fp16_tflops, batch_half; decode 24.4 tokens/s -> bandwidth_efficiency (least
               squares, exact: three figures, three unknowns); the 40 ms CPU Conv2D per tile ->
               cpu_conv_gflops (closed form)
  predicted    everything else: encode of the 2:4 image and what pipelining hides, load, prefill,
               peak memory, the fastest tiles per batch and chunk, and the MiniCPM-V 2.5 llama.cpp
               row on the same phone's CPU (plugins/backends/cpu_cost.py DIMENSITY_9300_CPU, whose
               bandwidth_efficiency is the NPU's: the same DRAM). Errors are printed as they come.
"""
from __future__ import annotations

import argparse
import math
import sys

from bluelm_v.plugins.backends.npu_cost import CostModel, NpuProfile
from bluelm_v.plugins.backends.simulated_npu import SimulatedNpu

PAPER = {"vit_1_tile_s": 0.3, "vit_4_tiles_s": 0.8, "encode_s": 2.06, "prefill_s": 2.7,
         "decode_tokens_per_s": 24.4, "load_s": 0.47, "peak_memory_mb": 2200.0,
         "encode_hidden_by_pipeline_s": 0.2, "best_tiles_per_batch": 4, "best_prefill_chunk": 128}
MINICPM_PAPER = {"image_processing_s": 4.0, "prefill_s": 13.9, "decode_tokens_per_s": 4.9}
CALIBRATION = ("vit_1_tile_s", "vit_4_tiles_s", "decode_tokens_per_s")
BASE_CASE = {"image": [768, 1536], "tiles_per_batch": 4, "prefill_chunk": 128, "prompt_tokens": 2048,
             "decode_tokens": 0, "kv_cache_tokens": 2048, "quantizer": {"name": "bluelm_mixed"}}
FIXED = {"memory_bandwidth_gbps": 76.8, "on_chip_mb": 10.0, "storage_read_gbps": 4.2,     # data sheet
         "call_overhead_ms": 3.0, "rows_half": 8.0, "runtime_base_mb": 150.0}                # priors
FITTED = ("bandwidth_efficiency", "fp16_tflops", "batch_half")


def loaded_sim() -> SimulatedNpu:
    from bluelm_v.plugin_manager import get

    sim = SimulatedNpu(profile="dimensity9300")
    sim.load({"tiler": {"name": "relaxed", "max_grid": 4}, "plugins": {}}, get()[1])
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

    def profile(x):
        v = dict(zip(FITTED, np.exp(x)))
        v["bandwidth_efficiency"] = min(v["bandwidth_efficiency"], 1.0)
        return NpuProfile.from_dict({**FIXED, **v, "int8_tops": 2 * v["fp16_tflops"], "int4_tops": v["fp16_tflops"],
                                     "cpu_conv_gflops": conv})

    def residuals(x):
        use(sim, profile(x))
        f = figures(sim)
        return [math.log(f[k] / PAPER[k]) for k in CALIBRATION]

    sol = least_squares(residuals, np.log([0.5, 4.0, 0.8]))
    return profile(sol.x)


def minicpm_row(bandwidth_efficiency: float) -> dict:
    from bluelm_v.plugin_manager import get
    from bluelm_v.plugins.backends.cpu_cost import DIMENSITY_9300_CPU, CpuProfile, llama_cpp_row, minicpm_v25_workload

    cpu = CpuProfile.from_dict({**DIMENSITY_9300_CPU, "bandwidth_efficiency": bandwidth_efficiency})
    return llama_cpp_row(cpu, minicpm_v25_workload(get()[1]), image=(768, 1536), prompt_tokens=2048)


def _row(name, got, paper, role) -> str:
    if name.startswith("fastest"):
        return f"| {name} | {got:g} | {paper} | {'same' if got == paper else 'differs'} | {role} |"
    err = f"{(got - paper) / paper * 100:+.0f}%"
    return f"| {name} | {got:.3f} | {paper} | {err} | {role} |"


def table(f: dict, cpu: dict) -> str:
    enc, pre = f["encode_by_tiles_per_batch"], f["prefill_by_chunk"]
    best_t, best_c = min(enc, key=enc.get), min(pre, key=pre.get)
    rows = [("ViT call, 1 tile (s)", f["vit_1_tile_s"], PAPER["vit_1_tile_s"], "fitted"),
            ("ViT call, 4 tiles (s)", f["vit_4_tiles_s"], PAPER["vit_4_tiles_s"], "fitted"),
            ("decode (tokens/s)", f["decode_tokens_per_s"], PAPER["decode_tokens_per_s"], "fitted"),
            ("encode 2:4 image, 4 tiles/batch (s)", f["encode_s"], PAPER["encode_s"],
             "predicted (mostly the fitted calls + the 40 ms convs)"),
            ("hidden by pipelining (s)", f["encode_hidden_by_pipeline_s"], 0.2, "predicted"),
            ("load ViT + LLM (s)", f["load_s"], PAPER["load_s"], "predicted"),
            ("prefill 2048 tokens, t128 (s)", f["prefill_s"], PAPER["prefill_s"], "predicted"),
            ("peak memory (MB)", f["peak_memory_mb"], PAPER["peak_memory_mb"], "predicted"),
            ("fastest tiles per batch", best_t, 4, "predicted"),
            ("fastest prefill chunk", best_c, 128, "predicted"),
            ("MiniCPM-V 2.5 CPU: image processing incl. load (s)", cpu["image_processing_s"], 4.0, "predicted"),
            ("MiniCPM-V 2.5 CPU: prefill 2048 tokens (s)", cpu["prefill_s"], 13.9, "predicted"),
            ("MiniCPM-V 2.5 CPU: decode (tokens/s)", cpu["decode_tokens_per_s"], 4.9, "predicted")]
    lines = ["| figure | model | paper | error | role |", "|---|---|---|---|---|"]
    lines += [_row(*r) for r in rows]
    lines.append("\n| tiles per batch | " + " | ".join(map(str, enc)) + " |\n" + "|---" * (len(enc) + 1) + "|")
    lines.append("| encode 2:4 (s) | " + " | ".join(f"{v:.3f}" for v in enc.values()) + " |")
    lines.append("\n| prefill chunk | " + " | ".join(f"t{t}" for t in pre) + " |\n" + "|---" * (len(pre) + 1) + "|")
    lines.append("| prefill 2048 (s) | " + " | ".join(f"{v:.3f}" for v in pre.values()) + " |")
    lines.append(f"\nMiniCPM-V 2.5 on 768x1536: {cpu['slices']} slices (grid {cpu['grid']} + overview), "
                 f"{cpu['visual_tokens']} visual tokens; vision load {cpu['vision_load_s']:.2f} s + encode "
                 f"{cpu['encode_s']:.2f} s; {cpu['decode_bytes_per_token'] / 1e9:.2f} GB read per decoded token")
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
    print(table(figures(sim), minicpm_row(sim.profile.bandwidth_efficiency)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
