"""Stage-2 training throughput at full size on one GPU: tokens/s and MFU per variant (prints a table).

so400m encoder + bluelm_3b_proxy LLM (2.72B), random init, bf16, everything trainable with
docs/design.md §4's AdamW (ViT layer-wise LR decay 0.9). The step is the train job's own:
``apply_speed_options`` (jobs/train/speed.py) builds the TrainStep, batches come from the job's
plans and collate functions (padded: LengthGroupedPlan + collate; packed: PackedPlan +
collate_packed), DeepSpeed is configured by conf/deepspeed/NAME.yaml through the job's
``deepspeed_config``, FLOPs by jobs/train/flops.py. Every default below is the train job's
setting under ``+experiment=train`` (read from conf/job/train.yaml + conf/experiment/train.yaml).

Data (``data``): ``uniform`` = every sample exactly ``seq`` tokens with ``crops`` crops (no
padding at all); ``mix`` = jobs/train/mix.py's synthetic LLaVA-665k-like length mix (6% text-only,
relaxed-tiler crops of COCO sizes, stated text-length distribution), or the real lengths of
``--llava-json``/``--image-root`` (no image decoded). tokens/s and MFU count real tokens only
(MFU = model FLOPs of the real samples, full-square attention per sample, / peak; H100/H200 SXM
989 TFLOP/s dense bf16 unless --peak-tflops); ``fill`` = real / computed LLM tokens.

Variant keys (``--variants "k=v,...;k=v,..."``: one row each, each in its own child process):
data, pack (1: packed rows of max_seq), max_seq, group (length-grouped padded batches), fused
(q|k|v + gate|up), doc_attn (sdpa | flex | varlen | auto), ckpt (activation checkpointing), ds
(conf/deepspeed name), zero, accum_fp32, overlap, bucket, torch_adam, mb (samples, or packed
rows), accum, compile, cmode, ce (loss chunk tokens), attn (sdpa backend), seq, crops, engine
(deepspeed | torch: plain loop, a reference only), profile (1: one more step under torch.profiler).

    python bench/bench_train_gpu.py --smoke                       # CPU, tiny model, < 1 minute
    python bench/bench_train_gpu.py --attention-only               # document-masked attention kernels
    python bench/bench_train_gpu.py --steps 2 --warmup 1 --variants \\
      "data=uniform,seq=4096,crops=9,mb=4,accum=8,fused=0;data=mix,pack=0,mb=8,accum=8;data=mix,pack=1,mb=4,accum=8"
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
sys.path.insert(0, str(REPO / "bench"))
ON = lambda v: str(v).strip().lower() not in ("0", "false", "", "no", "off")  # noqa: E731
from bench_train_report import ROW_TAG, PhaseTimer, attention_table, compiled_graphs, report, sync  # noqa: E402


def job_defaults() -> dict:
    """The train job's speed and batch settings under +experiment=train (conf/job/train.yaml
    overlaid with conf/experiment/train.yaml; PyYAML only: no Hydra on the GPU machine)."""
    import yaml

    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    job = yaml.safe_load((REPO / "conf" / "job" / "train.yaml").read_text())
    exp = yaml.safe_load((REPO / "conf" / "experiment" / "train.yaml").read_text())
    t = merge(job["train"], exp.get("train") or {})
    tiler = merge(yaml.safe_load((REPO / "conf" / "tiler" / "relaxed.yaml").read_text()), exp.get("tiler") or {})
    ds = next(d["/deepspeed"] for d in job["defaults"] if isinstance(d, dict) and "/deepspeed" in d)
    s2 = t["stage2"]
    return {"compile": t["compile"], "cmode": t["compile_mode"], "ce": t["loss_chunk_tokens"],
            "attn": t["sdpa_backend"], "fused": t["fused_projections"], "doc_attn": t["attention"],
            "ckpt": t["activation_checkpointing"], "encoder_tiles": t["encoder_tiles_per_batch"],
            "pack": s2["packing"] if t.get("packing") is None else t["packing"], "max_seq": t["max_seq"],
            "longest_first": t["pack_longest_first"], "group": t["data"]["group_by_length"],
            "max_length": t["data"]["max_length"], "micro_batch": s2["micro_batch"], "accum": s2["grad_accum"],
            "ds": ds, "torch_adam": t["optim"]["torch_adam"], "tiler": tiler}


def build(args, device):
    import torch

    from bluelm_v.model import BlueLMV
    from bluelm_v.plugin_manager import get

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    dev = device.type
    enc = {"name": "siglip", "preset": "tiny" if args.tiny else "so400m", "dtype": dtype, "device": dev}
    if args.tiny:
        enc["image_size"] = 112
    llm = {"name": "hf_causal", "preset": "tiny" if args.tiny else "bluelm_3b_proxy", "dtype": dtype, "device": dev}
    torch.manual_seed(0)
    _, registry, _ = get()
    cfg = {"encoder": enc, "downsampler": {"name": "vila_2x2"}, "projector": {"name": "mlp2x_gelu", "dtype": dtype},
           "llm": llm}
    tiler_node = {**args.tiler, "tile_size": 112} if args.tiny else args.tiler
    return BlueLMV.from_config(cfg, registry).to(device), registry.create_from_config("tiler", tiler_node, "tiler")


def batches(args, model, tiler, device):
    """(the job's micro-batches of the variant's data, collated on the host, forever; the packed
    row length)."""
    import torch

    from bluelm_v.jobs.train.data import LengthGroupedPlan, collate
    from bluelm_v.jobs.train.mix import llava_mix, synthetic_item, synthetic_mix, uniform_mix
    from bluelm_v.jobs.train.packing import PackedPlan, collate_packed

    tpc = model.tokens_per_crop
    n = 8192 if not args.tiny else 512
    if args.data == "uniform":
        mix = uniform_mix(n, args.seq, args.crops, tpc)
    elif args.llava_json:
        mix = llava_mix(args.llava_json, args.image_root, tiler, model.tokenizer, tpc, args.max_length,
                        cache_dir=args.cache_dir)
    else:
        mix = synthetic_mix(n, tiler, tpc, args.max_length, seed=0)
    max_seq = max(args.max_seq, int(mix.lengths.max())) if args.data == "uniform" else args.max_seq
    if args.pack:
        plan = PackedPlan(mix.lengths.tolist(), max_seq, args.micro_batch, seed=0, longest_first=args.longest_first)
    else:
        plan = LengthGroupedPlan(mix.lengths.tolist(), args.micro_batch, seed=0, group_by_length=args.group)
    gen = torch.Generator().manual_seed(0)
    size = 112 if args.tiny else 384
    pool = torch.randn(max(1, int(mix.crops.max())), 3, size, size, generator=gen).to(device)   # [K_max, 3, B, B]
    pad = model.tokenizer.pad_token_id

    def stream():
        k = 0
        while True:
            rows = [[synthetic_item(mix, i, gen, pool) for i in row] for row in plan.rows(k)]
            batch = (collate_packed(rows, pad, max_seq, tpc) if args.pack else collate([r[0] for r in rows], pad))
            batch["computed_tokens"] = (len(rows) * max_seq if args.pack
                                        else len(batch["lengths"]) * max(batch["lengths"]))
            yield batch
            k += 1

    return stream(), max_seq


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
    from torch.profiler import record_function

    from bluelm_v.jobs.train.flops import StepFlops, device_peak_flops
    from bluelm_v.jobs.train.loop import step_inputs
    from bluelm_v.jobs.train.optim import build_param_groups
    from bluelm_v.jobs.train.profiling import count_syncs, profile_step
    from bluelm_v.jobs.train.speed import apply_speed_options

    model, tiler = build(args, device)
    model.train()
    parts = ["encoder", "downsampler", "projector", "llm"]
    groups = build_param_groups(model, parts, 1e-4, 0.05, 0.9)
    for g in groups:
        g.pop("name"), g.pop("lr_scale")
    stream, max_seq = batches(args, model, tiler, device)
    net = apply_speed_options(model, {"compile": args.compile, "compile_mode": args.cmode, "loss_chunk_tokens": args.ce,
                                      "sdpa_backend": args.attn, "fused_projections": args.fused,
                                      "attention": args.doc_attn, "packing": args.pack, "max_seq": max_seq,
                                      "activation_checkpointing": args.ckpt,
                                      "encoder_tiles_per_batch": args.encoder_tiles})
    cuda = device.type == "cuda"
    if kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
        engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=groups, config=ds_config(args, device))
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

    def one_step(timer, tally):
        for _ in range(args.accum):
            batch = next(stream)
            timer.mark("other")
            with record_function("phase:forward"):
                out = fwd(**step_inputs(batch))
            timer.mark("forward")
            with record_function("phase:backward"):
                backward(out.loss)
            timer.mark("backward")
            with record_function("phase:step"):
                step()
            timer.mark("step")
            for key, val in (("tokens", batch["llm_tokens"]), ("computed", batch["computed_tokens"]),
                             ("samples", len(batch["lengths"])), ("flops", flops_of(batch["crops"], batch["lengths"])),
                             ("attn", flops_of.attention(batch["crops"], batch["lengths"])),
                             ("attn_work", flops_of.attention(batch["crops"], batch["lengths"], causal_work=True))):
                tally[key] = tally.get(key, 0) + val
        return out

    timer, timed, phases, before = PhaseTimer(device), {}, [], 0
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            before = compiled_graphs()
        sync(device)
        t0 = time.perf_counter()
        timer.reset()
        tally = {}
        out = one_step(timer, tally)
        sync(device)
        if s >= args.warmup:
            tally["time"] = time.perf_counter() - t0
            for key, val in tally.items():
                timed[key] = timed.get(key, 0) + val
            phases.append(timer.totals())
    dt, steps = timed["time"], args.steps
    gpu = {p: round(sum(ph.get(p, 0.0) for ph in phases) / steps, 4) for p in ("forward", "backward", "step")}
    row = {"engine": kind, "step_s": dt / steps, "tokens_per_s": timed["tokens"] / dt,
           "tokens_per_step": timed["tokens"] / steps, "samples_per_step": timed["samples"] / steps,
           "fill": timed["tokens"] / timed["computed"], "tflops": timed["flops"] / dt / 1e12,
           "mfu": timed["flops"] / dt / peak, "peak_src": src, "loss": float(out.loss.detach()), "gpu_s": gpu,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan"),
           "graphs_compiled_while_timed": compiled_graphs() - before,
           "mfu_fwd_bwd": timed["flops"] / steps / max(1e-9, gpu["forward"] + gpu["backward"]) / peak}
    if args.profile:
        prof_tally = {}
        row["profile"] = profile_step(lambda: one_step(PhaseTimer(device), prof_tally), device,
                                      timed["flops"] / steps - timed["attn"] / steps, timed["attn"] / steps,
                                      timed["attn_work"] / steps)
        row["profile"]["syncs_per_step"] = count_syncs(lambda: one_step(PhaseTimer(device), {}))
    return row


VARIANT_KEYS = {"engine": ("engines", str), "ds": ("ds", str), "zero": ("zero", int), "mb": ("micro_batch", int),
                "accum": ("accum", int), "compile": ("compile", ON), "cmode": ("cmode", str), "ce": ("ce", int),
                "attn": ("attn", str), "accum_fp32": ("accum_fp32", ON), "overlap": ("overlap", ON),
                "bucket": ("bucket", float), "torch_adam": ("torch_adam", ON), "seq": ("seq", int),
                "crops": ("crops", int), "profile": ("profile", ON), "data": ("data", str), "pack": ("pack", ON),
                "max_seq": ("max_seq", int), "group": ("group", ON), "fused": ("fused", ON),
                "doc_attn": ("doc_attn", str), "ckpt": ("ckpt", ON), "encoder_tiles": ("encoder_tiles", int)}


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
    d = job_defaults()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny model, uniform + mix padded + mix packed")
    ap.add_argument("--tiny", action="store_true", help="tiny encoder + LLM (CPU)")
    ap.add_argument("--attention-only", action="store_true", help="time the document-masked attention kernels only")
    ap.add_argument("--engines", default="deepspeed", help="deepspeed (the job's) | torch (a plain-loop reference)")
    ap.add_argument("--data", default="mix", choices=("uniform", "mix"))
    ap.add_argument("--llava-json", default=None, help="measure on this LLaVA-format file's lengths instead")
    ap.add_argument("--image-root", default=None)
    ap.add_argument("--cache-dir", default=None, help="length-scan cache for --llava-json")
    ap.add_argument("--seq", type=int, default=4096, help="uniform data: LLM tokens per sample (visual + text)")
    ap.add_argument("--crops", type=int, default=9, help="uniform data: 384-px crops per sample")
    ap.add_argument("--max-length", type=int, default=d["max_length"], help="mix: longest sample kept")
    ap.add_argument("--pack", type=ON, default=d["pack"], help="packed rows of --max-seq tokens")
    ap.add_argument("--max-seq", type=int, default=d["max_seq"])
    ap.add_argument("--longest-first", type=ON, default=d["longest_first"])
    ap.add_argument("--group", type=ON, default=d["group"], help="padded batches grouped by length")
    ap.add_argument("--micro-batch", type=int, default=d["micro_batch"], help="samples (padded) or rows (packed)")
    ap.add_argument("--accum", type=int, default=d["accum"])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (their sum is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ckpt", type=ON, default=d["ckpt"], help="activation checkpointing of the LLM layers")
    ap.add_argument("--compile", type=ON, default=d["compile"])
    ap.add_argument("--cmode", default=d["cmode"], help="compile mode (default | max-autotune-no-cudagraphs)")
    ap.add_argument("--ce", type=int, default=d["ce"], help="loss chunk tokens (0: a plain loss)")
    ap.add_argument("--attn", default=d["attn"], help="sdpa backend: auto | flash | cudnn | efficient | math")
    ap.add_argument("--fused", type=ON, default=d["fused"], help="fused q|k|v and gate|up matmuls")
    ap.add_argument("--doc-attn", default=d["doc_attn"], help="packed rows: auto | sdpa | flex | varlen")
    ap.add_argument("--encoder-tiles", type=int, default=d["encoder_tiles"], help="crops per encoder call (0: all)")
    ap.add_argument("--ds", default=d["ds"], help="conf/deepspeed/NAME.yaml")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="override the ZeRO stage")
    ap.add_argument("--accum-fp32", action="store_true", help="DeepSpeed fp32 gradient accumulation")
    ap.add_argument("--overlap", type=ON, default=None, help="override zero_optimization.overlap_comm")
    ap.add_argument("--bucket", type=float, default=None, help="reduce/allgather bucket size (elements)")
    ap.add_argument("--torch-adam", type=ON, default=d["torch_adam"], help="torch's fused AdamW (0: DeepSpeed FusedAdam)")
    ap.add_argument("--profile", action="store_true", help="one more step under torch.profiler: time by kernel kind")
    ap.add_argument("--variants", default="", help='rows "k=v,...;k=v,..." (keys: ' + ", ".join(VARIANT_KEYS) + ")")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the variants left after this many s")
    ap.add_argument("--deadline-s", type=float, default=None, help="children: killed at this many s in all")
    ap.add_argument("--out", default=None, help="also write the rows (JSON lines) and the table here")
    ap.add_argument("--in-process", action="store_true",
                    help="run all variants in this process (default: one child process per variant, since "
                         "DeepSpeed engines and compiled layers keep GPU memory alive after they are deleted)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args(argv)
    args.tiler = d["tiler"]
    if args.smoke:
        args.tiny, args.in_process, args.compile, args.steps, args.warmup = True, True, False, 1, 1
        args.seq, args.crops, args.max_length, args.max_seq, args.accum = 96, 2, 400, 512, 2
        args.variants = args.variants or "data=uniform,pack=0,mb=2;data=mix,pack=0,mb=4;data=mix,pack=1,mb=2"
    return args


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
    if args.attention_only:
        return print(attention_table(device, tiny=args.tiny), flush=True)
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
            row = {"engine": kind, "error": f"{type(exc).__name__}: {exc}"[:400]}
        row.update(label=label, data=v.data, pack=v.pack, mb=v.micro_batch, accum=v.accum,
                   wall_s=time.perf_counter() - t0)
        rows.append(row)
        print(ROW_TAG + json.dumps(row), flush=True)
        gc.collect()
    report(rows, args.out)


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
        row = json.loads(found[-1]) if found else {"engine": spec, "label": spec, "error": f"rc {rc}: {stdout[-400:]}"}
        rows.append(row)
        print(ROW_TAG + json.dumps(row), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(Path(args.out).with_suffix(".jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
    report(rows, args.out)


if __name__ == "__main__":
    main()
