"""GPU inference benchmark, one process, one table (one H200, about 8 minutes):

    python bench/bench_gpu_infer.py                # on the GPU machine (torch, transformers, triton)
    python bench/bench_gpu_infer.py --smoke        # tiny shapes on CPU in under a minute: checks the script
    python bench/bench_gpu_infer.py --only throughput,encoder --batch-sizes 32,64

Needs no Ray/Hydra/DeepSpeed (plugins are imported straight from plugins/; pluggy is stubbed when
absent). Each section prints its rows when done; the whole table comes at the end (and as JSON in
$OUT when set). Sections:
  rates       bf16 matmul rate (8192^3 GEMM) and device copy bandwidth: the limits below use these
  throughput  evaluation-shaped: 512 prompts of 9 crops (1,764 visual tokens) + 30 text tokens, 16
              new tokens each, bluelm_3b_proxy bf16 (random init), visual tokens already encoded
              (EncodedImage handles): ours = Generator.generate_batch at each --batch-sizes, then
              transformers generate (static cache + its compile) at our best batch size; the limit =
              prefill FLOPs at the matmul rate + 15 decode steps reading the weights and the batch's
              KV cache at the copy bandwidth; batched vs one-by-one greedy tokens on 4 prompts
  encoder     so400m, 9 tiles (ms) and batch 256 (img/s), bf16: transformers (one batched call) vs
              ours: modules / fused / compile / compile + CUDA graph / + FP8 (cosine vs bf16) /
              attention backends; the limit = the tower's FLOPs at the matmul rate
  decode      batch 1 after a 128-token prompt, Triton step: bf16 and INT4 (w4 g128, INT8 head)
              tok/s and fraction of the limit (weight bytes / copy bandwidth); INT4 tokens against
              the same weights dequantised to bf16 (64 greedy tokens)
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import types
from concurrent.futures import Future
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
try:
    import pluggy  # noqa: F401
except ImportError:        # the plugin modules only need the markers: no-op stand-ins
    stub = types.ModuleType("pluggy")
    stub.HookimplMarker = stub.HookspecMarker = lambda project: (lambda *a, **k: (a[0] if a else (lambda f: f)))
    sys.modules["pluggy"] = stub

from bench_gpu import import_plugins, print_table, timed  # noqa: E402

ROWS: list[tuple] = []
NAN = float("nan")


def row(section: str, system: str, value=NAN, unit: str = "", ratio=NAN) -> None:
    ROWS.append((section, system, value, unit, ratio))
    v = "" if value != value else f"{value:.4g}"
    r = "" if ratio != ratio else f"{ratio:.2f}"
    print(f"[{section}] {system}: {v} {unit} {r}", flush=True)


def failed(section: str, what: str, exc: Exception) -> None:
    import traceback

    traceback.print_exc()
    row(section, f"{what} failed: {type(exc).__name__}: {exc}"[:200])


# -- rates ------------------------------------------------------------------------------------
def measure_rates(torch, dev, sync, smoke: bool) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes read+written per second)."""
    n = 512 if smoke else 8192
    dt = torch.float32 if smoke else torch.bfloat16
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    flops = 2 * n ** 3 / timed(lambda: a @ b, sync, warmup=3, reps=10)
    src = torch.empty((64 if smoke else 1024) << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / timed(lambda: dst.copy_(src), sync, warmup=3, reps=10)
    row("rates", f"matmul {n}^3 {str(dt)[6:]}", flops / 1e12, "TFLOP/s")
    row("rates", "device copy (read + write)", bw / 1e12, "TB/s")
    return flops, bw


# -- throughput -------------------------------------------------------------------------------
def done_handle(features, crops: int):
    """An EncodedImage already finished (the visual tokens were encoded elsewhere)."""
    from bluelm_v.runtime import EncodedImage

    fut = Future()
    fut.set_result({"features": features, "grid": None, "crops": crops, "encode_s": 0.0,
                    "done_at": time.perf_counter()})
    return EncodedImage(fut, "image", time.perf_counter())


def workload_limit(cfg, prompt_len: int, new: int, batch: int, flops: float, bw: float,
                   weight_bytes: int, elem: int) -> float:
    """Answers/s of batches of ``batch`` prompts if prefill ran at the matmul rate and every
    decode step only read the weights and the batch's KV cache at the copy bandwidth."""
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    lin = layers * (d * (heads + 2 * kv) * hd + heads * hd * d + 3 * d * inter)          # params a token
    prefill = 2 * lin * prompt_len + 2 * prompt_len ** 2 * layers * heads * hd + 2 * cfg.vocab_size * d
    kv_pos = layers * 2 * kv * hd * elem                                                # bytes a position
    decode = sum(weight_bytes + batch * (prompt_len + j) * kv_pos for j in range(1, new)) / bw
    return batch / (batch * prefill / flops + decode)


def bench_throughput(torch, plugins, args, dev, dtype, sync, flops, bw, deadline):
    from bluelm_v.model import BlueLMV
    from bluelm_v.plugins import downsamplers, projectors
    from bluelm_v.plugins.engines.fast import FastLlamaEngine
    from bluelm_v.runtime import Generator

    encoders, llms = plugins
    smoke = args.smoke
    n_prompts, new, crops = (8, 4, 2) if smoke else (512, 16, 9)
    name = "tiny" if smoke else "bluelm_3b_proxy"
    dstr = str(dtype).split(".")[-1]
    llm = llms.hf_causal(preset=name, dtype=dstr, device=str(dev), tokenizer="byte")
    enc = encoders.siglip(preset="tiny", dtype=dstr, device=str(dev))   # unused: tokens come encoded
    down = downsamplers.vila_2x2(in_dim=enc.hidden_size)
    model = BlueLMV(enc, down, projectors.mlp2x_gelu(down.out_dim, llm.hidden_size, dtype=dstr).to(dev), llm).eval()
    gen = Generator(model, engine=FastLlamaEngine(llm.model))
    gen.eos = frozenset()      # every row makes all its tokens, as transformers with eos_token_id=None
    visual = crops * model.tokens_per_crop
    with torch.no_grad():
        feats = llm.embed(torch.randint(300, llm.model.config.vocab_size - 1, (1, visual), device=dev))[0]
    prompts = [f"<image>\nwhat is {i % 100:02d}" for i in range(n_prompts)]
    images = [[done_handle(feats, crops)] for _ in prompts]
    length = len(gen.prompt_ids(prompts[0], 1)) - 1 + visual
    cfg = llm.model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    row("throughput", f"{name}: {n_prompts} prompts of {length} positions ({visual} visual), {new} new tokens")
    best = (0.0, None)
    for b in args.batch_sizes:
        if time.perf_counter() > deadline:
            row("throughput", f"ours batch {b}: skipped (time budget)")
            continue
        try:
            gen.generate_batch(prompts[:b], images[:b], new, batch_size=b)          # warm-up, graphs
            sync()
            t0 = time.perf_counter()
            res = gen.generate_batch(prompts, images, new, batch_size=b)
            sync()
            rate = n_prompts / (time.perf_counter() - t0)
            assert all(len(r.token_ids) == new for r in res)
            lim = workload_limit(cfg, length, new, b, flops, bw, weight_bytes, torch.finfo(dtype).bits // 8)
            row("throughput", f"ours generate_batch, batch {b} (limit {lim:.1f}/s)", rate, "answers/s", rate / lim)
            best = max(best, (rate, b))
        except Exception as exc:  # noqa: BLE001 -- report and go on
            failed("throughput", f"ours batch {b}", exc)
    rate, b = best
    if b is None:
        return gen, model
    try:     # greedy agreement, one by one vs batched (bf16: GEMM shapes differ, ties may flip)
        some, ims = prompts[:4], images[:4]
        batched = gen.generate_batch(some, ims, new, batch_size=4)
        singles = [gen.generate(p, i, new) for p, i in zip(some, ims)]
        same = sum(a.token_ids == s.token_ids for a, s in zip(batched, singles))
        row("throughput", f"check: batched = one-by-one greedy tokens for {same}/4 prompts", same, "prompts")
    except Exception as exc:  # noqa: BLE001
        failed("throughput", "one-by-one check", exc)
    gen.engine.end_batch()                       # one batched cache on the GPU at a time
    if dev.type == "cuda" and time.perf_counter() < deadline - 150:
        try:     # the same with scaled_dot_product_attention (masked window) in the decode step
            other = Generator(model, engine=FastLlamaEngine(llm.model, batch_attention="sdpa"))
            other.eos = frozenset()
            other.generate_batch(prompts[:b], images[:b], new, batch_size=b)
            sync()
            t0 = time.perf_counter()
            other.generate_batch(prompts, images, new, batch_size=b)
            sync()
            r = n_prompts / (time.perf_counter() - t0)
            lim = workload_limit(cfg, length, new, b, flops, bw, weight_bytes, torch.finfo(dtype).bits // 8)
            row("throughput", f"ours, batch {b}, decode attention sdpa instead of triton", r, "answers/s", r / lim)
            other.engine.end_batch()
            del other
        except Exception as exc:  # noqa: BLE001
            failed("throughput", "ours with sdpa decode attention", exc)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if time.perf_counter() > deadline - 120:
        row("throughput", "transformers generate: skipped (time budget)")
        return gen, model
    try:
        with torch.no_grad():
            embeds = torch.cat([gen.embed_prompt(gen.prompt_ids(p, 1), [feats]) for p in prompts[:b]])   # [B,L,D]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)

        def hf_batch():
            with torch.no_grad():
                return llm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, cache_implementation="static",
                                          pad_token_id=0, eos_token_id=None, disable_compile=smoke)
        hf_batch()                                                              # compile, warm up
        sync()
        reps = 1 if smoke else 4
        t0 = time.perf_counter()
        for _ in range(reps):
            hf_batch()
        sync()
        hf_rate = reps * b / (time.perf_counter() - t0)
        lim = workload_limit(cfg, length, new, b, flops, bw, weight_bytes, torch.finfo(dtype).bits // 8)
        row("throughput", f"transformers generate, static cache + compile, batch {b}", hf_rate, "answers/s", hf_rate / lim)
        row("throughput", f"ours / transformers at batch {b}", rate / hf_rate, "x")
    except Exception as exc:  # noqa: BLE001
        failed("throughput", "transformers generate", exc)
    return gen, model


# -- encoder ----------------------------------------------------------------------------------
def tower_flops(cfg, kept: int) -> float:
    """FLOPs of one image through the kept layers (+ patch embedding): GEMMs and attention."""
    t, c, i = (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size, cfg.intermediate_size
    return kept * (2 * t * (4 * c * c + 2 * c * i) + 4 * t * t * c) + 2 * t * c * 3 * cfg.patch_size ** 2


def bench_encoder(torch, plugins, args, dev, dtype, sync, flops, deadline):
    import torch.nn.functional as F
    from transformers import SiglipVisionConfig, SiglipVisionModel

    encoders = plugins[0]
    preset, big = ("tiny", 4) if args.smoke else ("so400m", 256)
    dstr = str(dtype).split(".")[-1]
    x9 = torch.randn(9, 3, 384, 384, device=dev, dtype=dtype)
    xb = torch.randn(big, 3, 384, 384, device=dev, dtype=dtype)
    reps, warm = (1, 1) if args.smoke else (10, 2)
    ref = encoders.siglip(preset=preset, dtype=dstr, device=str(dev)).eval()
    per_image = tower_flops(ref.config, len(ref.layers))
    row("encoder", f"limit at the matmul rate ({per_image / 1e12:.3f} TFLOP an image): 9 tiles",
        9 * per_image / flops * 1e3, "ms")
    row("encoder", f"limit: batch {big}", flops / per_image, "img/s")
    cfg = SiglipVisionConfig(**encoders.SIGLIP_PRESETS[preset], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                             vision_use_head=False, attn_implementation="sdpa")
    try:
        hf = SiglipVisionModel(cfg).to(device=dev, dtype=dtype).eval()
        with torch.no_grad():
            s9 = timed(lambda: hf(pixel_values=x9, output_hidden_states=True), sync, warmup=warm, reps=reps)
            sb = timed(lambda: hf(pixel_values=xb, output_hidden_states=True), sync, warmup=1, reps=min(3, reps))
        row("encoder", "transformers SiglipVisionModel, one batched call: 9 tiles", s9 * 1e3, "ms", 9 * per_image / flops / s9)
        row("encoder", f"transformers: batch {big}", big / sb, "img/s", big / sb / (flops / per_image))
        del hf
    except Exception as exc:  # noqa: BLE001
        failed("encoder", "transformers", exc)
    with torch.no_grad():
        want = ref(x9, tiles_per_batch=9)
    best_attention = attention_backends(torch, ref.config, x9.shape[0], big, dev, dtype, sync, reps, warm)
    variants = [("modules (4+4+1 tiles, pipelined)", dict(), 4), ("modules, 9 at once", dict(), 9),
                ("fused", dict(fused=True), 9), ("compile", dict(compile=True), 9),
                ("compile + CUDA graph", dict(compile=True, cuda_graph=True), 9),     # reuses the compile
                ("compile + graph + FP8", dict(compile=True, cuda_graph=True, fp8=True), 9),
                (f"compile + graph, attention {best_attention}",
                 dict(compile=True, cuda_graph=True, attention=best_attention), 9)]
    if args.smoke:      # no compile on CPU (minutes); FP8 emulated
        variants = [variants[0], variants[2], ("FP8 (emulated on CPU)", dict(fp8=True), 9)]
    for label, opts, tpb in variants:
        if time.perf_counter() > deadline:
            row("encoder", f"ours {label}: skipped (time budget)")
            continue
        try:
            if opts.get("attention", "auto") != "auto":
                torch._dynamo.reset()      # the attention backend is chosen when traced: trace again
            enc = encoders.siglip(preset=preset, dtype=dstr, device=str(dev), **opts).eval()
            enc.load_state_dict(ref.state_dict())
            t0 = time.perf_counter()
            with torch.no_grad():
                got = enc(x9, tiles_per_batch=tpb)
                s9 = timed(lambda: enc(x9, tiles_per_batch=tpb), sync, warmup=warm, reps=reps)
                sb = timed(lambda: enc(xb, tiles_per_batch=big), sync, warmup=1, reps=min(3, reps))
            cos = F.cosine_similarity(got.float().flatten(0, 1), want.float().flatten(0, 1), dim=-1)
            note = f"; token cosine vs modules min {cos.min():.5f} mean {cos.mean():.5f}"
            row("encoder", f"ours {label}: 9 tiles (setup {time.perf_counter() - t0:.0f} s{note})",
                s9 * 1e3, "ms", 9 * per_image / flops / s9)
            row("encoder", f"ours {label}: batch {big}", big / sb, "img/s", big / sb / (flops / per_image))
            del enc
        except Exception as exc:  # noqa: BLE001
            failed("encoder", f"ours {label}", exc)
    del ref


def attention_backends(torch, cfg, small: int, big: int, dev, dtype, sync, reps: int, warm: int) -> str:
    """Time scaled_dot_product_attention at the tower's shape on each backend -> the fastest."""
    import torch.nn.functional as F

    from bluelm_v.nn.siglip_fast import ATTENTION_BACKENDS, attention_backend

    t, h = (cfg.image_size // cfg.patch_size) ** 2, cfg.num_attention_heads
    d = cfg.hidden_size // h
    best = ("auto", float("inf"))
    for name in ATTENTION_BACKENDS:
        try:
            secs = []
            for k in (small, big):
                q, kk, v = (torch.randn(k, h, t, d, device=dev, dtype=dtype) for _ in range(3))
                with attention_backend(name), torch.no_grad():
                    secs.append(timed(lambda: F.scaled_dot_product_attention(q, kk, v), sync, warmup=warm, reps=reps))
            row("encoder", f"attention alone, backend {name}: {small} tiles / {big} tiles (ms)",
                secs[0] * 1e3, f"ms / {secs[1] * 1e3:.2f} ms")
            if name not in ("auto", "math") and secs[1] < best[1]:
                best = (name, secs[1])
        except Exception as exc:  # noqa: BLE001 -- a backend this GPU or shape does not have
            row("encoder", f"attention alone, backend {name}: not available ({type(exc).__name__})"[:120])
    return best[0]


# -- decode -----------------------------------------------------------------------------------
def quant_bytes(model) -> int:
    """Bytes the decode step reads: parameters plus quantised buffers (codes, scales, zeros)."""
    from bluelm_v.nn.quant_linear import QuantLinearBase

    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n + sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinearBase))


def bench_decode(torch, llm_model, args, dev, sync, bw, deadline):
    from bench_gpu import run_decode

    from bluelm_v.plugins.engines.triton_quant import QWeight, dequantized
    from bluelm_v.plugins.engines.triton_step import TritonDecodeEngine
    from bluelm_v.plugins.quantizers.schemes import W4

    n_prompt, n_new, n_check = (16, 8, 8) if args.smoke else (128, 256, 64)
    group = 32 if args.smoke else 128
    budget = 5.0 if args.smoke else args.tune_s
    ids = torch.randint(300, llm_model.config.vocab_size - 1, (1, n_prompt), device=dev)
    with torch.no_grad():
        emb = llm_model.get_input_embeddings()(ids)

    def measure(model, label, configs=None):
        eng = TritonDecodeEngine(model, tune_budget_s=budget, configs=configs)
        path = "Triton step" if eng.triton_ok else "torch step (Triton not usable here)"
        eng.begin(n_prompt + n_new + 1)
        t0 = time.perf_counter()
        eng.prepare()
        setup = time.perf_counter() - t0
        for _ in range(2):
            toks, _, sec = run_decode(eng, emb, n_prompt, n_new, sync)
        nbytes = quant_bytes(model)
        tps = n_new / sec
        row("decode", f"{label}: {path}, {nbytes / 1e9:.2f} GB read a token, limit {bw / nbytes:.0f} tok/s "
            f"(setup {setup:.0f} s)", tps, "tok/s", tps / (bw / nbytes))
        return eng, toks

    try:
        eng, _ = measure(llm_model, f"bf16 after {n_prompt} tokens")
        tuned = dict(eng.configs)
        del eng
    except Exception as exc:  # noqa: BLE001
        failed("decode", "bf16 Triton", exc)
        tuned = None
    if time.perf_counter() > deadline:
        row("decode", "INT4: skipped (time budget)")
        return
    try:
        q = copy.deepcopy(llm_model)
        W4(["all"], group_size=group, symmetric=False).apply(torch.nn.ModuleDict({"llm": q}))
        eng, toks = measure(q, f"INT4 g{group} asym, INT8 head, after {n_prompt} tokens")
        projections = [eng.step_w[0][0][j] for j in (1, 2, 4, 5)] if eng.step_w else []
        kinds = {f"int{w.bits}" if isinstance(w, QWeight) else str(w.dtype) for w in projections} or {"?"}
        del eng
        plain = dequantized(copy.deepcopy(q))
        del q
        ref = TritonDecodeEngine(plain, tune=False, configs=tuned)
        ref_toks, _, _ = run_decode(ref, emb, n_prompt, n_check, sync)
        same = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), n_check)
        row("decode", f"check: INT4 step = dequantised bf16 model for the first {same}/{n_check} greedy tokens "
            f"(step weights: {sorted(kinds)})", same, "tokens")
        del ref, plain
    except Exception as exc:  # noqa: BLE001
        failed("decode", "INT4 Triton", exc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument("--only", default="throughput,encoder,decode", help="sections to run (rates always)")
    ap.add_argument("--batch-sizes", default="32,64", help="our batch sizes for the throughput rows")
    ap.add_argument("--budget-s", type=float, default=480.0, help="later variants are skipped after this")
    ap.add_argument("--tune-s", type=float, default=25.0, help="Triton block-size tuning per engine")
    args = ap.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget_s
    import torch

    plugins = import_plugins()
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        torch.set_num_threads(1)        # tiny shapes: threads only wait on each other
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    args.batch_sizes = [2, 4] if args.smoke else [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    only = set(args.only.split(","))
    flops, bw = measure_rates(torch, dev, sync, args.smoke)
    llm_model = None
    if "throughput" in only:
        try:
            gen, model = bench_throughput(torch, plugins, args, dev, dtype, sync, flops, bw, deadline - 180)
            llm_model = model.llm.model
            gen.engine.end_batch()
            del gen, model
        except Exception as exc:  # noqa: BLE001
            failed("throughput", "section", exc)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "decode" in only:
        if llm_model is None:
            name = "tiny" if args.smoke else "bluelm_3b_proxy"
            llm_model = plugins[1].hf_causal(preset=name, dtype=str(dtype).split(".")[-1], device=str(dev),
                                             tokenizer="byte").model.eval()
        bench_decode(torch, llm_model, args, dev, sync, bw, deadline - 150)
    del llm_model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "encoder" in only:
        bench_encoder(torch, plugins, args, dev, dtype, sync, flops, deadline)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print_table(f"bench_gpu_infer on {name}, torch {torch.__version__}, {dtype}, total "
                f"{time.perf_counter() - start:.0f} s", ("section", "system", "value", "unit", "of limit"),
                ROWS, "bench_gpu_infer.json")


if __name__ == "__main__":
    main()
