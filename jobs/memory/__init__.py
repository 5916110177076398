"""Peak memory of the full-size quantised pipeline on CPU (the paper's 2.2 GB phone budget).

    python -m bluelm_v.launch +experiment=memory
    python -m bluelm_v.launch +experiment=memory job.prompt_tokens=1024 job.decode_tokens=16
    python -m bluelm_v.launch +experiment=memory encoder=tiny llm=tiny job.prompt_tokens=2048   # quick check

Two steps, like a deployment: (1) BUILD, in this process: the pipeline (so400m + bluelm_3b_proxy,
random init) is built on the meta device and each layer is filled and quantised in turn with
``quantizer`` (bluelm_mixed), never a full fp32 copy; the quantised parts are saved as
safetensors (cached under ``job.checkpoint_dir`` or ~/.cache/bluelm_v/memory/<hash>, reused when
the settings match). (2) RUN, in a fresh Python process (under ``/usr/bin/time -v`` when it
exists): with ``job.schedule: staged`` (default) load the ViT + projector from the checkpoint, encode
a ``job.image_size`` image (768x1536: grid 2:4 + thumbnail = 9 crops), release them, then load the
LLM (``together``: ViT and LLM loaded up front, as the paper's 0.47 s load), prefill
``job.prompt_tokens`` positions (visual tokens included) in ``job.prefill_chunk``-token chunks,
decode ``job.decode_tokens`` tokens. The worker records its own peak RSS (getrusage ru_maxrss),
and the RSS and materialised weights per part after every stage.

summary.json: peak_rss_mb (self-measured), time_v_max_rss_mb (/usr/bin/time -v), goal (2.2 GB =
2098 MiB), weight bytes per part, KV-cache bytes, the per-stage RSS breakdown, timings.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from bluelm_v.errors import ConfigError
from bluelm_v.job import progress, write_json
from bluelm_v.jobs.memory.worker import release_heap

# The top-level nodes this job reads (bluelm_v.launch refuses overrides of the others).
USES = ("tiler", "encoder", "downsampler", "projector", "llm", "engine", "quantizer")
OPEN_NODES = ("job.worker_env",)   # environment variables of the measured process

GOAL_BYTES = 2.2e9        # the paper's 2.2 GB (decimal): 2098 MiB


def validate(cfg, registry) -> None:
    job = cfg.job
    if job.prefill_chunk < 1 or job.decode_tokens < 0 or job.prompt_tokens < 1:
        raise ConfigError("job.prefill_chunk: prefill_chunk >= 1, prompt_tokens >= 1 and decode_tokens >= 0 needed")
    if job.get("schedule", "staged") not in ("staged", "together"):
        raise ConfigError(f"job.schedule: {job.schedule!r}; use staged or together")
    if len(job.image_size) != 2 or min(job.image_size) < 1:
        raise ConfigError(f"job.image_size: expected [width, height], got {list(job.image_size)}")


def checkpoint_dir(cfg) -> Path:
    """Where the quantised pipeline is stored: keyed by everything that shapes its tensors."""
    if cfg.job.checkpoint_dir:
        return Path(cfg.job.checkpoint_dir)
    key_src = {k: OmegaConf.to_container(cfg[k], resolve=True)
               for k in ("encoder", "downsampler", "projector", "llm", "quantizer")}
    for part in ("encoder", "llm"):        # native and transformers trees hold the same tensors
        key_src[part].pop("implementation", None)
    key_src["seed"] = cfg.get("seed", 0)
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("BLUELM_V_CACHE") or Path.home() / ".cache" / "bluelm_v")
    return root / "memory" / key


def build_checkpoint(ctx, directory: Path) -> dict:
    """Step 1: meta build -> per-layer random init + quantisation -> safetensors per part."""
    import torch

    from bluelm_v.plugins.quantizers.schemes import model_parts, weight_bytes
    from bluelm_v.nn.meta_build import RandomInit, build_meta_model, materialize_remaining

    done = directory / "complete.json"
    quantizer = ctx.create("quantizer")
    if done.exists() and json.loads(done.read_text()).get("settings") == quantizer.settings():
        return {**json.loads(done.read_text()), "reused": True}
    t0 = time.perf_counter()
    print(f"bluelm-v: memory: building the quantised checkpoint once (reused later): {directory}",
          file=sys.stderr, flush=True)
    with torch.no_grad():
        model = build_meta_model(ctx.cfg, ctx.registry)
        init = RandomInit(int(ctx.cfg.get("seed", 0)))
        n_meta = sum(1 for m in model.modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.is_meta)
        with progress(total=n_meta, desc="memory: init + quantise", unit="layer") as bar:
            def materialize(name, module):           # the quantizer calls this once per layer it quantises
                init(name, module)
                bar.update(1)
            quantizer.apply(model, materialize=materialize)
            materialize_remaining(model, init)       # the layers it leaves as they are
            bar.update(n_meta - bar.n)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files = quantizer.save(model, tmp)
    info = {"settings": quantizer.settings(), "files": files, "build_s": round(time.perf_counter() - t0, 1),
            "weight_bytes": {n: weight_bytes(p) for n, p in model_parts(model).items()},
            "quantizer": quantizer.describe()}
    write_json(tmp / "complete.json", info)
    del model
    release_heap()           # the build's freed memory back to the OS before the measured process starts
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)
    return {**info, "reused": False}


def _time_v_max_rss_mb(stderr: str) -> float | None:
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", stderr)
    return int(m.group(1)) / 1024.0 if m else None


def run(ctx) -> dict:
    cfg, job = ctx.cfg, ctx.cfg.job
    directory = checkpoint_dir(cfg)
    build = build_checkpoint(ctx, directory)
    write_json(ctx.path("build.json"), build)
    cmd = [sys.executable, "-m", "bluelm_v.jobs.memory.worker", str(ctx.run_dir / "config.yaml"),
           str(directory), str(ctx.path("worker.json"))]
    timer = shutil.which(job.time_command) if job.time_command else None
    if timer:
        cmd = [timer, "-v", *cmd]
    env = {**os.environ, **{k: str(v) for k, v in (job.worker_env or {}).items()}}
    t0 = time.perf_counter()
    print(f"bluelm-v: memory: measuring in a fresh process (stage lines as they happen; log: {ctx.path('worker.log')})",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as err:        # a file, not a pipe: nothing blocks while stdout streams
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env) as proc:
            out = []
            try:
                for line in proc.stdout:
                    out.append(line)
                    if line.startswith("[memory]"):
                        print(line.rstrip(), file=sys.stderr, flush=True)
            except BaseException:                    # e.g. Ctrl-C: never leave the measured process behind
                proc.kill()
                raise
            returncode = proc.wait()
        err.seek(0)
        stdout, stderr = "".join(out), err.read()
    (ctx.path("worker.log")).write_text(stdout + "\n" + stderr)
    if returncode != 0 or not ctx.path("worker.json").exists():
        tail = (stderr or stdout)[-2000:]
        raise RuntimeError(f"the measured run failed (exit {returncode}); see {ctx.path('worker.log')}:\n{tail}")
    worker = json.loads(ctx.path("worker.json").read_text())
    peak = worker["peak_rss_mb"]
    time_v = _time_v_max_rss_mb(stderr)
    goal_mib = GOAL_BYTES / 2**20
    weights = build["weight_bytes"]
    return {
        "peak_rss_mb": round(peak, 1),
        "time_v_max_rss_mb": round(time_v, 1) if time_v is not None else None,
        "goal_mb": round(goal_mib, 1),
        "goal_met": peak <= goal_mib,
        "weight_mb": {part: round(w["total"] / 2**20, 1) for part, w in weights.items()},
        "kv_cache_mb": round(worker["kv_cache_bytes"] / 2**20, 1),
        "kv_cache": worker["kv_cache"],
        "stages_rss_mb": worker["stages"],
        "breakdown_mb": worker["breakdown"],
        "crops": worker["crops"], "grid": worker["grid"], "prompt_tokens": worker["prompt_tokens"],
        "visual_tokens": worker["visual_tokens"], "decode_tokens": worker["decode_tokens"],
        "timings_s": worker["timings"],
        "checkpoint": str(directory), "checkpoint_bytes": {k: v["bytes"] for k, v in build["files"].items()},
        "checkpoint_reused": build["reused"], "build_s": build.get("build_s"),
        "run_wall_s": round(time.perf_counter() - t0, 1),
        "threads": worker["threads"], "engine": worker["engine"], "schedule": worker["schedule"],
        "transformers_imported": worker["transformers_imported"], "heavy_imports": worker["heavy_imports"],
    }
