"""Stage-2 training throughput at full size: tokens/s and MFU on one GPU (prints a table).

so400m encoder + bluelm_3b_proxy LLM (2.72B), random init, bf16, everything trainable with
docs/design.md §4's AdamW (ViT layer-wise LR decay 0.9), synthetic unpadded batches: each sample is
``--crops`` crops of 384 px (196 visual tokens each after the 2x2 merge) + text up to ``--seq``
tokens. The step is the train job's: the speed options of ``bluelm_v.jobs.train.speed`` (the job's
``train.compile`` / ``train.loss_chunk_tokens`` / ``train.sdpa_backend``), the DeepSpeed config
of ``conf/deepspeed/NAME.yaml`` completed by ``bluelm_v.jobs.train.loop.deepspeed_config``, and the
FLOP count of ``bluelm_v.jobs.train.flops`` (MFU = model FLOPs incl. full-square attention / peak;
peak = dense bf16 of the GPU, H100/H200 SXM 989 TFLOP/s, unless --peak-tflops).

Variant keys (flags of the same name set the defaults; ``--variants "k=v,...;k=v,..."`` gives one
row per entry, each in its own child process): engine (deepspeed | torch: plain loop, bf16 weights,
fused AdamW, no master copy), ds (conf/deepspeed name), zero (stage), accum_fp32, overlap
(overlap_comm), bucket (reduce/allgather bucket elements), torch_adam (0: DeepSpeed FusedAdam),
mb, accum, compile, cmode (compile mode), ce (loss chunk tokens, 0 = transformers' loss), attn
(sdpa backend), seq, crops, host (1: token ids on the host as in the job, splice planned there
without device syncs), profile (1: one extra step under torch.profiler -> GPU time by kernel kind,
GEMM and attention TFLOP/s, GPU idle time by the CPU work it waited on, host syncs per step;
bluelm_v.jobs.train.profiling).

    python bench/bench_train_gpu.py --tiny --steps 2 --warmup 1            # CPU smoke test
    python bench/bench_train_gpu.py --seq 4096 --crops 9 --steps 3 --warmup 2 --variants \\
      "ds=zero2,mb=1,accum=8,compile=1,ce=2048,profile=1;ds=zero2,mb=1,accum=8,compile=1,ce=2048,attn=cudnn"
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ON = lambda v: str(v).strip().lower() not in ("0", "false", "", "no", "off")  # noqa: E731


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
    ids = torch.randint(0, 256, (args.micro_batch, text), generator=gen)   # [B, T]
    ids[:, 4] = IMAGE_TOKEN_ID
    if not args.host_ids:                    # host ids: the job's path (splice planned on the host)
        ids = ids.to(device)
    labels = ids.clone()
    labels[:, :5] = -100
    images = [torch.randn(args.crops, 3, 384, 384, generator=gen).to(device) for _ in range(args.micro_batch)]
    return {"input_ids": ids, "labels": labels, "images": images}


def ds_config(args, device) -> dict:
    """conf/deepspeed/<args.ds>.yaml + the variant's overrides, completed as the train job does."""
    import yaml

    from bluelm_v.jobs.train.loop import deepspeed_config

    ds = yaml.safe_load((REPO / "conf" / "deepspeed" / f"{args.ds}.yaml").read_text())
    zero = ds.setdefault("zero_optimization", {})
    if args.zero is not None:
        zero["stage"] = args.zero
    if args.overlap is not None:
        zero["overlap_comm"] = bool(args.overlap)
    if args.bucket:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = int(float(args.bucket))
    if args.accum_fp32:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    optim = {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.05, "torch_adam": bool(args.torch_adam)}
    return deepspeed_config({"deepspeed": ds, "micro_batch": args.micro_batch, "grad_accum": args.accum,
                             "world_size": 1, "optim": optim}, device)


