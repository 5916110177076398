"""Where a Triton decode step's time goes, kernel by kernel, on a CUDA device.

    python bench/profile_decode_gpu.py                 # bluelm_3b_proxy bf16, 2048-token prompt
    python bench/profile_decode_gpu.py --smoke         # tiny model: checks the script runs

Tunes and captures the TritonDecodeEngine step (plugins/engines/triton_step.py) as bench_gpu.py does,
then records a few graph replays with torch.profiler (CUPTI keeps the kernels' real start/end,
PDL overlap included). Kernels are named by their place in the step (embed, 5 per layer, lm
head, argmax). For each call site it prints the mean kernel duration and the mean *marginal*
time: end of this kernel minus end of the previous one, which is what the site adds to the
step (a kernel that starts early and waits looks long but adds little). Needs no hydra/ray.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench_gpu import import_plugins


def site_names(n_layers: int, fused_merge: bool) -> list[str]:
    per_layer = ["qkv", "attn"] + ([] if fused_merge else ["merge"]) + ["o", "gu", "down"]
    return ["embed"] + per_layer * n_layers + ["lm", "argmax"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny preset")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens before the profiled steps")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bluelm_v.plugins.engines.triton_step import TritonDecodeEngine

    _, llms = import_plugins()
    preset = "tiny" if args.smoke else "bluelm_3b_proxy"
    model = llms.hf_causal(preset=preset, dtype="bfloat16", device="cuda", tokenizer="byte").model.eval()
    n_prompt = 64 if args.smoke else args.prompt
    ids = torch.randint(100, model.config.vocab_size - 1, (1, n_prompt), device="cuda")
    emb = model.get_input_embeddings()(ids)
    eng = TritonDecodeEngine(model)
    eng.begin(n_prompt + 32 + args.steps)
    tok = int(eng.prefill(emb, 128).argmax())
    eng.prepare()
    for _ in range(10):
        tok = eng.step(tok)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        tok = eng.step(tok)
    torch.cuda.synchronize()
    plain_us = (time.perf_counter() - t0) / 10 * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tok = eng.step(tok)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and "kernel" in e.name),
                     key=lambda e: e.time_range.start)
    names = site_names(len(eng.layers), eng.configs["attn"].fused_merge)
    starts = [i for i, e in enumerate(kernels) if e.name.startswith("_embed_kernel")]
    dur: dict[str, list[float]] = {}
    marg: dict[str, list[float]] = {}
    steps_us = []
    for s in starts:
        ks = kernels[s:s + len(names)]
        if len(ks) < len(names) or not ks[-1].name.startswith("_argmax"):
            print(f"[profile] step at kernel {s}: {len(ks)} kernels, expected {len(names)}; skipped")
            continue
        steps_us.append(ks[-1].time_range.end - ks[0].time_range.start)
        for j, (name, k) in enumerate(zip(names, ks)):
            dur.setdefault(name, []).append(k.time_range.elapsed_us())
            if j:
                marg.setdefault(name, []).append(k.time_range.end - ks[j - 1].time_range.end)
    print(f"\n## Triton decode step on {torch.cuda.get_device_name()}, {preset}, prompt {n_prompt}")
    print(f"step {plain_us:.1f} us without the profiler, {statistics.mean(steps_us):.1f} us first to last "
          f"kernel under it ({len(steps_us)} steps)")
    print("configs: " + ", ".join(f"{k}={v}" for k, v in eng.configs.items()))
    print("| site | kernels a step | mean duration us | mean marginal us | marginal a step us |")
    print("|---|---:|---:|---:|---:|")
    n_steps = max(1, len(steps_us))
    for name in dict.fromkeys(names):
        d, m = dur.get(name, []), marg.get(name, [])
        per_step = sum(m) / n_steps if m else float("nan")
        print(f"| {name} | {len(d) // n_steps} | {statistics.mean(d):.2f} | "
              f"{statistics.mean(m) if m else float('nan'):.2f} | {per_step:.1f} |")


if __name__ == "__main__":
    main()
