"""Stage-2 training throughput at full size: tokens/s and MFU on one GPU (prints a table).

so400m encoder + bluelm_3b_proxy LLM (2.72B), random init, bf16, everything trainable with
SPEC 4's AdamW (ViT layer-wise LR decay 0.9), synthetic batches: each sample is ``--crops``
crops of 384 px (196 visual tokens each after the 2x2 merge) + text up to ``--seq`` tokens.
Engines: DeepSpeed ZeRO-2 (bf16, torch's fused AdamW) as the train job runs it, and a plain
torch loop (bf16 autocast, fused AdamW) as a baseline / fallback where DeepSpeed cannot run.
FLOPs are counted the way the train job counts them (bluelm_v.training.flops); peak = dense
bf16 of the GPU (H100/H200 SXM 989 TFLOP/s) unless --peak-tflops is given.

Speed options (each a flag, or a key of one ``--variants`` entry): ``compile`` (torch.compile of
every LLM decoder layer and encoder layer, regional: one graph reused by all layers), ``ce=chunked``
(the LM head + cross-entropy in 2048-token chunks, gradients computed in the forward: no
[tokens, 122753] fp32 logits are kept; FLOPs unchanged: 6 * tokens * V * D), ``zero`` (DeepSpeed
ZeRO stage 1/2), ``accum_fp32`` (ZeRO-1 + fp32 gradient accumulation = DeepSpeed's BF16 optimizer).
The plugins are not edited: the chunked loss wraps BlueLMV in this script (``ChunkedLossModel``).

    python bench/bench_train_gpu.py                                   # on a GPU: the full size
    python bench/bench_train_gpu.py --tiny --steps 2 --warmup 1       # CPU smoke test of the script
    python bench/bench_train_gpu.py --seq 4096 --crops 9 --variants \
      "engine=deepspeed,zero=2,mb=1,accum=4;engine=deepspeed,zero=1,mb=2,accum=2,compile=1,ce=chunked"
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace


def build(args, device):
    import torch

    from bluelm_v.model import BlueLMV
    from bluelm_v.plugin_manager import get

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    dev = device.type
    enc = {"name": "siglip", "preset": "tiny" if args.tiny else "so400m", "dtype": dtype, "device": dev,
           "pipelined": False, "tiles_per_batch": args.crops * args.micro_batch}
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


def chunked_linear_ce():
    """autograd Function: mean cross-entropy of ``hidden @ weight.T`` over non-ignored targets, in
    row chunks; the gradients of hidden and weight are computed chunk by chunk in the forward, so
    no [N, V] logits outlive a chunk (6*N*V*D FLOPs in all, like forward + backward)."""
    import torch

    class ChunkedLinearCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk: int):
            # hidden [N, D], weight [V, D], targets [N] (-100 = ignored)
            valid_all = targets != -100
            count = valid_all.sum().clamp(min=1).float()
            grad_h = torch.empty_like(hidden)                             # [N, D]
            grad_w = torch.zeros_like(weight)                             # [V, D]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk]                           # [c, D]
                y = targets[start:start + chunk]                          # [c]
                valid = (y != -100)
                y0 = y.clamp(min=0)
                logits = (h @ weight.t()).float()                         # [c, V] fp32
                lse = torch.logsumexp(logits, dim=-1)                     # [c]
                picked = logits.gather(1, y0[:, None]).squeeze(1)         # [c]
                total += ((lse - picked) * valid).sum()
                probs = logits.sub_(lse[:, None]).exp_()                  # [c, V] softmax, in place
                probs[torch.arange(h.shape[0], device=h.device), y0] -= 1.0
                probs.mul_((valid.float() / count)[:, None])
                g = probs.to(hidden.dtype)                                # [c, V] d(mean loss)/d logits
                del logits, probs
                grad_h[start:start + chunk] = g @ weight                  # [c, D]
                grad_w.addmm_(g.t(), h)                                   # [V, D]
            ctx.save_for_backward(grad_h, grad_w)
            return total / count

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None

    return ChunkedLinearCE


def chunked_loss_model(model, chunk: int):
    """Wrap BlueLMV (no plugin edits): encoder -> splice -> LLM body (no mask: rows are unpadded,
    so sdpa runs causal flash) -> ChunkedLinearCE on the shifted labels."""
    import torch

    fn = chunked_linear_ce()

    class ChunkedLossModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels, images):
            m = self.inner
            s = m.splice(input_ids, m.image_features(list(images)), None, labels)
            lm = m.llm.model                                              # LlamaForCausalLM
            hidden = lm.model(inputs_embeds=s.embeds, use_cache=False).last_hidden_state  # [B, L, D]
            d = hidden.shape[-1]
            h = hidden[:, :-1].reshape(-1, d)                             # [B*(L-1), D]
            y = s.labels[:, 1:].reshape(-1)                               # [B*(L-1)]
            return SimpleNamespace(loss=fn.apply(h, lm.get_output_embeddings().weight, y, chunk))

    return ChunkedLossModel(model)


def compile_layers(model) -> int:
    """Regional torch.compile: each LLM decoder layer and encoder layer (same code -> one graph)."""
    import torch

    torch._dynamo.config.automatic_dynamic_shapes = False      # a new micro-batch shape recompiles static
    n = 0
    for layers in (model.llm.model.model.layers, model.encoder.layers):
        for layer in layers:
            layer.compile()
            n += 1
    return n


def run_engine(kind: str, args, device) -> dict:
    import torch

    from bluelm_v.training.flops import StepFlops, device_peak_flops
    from bluelm_v.training.optim import build_param_groups

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(args, device)
    model.train()
    parts = ["encoder", "downsampler", "projector", "llm"]
    groups = build_param_groups(model, parts, 1e-4, 0.05, 0.9)
    for g in groups:
        g.pop("name"), g.pop("lr_scale")
    if args.checkpointing:
        model.llm.model.gradient_checkpointing_enable()
    if args.compile:
        compile_layers(model)
    net = chunked_loss_model(model, args.ce_chunk) if args.ce == "chunked" else model
    fused = device.type == "cuda"
    if kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if fused else "gloo", auto_mpi_discovery=False)
        params = {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.05, "torch_adam": True}
        if fused:
            params["fused"] = True
        zero = {"stage": args.zero, "overlap_comm": fused and args.zero == 2,
                "contiguous_gradients": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
        ds = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.accum,
              "train_batch_size": args.micro_batch * args.accum, "gradient_clipping": 1.0,
              "bf16": {"enabled": fused}, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": params}}
        if args.accum_fp32:
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=groups, config=ds)
        fwd, backward, step = engine, engine.backward, engine.step
    else:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused)
        micro = {"n": 0}

        def fwd(**kw):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fused):
                return net(**kw)

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
    times, phases = [], []
    timer = PhaseTimer(device)
    for s in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        timer.reset()
        for a in range(args.accum):
            ids, labels, images = data[a % 2]
            timer.mark("other")
            out = fwd(input_ids=ids, labels=labels, images=images)
            timer.mark("forward")
            backward(out.loss)
            timer.mark("backward")
            step()
            timer.mark("step")
        sync(device)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
            phases.append(timer.totals())
    k = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    dt = times[k]                                                        # median optimizer step
    tokens = args.micro_batch * args.accum * args.seq
    flops = flops_of(args.micro_batch * args.accum * args.crops, [args.seq] * (args.micro_batch * args.accum))
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    row = {"engine": kind, "step_s": dt, "tokens_per_s": tokens / dt, "tflops": flops / dt / 1e12,
           "mfu": flops / dt / peak, "peak_gib": mem, "peak_src": src, "loss": float(out.loss.detach()),
           "gpu_s": phases[k]}
    del model, net, data, out
    if kind == "deepspeed":
        del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


class PhaseTimer:
    """GPU time per phase (forward / backward / step) of one optimizer step, from CUDA events on
    the current stream (no synchronisation inside the step); wall time on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self):
        self.marks = []

    def mark(self, phase: str):
        import torch

        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((phase, ev))
        else:
            self.marks.append((phase, time.perf_counter()))

    def totals(self) -> dict:
        out: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[phase] = out.get(phase, 0.0) + dt
        return {p: round(v, 4) for p, v in out.items()}


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