def run_engine(kind: str, args, device) -> dict:
    import torch

    from bluelm_v.jobs.train.flops import StepFlops, device_peak_flops
    from bluelm_v.jobs.train.optim import build_param_groups
    from bluelm_v.jobs.train.profiling import count_syncs, profile_step
    from bluelm_v.jobs.train.speed import apply_speed_options

    model = build(args, device)
    model.train()
    parts = ["encoder", "downsampler", "projector", "llm"]
    groups = build_param_groups(model, parts, 1e-4, 0.05, 0.9)
    for g in groups:
        g.pop("name"), g.pop("lr_scale")
    if args.checkpointing:
        model.llm.model.gradient_checkpointing_enable()
    net = apply_speed_options(model, {"compile": args.compile, "compile_mode": args.cmode,
                                      "loss_chunk_tokens": args.ce, "sdpa_backend": args.attn})
    cuda = device.type == "cuda"
    ds = None
    if kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
        ds = ds_config(args, device)
        engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=groups, config=ds)
        fwd, backward, step = engine, engine.backward, engine.step
    else:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=cuda)
        micro = {"n": 0}
        fwd = net

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

    from torch.profiler import record_function

    def one_step(timer):
        for a in range(args.accum):
            timer.mark("other")
            with record_function("phase:forward"):
                out = fwd(**data[a % 2])
            timer.mark("forward")
            with record_function("phase:backward"):
                backward(out.loss)
            timer.mark("backward")
            with record_function("phase:step"):
                step()
            timer.mark("step")
        return out

    times, phases = [], []
    timer = PhaseTimer(device)
    graphs = {}
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            graphs["before"] = compiled_graphs()
        sync(device)
        t0 = time.perf_counter()
        timer.reset()
        out = one_step(timer)
        sync(device)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
            phases.append(timer.totals())
    k = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    dt = times[k]                                                        # median optimizer step
    n_samples = args.micro_batch * args.accum
    tokens = n_samples * args.seq
    flops = flops_of(n_samples * args.crops, [args.seq] * n_samples)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan")
    row = {"engine": kind, "step_s": dt, "tokens_per_s": tokens / dt, "tokens_per_step": tokens,
           "tflops": flops / dt / 1e12, "mfu": flops / dt / peak, "peak_gib": mem, "peak_src": src,
           "loss": float(out.loss.detach()), "gpu_s": phases[k]}
    row["graphs_compiled_while_timed"] = compiled_graphs() - graphs.get("before", 0)
    g = phases[k]
    row["mfu_fwd_bwd"] = flops / max(1e-9, g.get("forward", 0) + g.get("backward", 0)) / peak
    if args.profile:
        attn = flops_of.attention(n_samples * args.crops, [args.seq] * n_samples)
        attn_work = flops_of.attention(n_samples * args.crops, [args.seq] * n_samples, causal_work=True)
        row["profile"] = profile_step(lambda: one_step(PhaseTimer(device)), device, flops - attn, attn, attn_work)
        row["profile"]["syncs_per_step"] = count_syncs(lambda: one_step(PhaseTimer(device)))
    return row


