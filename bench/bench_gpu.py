"""GPU benchmark (one CUDA GPU; figures in docs/results.md §3): the so400m encoder on 9 tiles and the
bluelm_3b_proxy decode speed, against transformers and the memory-bandwidth limit. Prints a table.

    python bench/bench_gpu.py                    # on the GPU machine (needs torch, transformers, pluggy)
    python bench/bench_gpu.py --smoke            # tiny presets on CPU: checks the script runs

Needs no hydra/omegaconf/ray: the plugin modules are imported straight from plugins/.
Rows:
  encoder, 9 tiles bf16: transformers SiglipVisionModel one tile at a time / one batched call
      (output_hidden_states to get the penultimate layer, as a naive user would) vs ours
      (penultimate layer only; 4+4+1 tiles, with and without the pipelined patch embedding; 9 at once)
  decode, batch 1 after a 2048-token prompt: transformers generate (static cache, without and
      with its auto-compile) vs our FastLlamaEngine (fused layers, CUDA graph per step, optional
      torch.compile of the layer) vs the limit = measured copy bandwidth / weight bytes, and the
      floor of the step's matmuls alone; TritonDecodeEngine (plugins/engines/triton_step.py: ~5 Triton
      kernels a layer, block sizes tuned at prepare()) with its correctness against the torch
      path (logits, 64 greedy tokens), its per-call-site kernel times and the block-size sweep

    python bench/bench_gpu.py --only decode --skip-hf --variants cublas,triton   # the Triton rows
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def import_plugins():
    """bluelm_v.plugins -> ROOT/plugins even when bluelm-v is not pip-installed."""
    try:
        import bluelm_v.plugins.encoders  # noqa: F401  (installed: the normal path)
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "bluelm_v.plugins", ROOT / "plugins" / "__init__.py",
            submodule_search_locations=[str(ROOT / "plugins")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bluelm_v.plugins"] = mod
        spec.loader.exec_module(mod)
    from bluelm_v.plugins import encoders, llms
    return encoders, llms


class _Skipped(Exception):
    """A row left out on request."""


def timed(fn, sync, warmup=3, reps=10) -> float:
    """Median seconds of fn() over reps after warmup."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(torch, device, sync) -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    s = timed(lambda: b.copy_(a), sync, warmup=3, reps=10)
    return 2 * a.numel() / s


