"""GPU benchmark (one H100 through the device tool): the so400m encoder on 9 tiles and the
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
      floor of the step's matmuls alone
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
    from bluelm_v.engines import FastLlamaEngine

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
        hf_generate(2)
        sync()
        t_short = timed(lambda: hf_generate(1), sync, warmup=0, reps=2)
        t_long = timed(lambda: hf_generate(n_new), sync, warmup=0, reps=2)
        hf_tps = (n_new - 1) / (t_long - t_short)
        rows.append(("decode", "transformers generate, static cache", hf_tps, "tok/s", hf_tps / limit))
    except Exception as exc:  # noqa: BLE001 -- report and go on
        rows.append(("decode", f"transformers generate failed: {type(exc).__name__}: {exc}"[:90],
                     float("nan"), "", float("nan")))
    emb = model.get_input_embeddings()(ids)
    for attention, compile_ in (("sdpa", False), ("sdpa", True)):
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
                for _ in range(n_new):
                    tok = eng.step(tok)
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
    if time.perf_counter() < budget_end - 120:
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
    print(f"\n## bench_gpu on {name}, torch {torch.__version__}, {dtype}, total {time.perf_counter() - start:.0f} s")
    print("| what | system | value | unit | ratio |")
    print("|---|---|---:|---|---:|")
    for what, system, value, unit, ratio in rows:
        v = "" if value != value else f"{value:.1f}"
        r = "" if ratio != ratio else f"{ratio:.2f}"
        print(f"| {what} | {system} | {v} | {unit} | {r} |")
    print("ratio: encoder rows = speed-up over one tile at a time; decode rows = fraction of the bandwidth limit")
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_gpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