def compiled_graphs() -> int:
    """Graphs torch.compile has made so far in this process (a count that moves while timing
    means recompiles inside the timed steps)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


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


def _chunk(v: str) -> int:
    return 2048 if v.strip() == "chunked" else 0 if v.strip() == "hf" else int(v)


VARIANT_KEYS = {"engine": ("engines", str), "ds": ("ds", str), "zero": ("zero", int), "mb": ("micro_batch", int),
                "accum": ("accum", int), "compile": ("compile", ON), "cmode": ("cmode", str), "ce": ("ce", _chunk),
                "attn": ("attn", str), "accum_fp32": ("accum_fp32", ON), "overlap": ("overlap", ON),
                "bucket": ("bucket", float), "torch_adam": ("torch_adam", ON), "seq": ("seq", int),
                "crops": ("crops", int), "profile": ("profile", ON), "host": ("host_ids", ON)}


def variants(args) -> list[tuple[str, argparse.Namespace]]:
    """(engine, args) per row: ``--variants "k=v,k=v;k=v"`` overrides the flags per row."""
    if not args.variants:
        return [(kind, args) for kind in args.engines.split(",")]
    out = []
    for spec in filter(None, (x.strip() for x in args.variants.split(";"))):
        v = argparse.Namespace(**vars(args))
        v.engines = args.engines.split(",")[0]
        for item in spec.split(","):
            key, _, val = item.partition("=")
            if key.strip() not in VARIANT_KEYS:
                raise SystemExit(f"--variants: unknown key {key!r} (use {sorted(VARIANT_KEYS)})")
            dest, conv = VARIANT_KEYS[key.strip()]
            setattr(v, dest, conv(val.strip()))
        v.label = spec
        out.append((v.engines, v))
    return out


def parse_args(argv=None):
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
    ap.add_argument("--cmode", default="default", help="compile mode (default | max-autotune-no-cudagraphs)")
    ap.add_argument("--ce", type=_chunk, default=0, help="loss chunk tokens (0/hf: transformers' loss; chunked = 2048)")
    ap.add_argument("--attn", default="auto", help="sdpa backend: auto | flash | cudnn | efficient | math")
    ap.add_argument("--ds", default="zero2", help="conf/deepspeed/NAME.yaml")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="override the ZeRO stage")
    ap.add_argument("--accum-fp32", action="store_true", help="DeepSpeed fp32 gradient accumulation")
    ap.add_argument("--overlap", type=ON, default=None, help="override zero_optimization.overlap_comm")
    ap.add_argument("--bucket", type=float, default=None, help="reduce/allgather bucket size (elements)")
    ap.add_argument("--torch-adam", type=ON, default=True, help="torch's fused AdamW (0: DeepSpeed FusedAdam)")
    ap.add_argument("--host-ids", action="store_true", help="token ids/labels stay on the host, as in the train "
                    "job (TrainStep plans the splice there: no device syncs); default: on the device")
    ap.add_argument("--profile", action="store_true", help="one more step under torch.profiler: time by kernel kind")
    ap.add_argument("--variants", default="", help='rows "k=v,...;k=v,..." (keys: ' + ", ".join(VARIANT_KEYS) + ")")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the variants left after this many s")
    ap.add_argument("--deadline-s", type=float, default=None, help="children: killed at this many s in all")
    ap.add_argument("--out", default=None, help="also write the rows (JSON lines) and the table here")
    ap.add_argument("--in-process", action="store_true",
                    help="run all variants in this process (default: one child process per variant, since "
                         "DeepSpeed engines and compiled layers keep GPU memory alive after they are deleted)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
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
        gc.collect()
    report(rows, args.out)


ROW_TAG = "BENCH_ROW "


def run_children(args) -> None:
    """One child process per variant (clean GPU memory each time); collects their rows."""
    argv = sys.argv[1:]
    del argv[argv.index("--variants"):argv.index("--variants") + 2]
    if "--out" in argv:
        del argv[argv.index("--out"):argv.index("--out") + 2]
    rows, start = [], time.perf_counter()
    for spec in filter(None, (x.strip() for x in args.variants.split(";"))):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"skipped (over --budget-s): {spec}", flush=True)
            continue
        left = args.deadline_s - (time.perf_counter() - start) if args.deadline_s else None
        if left is not None and left < 30:
            print(f"skipped (past --deadline-s): {spec}", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variants", spec + ";", "--in-process"]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=left)
            stdout, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stdout, rc = exc.stdout or "", "timeout"
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        found = [ln[len(ROW_TAG):] for ln in stdout.splitlines() if ln.startswith(ROW_TAG)]
        row = json.loads(found[-1]) if found else {"engine": spec, "label": spec, "seq": "?", "crops": "?",
                                                   "mb": "?", "accum": "?",
                                                   "error": f"rc {rc}: {stdout[-300:]}"}
        rows.append(row)
        print(ROW_TAG + json.dumps(row), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(Path(args.out).with_suffix(".jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
    report(rows, args.out)


def report(rows, out: str | None) -> None:
    lines = ["| variant | seq | mb x accum | tokens/step | step (s) | tokens/s | model TFLOP/s | MFU "
             "| MFU fwd+bwd only | peak GPU mem (GiB) | GPU s fwd / bwd / step | graphs while timed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['label']} | {r['seq']} ({r['crops']} crops) | {r['mb']} x {r['accum']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} | | | | | | | | |")
            continue
        g = r["gpu_s"]
        lines.append(head + f"| {r['tokens_per_step']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | "
                     f"{100 * r['mfu']:.1f}% | {100 * r['mfu_fwd_bwd']:.1f}% | {r['peak_gib']:.1f} | "
                     f"{g.get('forward', 0):.3f} / {g.get('backward', 0):.3f} / {g.get('step', 0):.3f} | "
                     f"{r.get('graphs_compiled_while_timed', 0)} |")
    lines.append(f"peak: {next((r['peak_src'] for r in rows if 'peak_src' in r), '?')}")
    for r in rows:
        if r.get("profile"):
            lines.append(f"profile of one step, {r['label']}: {json.dumps(r['profile'])}")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