def bench_encoder(torch, encoders, args, device, dtype, sync, rows):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    preset = "tiny" if args.smoke else "so400m"
    x = torch.randn(9, 3, 384, 384, device=device, dtype=dtype)
    cfg = SiglipVisionConfig(**encoders.SIGLIP_PRESETS[preset], hidden_act="gelu_pytorch_tanh",
                             layer_norm_eps=1e-6, vision_use_head=False, attn_implementation="sdpa")
    ref = SiglipVisionModel(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        one = timed(lambda: [ref(pixel_values=x[i:i + 1], output_hidden_states=True) for i in range(9)], sync)
        batched = timed(lambda: ref(pixel_values=x, output_hidden_states=True), sync)
    del ref
    rows.append(("encoder 9 tiles", "transformers, one tile at a time", one * 1e3, "ms", 1.0))
    rows.append(("encoder 9 tiles", "transformers, one batched call", batched * 1e3, "ms", one / batched))
    enc = encoders.siglip(preset=preset, dtype=str(dtype).split(".")[-1], device=str(device)).eval()
    for tpb, piped in ((4, False), (4, True), (9, False)):
        enc.tiles_per_batch, enc.pipelined = tpb, piped
        with torch.no_grad():
            s = timed(lambda: enc(x), sync)
        label = f"ours, {tpb} tiles/call" + (", pipelined patch embed" if piped else "")
        rows.append(("encoder 9 tiles", label, s * 1e3, "ms", one / s))
    del enc


def bench_decode(torch, llms, args, device, dtype, sync, rows, budget_end):
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    preset = "tiny" if args.smoke else "bluelm_3b_proxy"
    t0 = time.perf_counter()
    llm = llms.hf_causal(preset=preset, dtype=str(dtype).split(".")[-1], device=str(device), tokenizer="byte")
    model = llm.model.eval()
    build_s = time.perf_counter() - t0
    n_prompt, n_new = (64, 16) if args.smoke else (2048, 128)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(torch, device, sync)
    limit = bw / weight_bytes
    rows.append(("decode", f"{preset}: {weight_bytes / 1e9:.2f} GB weights, built in {build_s:.1f} s",
                 float("nan"), "", float("nan")))
    rows.append(("decode", f"limit: copy bandwidth {bw / 1e12:.2f} TB/s / weight bytes", limit, "tok/s", 1.0))
    ids = torch.randint(100, model.config.vocab_size - 1, (1, n_prompt), device=device)

    def hf_generate(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, cache_implementation="static",
                                  disable_compile=True, pad_token_id=0, eos_token_id=None)
    try:
        if args.skip_hf:
            raise _Skipped
        hf_generate(2)
        sync()
        t_short = timed(lambda: hf_generate(1), sync, warmup=0, reps=2)
        t_long = timed(lambda: hf_generate(n_new), sync, warmup=0, reps=2)
        hf_tps = (n_new - 1) / (t_long - t_short)
        rows.append(("decode", "transformers generate, static cache", hf_tps, "tok/s", hf_tps / limit))
    except _Skipped:
        pass
    except Exception as exc:  # noqa: BLE001 -- report and go on
        rows.append(("decode", f"transformers generate failed: {type(exc).__name__}: {exc}"[:90],
                     float("nan"), "", float("nan")))
    emb = model.get_input_embeddings()(ids)
    variants = [("sdpa", False)] * ("cublas" in args.variants) + [("sdpa", True)] * ("compile" in args.variants)
    for attention, compile_ in variants:
        if time.perf_counter() > budget_end:
            rows.append(("decode", f"ours {attention} compile={compile_}: skipped (time budget)",
                         float("nan"), "", float("nan")))
            continue
        try:
            eng = FastLlamaEngine(model, cuda_graph=device.type == "cuda", compile=compile_,
                                  attention=attention, static_step=True)
            eng.begin(n_prompt + n_new + 1)
            t_cap = time.perf_counter()
            eng.prepare()                           # capture the graph (and compile) before timing
            cap_s = time.perf_counter() - t_cap
            for rep in range(2):                    # the first prefill warms cuBLAS/SDPA up
                sync()
                t1 = time.perf_counter()
                eng.begin(n_prompt + n_new + 1)
                tok = int(eng.prefill(emb, 128).argmax())
                sync()
                t2 = time.perf_counter()
                eng.steps(tok, n_new)               # queued graph replays, tokens read at the end
                sync()
                t3 = time.perf_counter()
            tps = n_new / (t3 - t2)
            label = f"ours: graph={eng.use_graph}, fused, compile={compile_} (setup {cap_s:.1f} s)"
            rows.append(("decode", label, tps, "tok/s", tps / limit))
            rows.append(("prefill 2048, chunk 128", f"ours (compile={compile_})", (t2 - t1) * 1e3, "ms",
                         float("nan")))
            if not compile_:
                rows.append(("decode", "floor: the same step's matmuls alone (graph)",
                             matmul_floor(torch, eng, sync), "tok/s", float("nan")))
                rows[-1] = rows[-1][:4] + (rows[-1][2] / limit,)
            del eng
        except Exception as exc:  # noqa: BLE001
            rows.append(("decode", f"ours compile={compile_} failed: {type(exc).__name__}: {exc}"[:120],
                         float("nan"), "", float("nan")))
    if "triton" in args.variants:
        try:
            bench_triton(torch, model, emb, n_prompt, n_new, limit, sync, rows)
        except Exception as exc:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            rows.append(("decode", f"triton failed: {type(exc).__name__}: {exc}"[:160], float("nan"), "", float("nan")))
    if time.perf_counter() < budget_end - 120 and not args.skip_hf:
        try:    # transformers' own default for a static cache: torch.compile of the forward
            def hf_compiled(n):
                with torch.no_grad():
                    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, cache_implementation="static",
                                          pad_token_id=0, eos_token_id=None)
            hf_compiled(3)
            t_short = timed(lambda: hf_compiled(1), sync, warmup=1, reps=2)
            t_long = timed(lambda: hf_compiled(n_new), sync, warmup=0, reps=2)
            tps = (n_new - 1) / (t_long - t_short)
            rows.append(("decode", "transformers generate, static cache + its auto-compile", tps, "tok/s", tps / limit))
        except Exception as exc:  # noqa: BLE001
            rows.append(("decode", f"transformers compiled generate failed: {type(exc).__name__}: {exc}"[:120],
                         float("nan"), "", float("nan")))


