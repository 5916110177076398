"""Batch-1 greedy decode tokens/s of an LLM per quantisation setting (runtime engine), as a table.

    .venv/bin/python bench/bench_quant_decode.py                       # smollm2_135m, 2 threads
    .venv/bin/python bench/bench_quant_decode.py --settings fp32,w4_g64 --threads 1 --steps 64

Settings: fp32, w8 (INT8 everything incl. the embedding), w4_gNN (INT4, embedding/head INT8),
w4_gNN_e4 (INT4 embedding/head too). Each: quantise, prefill a 14-token prompt, 5 warm-up
steps, then the median (and best) of ``--steps`` timed decode steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def quantize(registry, lm, setting: str) -> None:
    if setting == "fp32":
        return
    if setting == "w8":
        registry.quantizer.create("w8", targets=["llm"], embeddings=True).apply(lm)
        return
    parts = setting.split("_")                     # w4_g64 or w4_g64_e4
    registry.quantizer.create("w4", targets=["llm"], group_size=int(parts[1][1:]), on_bad_shape="smaller_group",
                              embedding_bits=4 if parts[-1] == "e4" else 8).apply(lm)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm2_135m")
    ap.add_argument("--settings", default="fp32,w8,w4_g32,w4_g64,w4_g64_e4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from bluelm_v import plugin_manager
    from bluelm_v.plugins.engines import make_engine
    from bluelm_v.plugins.quantizers.schemes import weight_bytes

    _, registry, _ = plugin_manager.get()
    print(f"# {args.preset}, torch {torch.__version__}, threads {args.threads}, engine {args.engine}")
    print("| setting | weight MB | decode tok/s (median) | best |")
    print("|---|---|---|---|")
    for setting in args.settings.split(","):
        lm = registry.llm.create("hf_causal", preset=args.preset)
        quantize(registry, lm, setting)
        eng = make_engine(lm.model, args.engine)
        ids = lm.tokenizer.encode("The Python language reference describes the syntax and semantics")
        eng.begin(len(ids) + args.steps + 8)
        tok = int(eng.prefill(lm.model.get_input_embeddings()(torch.tensor([ids])), 128).argmax())
        for _ in range(5):
            tok = eng.step(tok)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            tok = eng.step(tok)
            times.append(time.perf_counter() - t0)
        mb = weight_bytes(lm.model)["total"] / 2**20
        print(f"| {setting} | {mb:.0f} | {1 / statistics.median(times):.1f} | {1 / min(times):.1f} |", flush=True)
        del lm, eng


if __name__ == "__main__":
    main()
