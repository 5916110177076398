"""Stage-2 training throughput at full size: tokens/s and MFU on one GPU (prints a table).

so400m encoder + bluelm_3b_proxy LLM (2.72B), random init, bf16, everything trainable with
SPEC 4's AdamW (ViT layer-wise LR decay 0.9), synthetic batches: each sample is ``--crops``
crops of 384 px (196 visual tokens each after the 2x2 merge) + text up to ``--seq`` tokens.
Engines: DeepSpeed ZeRO-2 (bf16, torch's fused AdamW) as the train job runs it, and a plain
torch loop (bf16 autocast, fused AdamW) as a baseline / fallback where DeepSpeed cannot run.
FLOPs are counted the way the train job counts them (bluelm_v.training.flops); peak = dense
bf16 of the GPU (H100/H200 SXM 989 TFLOP/s) unless --peak-tflops is given.

    python bench/bench_train_gpu.py                                   # on a GPU: the full size
    python bench/bench_train_gpu.py --tiny --steps 2 --warmup 1       # CPU smoke test of the script
"""
from __future__ import annotations

import argparse
import gc
import os
import time


def build(args, device):
    import torch

    from bluelm_v.model import BlueLMV
    from bluelm_v.plugin_manager import get

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    dev = device.type
    enc = {"name": "siglip", "preset": "tiny" if args.tiny else "so400m", "dtype": dtype, "device": dev,
           "pipelined": False, "tiles_per_batch": args.crops}
    llm = {"name": "hf_causal", "preset": "tiny" if args.tiny else "bluelm_3b_proxy", "dtype": dtype, "device": dev}
    torch.manual_seed(0)
    _, registry, _ = get()
    cfg = {"encoder": enc, "downsampler": {"name": "vila_2x2"}, "projector": {"name": "mlp2x_gelu", "dtype": dtype},
           "llm": llm}
    return BlueLMV.from_config(cfg, registry).to(device)


def batch(model, args, device, gen):
    """Synthetic micro-batch: one <image> sentinel + random text, labels on the text."""
    import torch

    from bluelm_v.chat import IMAGE_TOKEN_ID

    text = args.seq - args.crops * model.tokens_per_crop + 1            # spliced length = args.seq
    if text < 8:
        raise SystemExit(f"--seq {args.seq} leaves no room for text after {args.crops} crops x {model.tokens_per_crop}")
    ids = torch.randint(0, 256, (args.micro_batch, text), generator=gen).to(device)   # [B, T]
    ids[:, 4] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :5] = -100
    images = [torch.randn(args.crops, 3, 384, 384, generator=gen).to(device) for _ in range(args.micro_batch)]
    return ids, labels, images


def run_engine(kind: str, args, device) -> dict:
    import torch

    from bluelm_v.training.flops import StepFlops, device_peak_flops
    from bluelm_v.training.optim import build_param_groups

    model = build(args, device)
    model.train()
    parts = ["encoder", "downsampler", "projector", "llm"]
    groups = build_param_groups(model, parts, 1e-4, 0.05, 0.9)
    for g in groups:
        g.pop("name"), g.pop("lr_scale")
    if args.checkpointing:
        model.llm.model.gradient_checkpointing_enable()
    fused = device.type == "cuda"
    if kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if fused else "gloo", auto_mpi_discovery=False)
        params = {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.05, "torch_adam": True}
        if fused:
            params["fused"] = True
        ds = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.accum,
              "train_batch_size": args.micro_batch * args.accum, "gradient_clipping": 1.0,
              "bf16": {"enabled": fused}, "zero_optimization": {"stage": 2, "overlap_comm": fused,
              "contiguous_gradients": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": params}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
        fwd, backward, step = engine, engine.backward, engine.step
    else:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused)
        micro = {"n": 0}

        def fwd(**kw):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fused):
                return model(**kw)

        def backward(loss):
            (loss / args.accum).backward()

        def step():
            micro["n"] += 1
            if micro["n"] % args.accum == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

    flops_of = StepFlops(model, parts)
    peak, src = device_peak_flops(device, args.peak_tflops)
    gen = torch.Generator().manual_seed(0)
    data = [batch(model, args, device, gen) for _ in range(2)]
    times = []
    for s in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        for a in range(args.accum):
            ids, labels, images = data[a % 2]
            out = fwd(input_ids=ids, labels=labels, images=images)
            backward(out.loss)
            step()
        sync(device)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]                                  # median optimizer step
    tokens = args.micro_batch * args.accum * args.seq
    flops = flops_of(args.micro_batch * args.accum * args.crops, [args.seq] * (args.micro_batch * args.accum))
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    row = {"engine": kind, "step_s": dt, "tokens_per_s": tokens / dt, "tflops": flops / dt / 1e12,
           "mfu": flops / dt / peak, "peak_gib": mem, "peak_src": src, "loss": float(out.loss)}
    del model, data, out
    if kind == "deepspeed":
        del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny encoder + LLM (CPU smoke test of this script)")
    ap.add_argument("--engines", default="deepspeed,torch")
    ap.add_argument("--seq", type=int, default=2048, help="LLM tokens per sample (visual + text)")
    ap.add_argument("--crops", type=int, default=5, help="384-px crops per sample (196 LLM tokens each)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="LLM activation checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device: {name}; seq {args.seq} = {args.crops} crops x 196 + text; micro-batch {args.micro_batch} "
          f"x accum {args.accum}; {args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    for kind in args.engines.split(","):
        try:
            rows.append(run_engine(kind, args, device))
        except Exception as exc:  # noqa: BLE001 -- one engine failing must not hide the other's row
            rows.append({"engine": kind, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(rows[-1], flush=True)
    print("\n| engine | step (s) | tokens/s | model TFLOP/s | MFU | peak GPU mem (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | failed: {r['error']} | | | | |")
        else:
            print(f"| {r['engine']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | "
                  f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
    print(f"peak: {rows[0].get('peak_src', '?')}")


if __name__ == "__main__":
    main()