VARIANT_KEYS = {"engine": ("engines", str), "zero": ("zero", int), "mb": ("micro_batch", int),
                "accum": ("accum", int), "compile": ("compile", lambda v: v not in ("0", "false", "")),
                "ce": ("ce", str), "accum_fp32": ("accum_fp32", lambda v: v not in ("0", "false", "")),
                "seq": ("seq", int), "crops": ("crops", int)}


def variants(args) -> list[tuple[str, argparse.Namespace]]:
    """(engine, args) per row: ``--variants "k=v,k=v;k=v"`` overrides the flags per row."""
    if not args.variants:
        return [(kind, args) for kind in args.engines.split(",")]
    out = []
    for spec in filter(None, (x.strip() for x in args.variants.split(";"))):
        v = argparse.Namespace(**vars(args))
        for item in spec.split(","):
            key, _, val = item.partition("=")
            if key.strip() not in VARIANT_KEYS:
                raise SystemExit(f"--variants: unknown key {key!r} (use {sorted(VARIANT_KEYS)})")
            dest, conv = VARIANT_KEYS[key.strip()]
            setattr(v, dest, conv(val.strip()))
        v.label = spec
        out.append((v.engines, v))
    return out


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
    ap.add_argument("--compile", action="store_true", help="torch.compile each LLM decoder + encoder layer")
    ap.add_argument("--ce", choices=("hf", "chunked"), default="hf", help="loss: transformers' or chunked fused")
    ap.add_argument("--ce-chunk", type=int, default=2048, help="tokens per chunk of the chunked loss")
    ap.add_argument("--zero", type=int, choices=(1, 2), default=2, help="DeepSpeed ZeRO stage")
    ap.add_argument("--accum-fp32", action="store_true", help="DeepSpeed fp32 gradient accumulation")
    ap.add_argument("--variants", default="", help='rows "k=v,...;k=v,..." (keys: ' + ", ".join(VARIANT_KEYS) + ")")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the variants left after this many s")
    ap.add_argument("--in-process", action="store_true",
                    help="run all variants in this process (default: one child process per variant, since "
                         "DeepSpeed engines and compiled layers keep GPU memory alive after they are deleted)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    if args.variants and ";" in args.variants.strip(" ;") and not args.in_process:
        return run_children(args)
    for key, val in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0",
                     "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, val)
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {args.steps} timed steps after {args.warmup}", flush=True)
    rows, start = [], time.perf_counter()
    for kind, v in variants(args):
        label = getattr(v, "label", kind)
        t0 = time.perf_counter()
        if args.budget_s and t0 - start > args.budget_s:
            print(f"skipped (over --budget-s): {label}", flush=True)
            continue
        try:
            row = run_engine(kind, v, device)
        except Exception as exc:  # noqa: BLE001 -- one variant failing must not hide the others' rows
            row = {"engine": kind, "error": f"{type(exc).__name__}: {exc}"[:300]}
        row.update(label=label, seq=v.seq, crops=v.crops, mb=v.micro_batch, accum=v.accum, wall_s=time.perf_counter() - t0)
        rows.append(row)
        print(ROW_TAG + json.dumps(row), flush=True)
    print_table(rows)


ROW_TAG = "BENCH_ROW "


def run_children(args) -> None:
    """One child process per variant (clean GPU memory each time); collects their rows."""
    argv = sys.argv[1:]
    del argv[argv.index("--variants"):argv.index("--variants") + 2]
    rows, start = [], time.perf_counter()
    for spec in filter(None, (x.strip() for x in args.variants.split(";"))):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"skipped (over --budget-s): {spec}", flush=True)
            continue
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--variants", spec + ";",
                               "--in-process"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found = [ln[len(ROW_TAG):] for ln in proc.stdout.splitlines() if ln.startswith(ROW_TAG)]
        row = json.loads(found[-1]) if found else {"engine": spec, "label": spec, "seq": "?", "crops": "?",
                                                   "mb": "?", "accum": "?",
                                                   "error": f"rc {proc.returncode}: {proc.stdout[-300:]}"}
        rows.append(row)
        print(row, flush=True)
    print_table(rows)


def print_table(rows) -> None:
    print("\n| variant | seq | mb x accum | step (s) | tokens/s | model TFLOP/s | MFU | peak GPU mem (GiB) "
          "| GPU s fwd / bwd / step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['label']} | {r['seq']} ({r['crops']} crops) | {r['mb']} x {r['accum']} "
        if "error" in r:
            print(head + f"| failed: {r['error']} | | | | | |")
        else:
            g = r["gpu_s"]
            print(head + f"| {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | "
                  f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {g.get('forward', 0):.3f} / "
                  f"{g.get('backward', 0):.3f} / {g.get('step', 0):.3f} |")
    print(f"peak: {next((r['peak_src'] for r in rows if 'peak_src' in r), '?')}")


if __name__ == "__main__":
    main()