def run_decode(eng, emb, n_prompt, n_new, sync, logits=False, force=None, per_token=False):
    """Prefill then n_new greedy steps: (tokens, per-step logits or None, decode seconds).
    force: feed these tokens instead of the engine's own (teacher forcing, for comparisons).
    Timed runs use ``eng.steps`` (graph replays queued, no host round trip per token) unless
    per_token."""
    eng.begin(n_prompt + n_new + 1)
    tok = int(eng.prefill(emb, 128).argmax())
    toks, outs = [], []
    sync()
    t0 = time.perf_counter()
    if not (logits or per_token or force is not None):
        toks = eng.steps(tok, n_new)
        sync()
        return toks, None, time.perf_counter() - t0
    for i in range(n_new):
        tok = eng.step(tok)
        toks.append(tok)
        if force is not None:
            tok = force[i]
        if logits:
            outs.append((eng.last_logits if hasattr(eng, "last_logits") else eng.last_step_logits).float().clone())
    sync()
    return toks, outs, time.perf_counter() - t0


def bench_triton(torch, model, emb, n_prompt, n_new, limit, sync, rows):
    """Triton decode: correctness vs the eager torch path, speed tuned/untuned, kernel times."""
    from bluelm_v.plugins.engines.triton_step import DEFAULTS, TritonDecodeEngine
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    n_check = min(64, n_new)
    ref = FastLlamaEngine(model, cuda_graph=False, static_step=False)
    ref_toks, ref_logits, _ = run_decode(ref, emb, n_prompt, n_check, sync, logits=True)
    del ref
    graph = FastLlamaEngine(model, cuda_graph=emb.is_cuda, static_step=True)
    graph_toks, _, _ = run_decode(graph, emb, n_prompt, n_check, sync)
    del graph
    pdl = True
    try:
        eng = TritonDecodeEngine(model, debug_logits=True)
        eng.begin(n_prompt + n_new + 1)
        t0 = time.perf_counter()
        eng.prepare()                               # tunes block sizes, captures the graph
    except Exception as exc:  # noqa: BLE001 -- e.g. no programmatic dependent launch in graphs
        print(f"[bench] PDL engine failed ({type(exc).__name__}: {exc}); retrying without PDL")
        pdl = False
        eng = TritonDecodeEngine(model, debug_logits=True, pdl=False)
        eng.begin(n_prompt + n_new + 1)
        t0 = time.perf_counter()
        eng.prepare()
    setup = time.perf_counter() - t0
    toks, logits, _ = run_decode(eng, emb, n_prompt, n_check, sync, logits=True)
    same = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), n_check)
    same_graph = next((i for i, (a, b) in enumerate(zip(graph_toks, ref_toks)) if a != b), n_check)
    diff = max([(a - b).abs().max().item() for a, b in zip(logits[:same + 1], ref_logits[:same + 1])])
    scale = max(r.abs().max().item() for r in ref_logits)
    rows.append(("decode check", f"triton (pdl={pdl}) vs eager torch: first {same}/{n_check} greedy tokens equal, "
                 f"max|dlogit| {diff:.4f} (max|logit| {scale:.2f}); cuBLAS graph path: {same_graph}/{n_check}",
                 diff, "abs", float("nan")))
    _, forced, _ = run_decode(eng, emb, n_prompt, n_check, sync, logits=True, force=ref_toks)
    fdiff = max((a - b).abs().max().item() for a, b in zip(forced, ref_logits))
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(forced, ref_logits))
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(forced, ref_logits))
    rows.append(("decode check", f"teacher-forced {n_check} steps: argmax equal in {agree}, max|dlogit| "
                 f"{fdiff:.4f}, max rel L2 {rel:.2e}", fdiff, "abs", float("nan")))
    tuned = dict(eng.configs)
    lines = []
    for site, results in eng.tuning.items():
        for cfg, sec in sorted(results, key=lambda r: r[1]):
            lines.append(f"{site}\t{sec * 1e6:.1f} us\t{cfg}")
    total = 0.0
    for site, results in eng.tuning.items():
        best_cfg = eng.configs[site]                  # chosen on the whole step (step_tuning)
        best = dict(results)[best_cfg]
        total += best
        rows.append(("triton kernel (all layers)", f"{site}: {best_cfg}", best * 1e6, "us", float("nan")))
    rows.append(("triton kernel (all layers)", "sum of the sites (excl. embed/argmax)", total * 1e6, "us",
                 float("nan")))
    for site, cfg, sec in eng.step_tuning:
        rows.append(("triton step (tuning)", f"whole step with {site} {cfg}", sec * 1e6, "us", float("nan")))
    out = os.environ.get("OUT")
    if out:
        Path(out, "triton_tuning.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    del eng
    variants = (("tuned", dict(configs=tuned, pdl=pdl)),
                ("tuned, one host round trip per token", dict(configs=tuned, pdl=pdl)),
                ("tuned, no PDL", dict(configs=tuned, pdl=False)),
                ("tuned, no register prefetch", dict(configs=tuned, pdl=pdl, prefetch=False)),
                ("untuned defaults", dict(configs=DEFAULTS, pdl=pdl)))
    for label, kw in variants:
        try:
            eng = TritonDecodeEngine(model, **kw)
            eng.begin(n_prompt + n_new + 1)
            eng.prepare()
            for _ in range(2):                      # the first run warms up
                toks2, _, sec = run_decode(eng, emb, n_prompt, n_new, sync, per_token="round trip" in label)
            tps = n_new / sec
            rows.append(("decode", f"ours: Triton decode step ({label}; setup {setup:.1f} s), "
                         f"tokens equal to checked run: {toks2[:n_check] == toks}", tps, "tok/s", tps / limit))
            del eng
        except Exception as exc:  # noqa: BLE001
            rows.append(("decode", f"Triton {label} failed: {type(exc).__name__}: {exc}"[:160],
                         float("nan"), "", float("nan")))


def matmul_floor(torch, eng, sync) -> float:
    """Tokens/s if a decode step were only its weight matmuls (same shapes, one CUDA graph)."""
    import torch.nn.functional as F

    x = torch.zeros(1, eng.model.config.hidden_size, dtype=eng.dtype, device=eng.device)
    weights = [(p[0][1], p[0][2], p[0][4], p[0][5]) for p in eng.plain if p is not None]
    lm_head = eng.model.lm_head.weight

    def matmuls():
        for w_qkv, w_o, w_gu, w_down in weights:
            F.linear(x, w_qkv)
            torch.addmm(x, x, w_o.t())
            gu = F.linear(x, w_gu)
            torch.addmm(x, gu[:, : w_down.shape[1]], w_down.t())
        F.linear(x, lm_head)
    if eng.device.type != "cuda":
        return 1.0 / timed(matmuls, sync, warmup=1, reps=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        matmuls()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        matmuls()
    return 1.0 / timed(graph.replay, sync, warmup=3, reps=20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny presets on CPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip later variants after this")
    ap.add_argument("--only", choices=("all", "encoder", "decode"), default="all")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers generate rows")
    ap.add_argument("--variants", default="cublas,compile,triton",
                    help="our decode variants: cublas (graph), compile, triton")
    args = ap.parse_args()
    start = time.perf_counter()
    import torch

    encoders, llms = import_plugins()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows: list[tuple] = []
    if args.only in ("all", "encoder"):
        bench_encoder(torch, encoders, args, device, dtype, sync, rows)
    if args.only in ("all", "decode"):
        bench_decode(torch, llms, args, device, dtype, sync, rows, start + args.budget_s)
    print_table(f"bench_gpu on {name}, torch {torch.__version__}, {dtype}, total {time.perf_counter() - start:.0f} s",
                ("what", "system", "value", "unit", "ratio"), rows, "bench_gpu.json", "{:.1f}")
    print("ratio: encoder rows = speed-up over one tile at a time; decode rows = fraction of the bandwidth limit")


def print_table(title: str, header: tuple, rows: list[tuple], json_name: str, fmt: str = "{:.4g}") -> None:
    """A markdown table of (what, system, value, unit, ratio) rows (NaN as blank); the rows as
    JSON in $OUT when set."""
    print(f"\n## {title}")
    print("| " + " | ".join(header) + " |")
    print("|---|---|---:|---|---:|")
    for what, system, value, unit, ratio in rows:
        v = "" if value != value else fmt.format(value)
        r = "" if ratio != ratio else f"{ratio:.2f}"
        print(f"| {what} | {system} | {v} | {unit} | {r} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, json_name).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
