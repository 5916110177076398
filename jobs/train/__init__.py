"""Two-stage training (docs/design.md §4): Ray Train workers running DeepSpeed, stage 1 then stage 2.

    python -m bluelm_v.launch +experiment=train_tiny ray.num_cpus=2         # CPU smoke run, shapes data
    python -m bluelm_v.launch +experiment=train \\
        train.data.stage1.json=/data/blip_laion_cc_sbu_558k.json train.data.stage1.image_root=/data/558k \\
        train.data.stage2.json=/data/llava_v1_5_mix665k.json train.data.stage2.image_root=/data/665k
    python -m bluelm_v.launch +experiment=train_tiny train.stage=1          # stage 1 only
    python -m bluelm_v.launch +experiment=train_tiny train.stage=2 train.init_projector=RUN/stage1/.../projector.safetensors
    python -m bluelm_v.launch +experiment=train_tiny deepspeed=zero3        # any conf/deepspeed/*.yaml
    python -m bluelm_v.launch +experiment=train_tiny train.compile=true train.loss_chunk_tokens=2048

Stage 1 trains the projector (+ downsampler) with encoder and LLM frozen (their weights are
checked bit-identical afterwards) at one fixed crop (tiler `single`); stage 2 trains everything
from stage 1's projector (ViT layer-wise LR decay) at dynamic resolution (the top-level tiler).
Each stage is one Ray Train ``TorchTrainer`` run: ``train.num_workers`` workers, each calling
``deepspeed.initialize`` (gloo + fp32 on CPU, NCCL + bf16 on GPUs), checkpointing through Ray
Train every ``train.checkpoint_every`` steps and resuming from the last checkpoint after a
worker failure (``train.max_failures``). Per-step metrics (loss, lr, grad norm, tokens/s,
skipped samples, MFU) go to the job's loggers and RUN_DIR/metrics.jsonl; summary.json holds per
stage figures, the stage-1 projector path, and the held-out accuracy with its chance level.
Step speed options (jobs/train/speed.py, the same keys and defaults as bench/bench_train_gpu.py):
``train.compile`` (regional torch.compile), ``train.loss_chunk_tokens`` (chunked LM head +
cross-entropy), ``train.sdpa_backend``, ``train.fused_projections`` (one q|k|v and one gate|up
matmul per layer), ``train.attention`` (how packed samples are kept apart), ``train.activation_checkpointing``,
``train.encoder_tiles_per_batch`` (0: all crops of a micro-batch in one encoder call).
Sequence packing (docs/design.md §9, jobs/train/packing.py): ``train.stage2.packing`` (on) packs
whole samples first-fit into rows of ``train.max_seq`` tokens; ``train.packing=true|false`` sets
both stages. Sample lengths come from a scan that decodes no image, cached in
``train.data.cache_dir`` (default RUN_DIR/../length_cache).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from bluelm_v.errors import ConfigError
from bluelm_v.job import write_json

# The top-level nodes this job reads (bluelm_v.launch refuses overrides of the others).
USES = ("tiler", "encoder", "downsampler", "projector", "llm", "deepspeed")
OPEN_NODES = ("deepspeed",)   # a DeepSpeed config: DeepSpeed checks its keys

PARTS = ("encoder", "downsampler", "projector", "llm")


def _stages(cfg) -> list[int]:
    stage = str(cfg.train.stage)
    if stage not in ("1", "2", "both"):
        raise ConfigError(f"train.stage: {cfg.train.stage!r} must be 1, 2 or both")
    return [1, 2] if stage == "both" else [int(stage)]


def stage_packing(cfg, n: int) -> bool:
    """train.packing when set (true/false: both stages), else the stage's own packing key."""
    top = cfg.train.get("packing")
    return bool(top if top is not None else cfg.train[f"stage{n}"].get("packing", False))


def _stage_tiler(cfg, n: int):
    node = cfg.train[f"stage{n}"].get("tiler")
    return node if node is not None else cfg.tiler


def validate(cfg, registry) -> None:
    """Everything checkable before Ray starts: stages, tilers, DeepSpeed node, data paths."""
    if cfg.get("train") is None:
        raise ConfigError("train: no train node; use +experiment=train or +experiment=train_tiny")
    t = cfg.train
    for n in _stages(cfg):
        s = t[f"stage{n}"]
        registry.validate_node("tiler", _stage_tiler(cfg, n), f"train.stage{n}.tiler")
        bad = set(s.trainable) - set(PARTS)
        if bad or not s.trainable:
            raise ConfigError(f"train.stage{n}.trainable: {list(s.trainable)} must be a non-empty subset of {PARTS}")
        if not s.get("steps") and not s.get("epochs"):
            raise ConfigError(f"train.stage{n}: set steps or epochs")
        if int(s.micro_batch) < 1 or int(s.grad_accum) < 1:
            raise ConfigError(f"train.stage{n}.micro_batch/grad_accum: must be >= 1")
    if cfg.get("deepspeed") is None or "zero_optimization" not in cfg.deepspeed:
        raise ConfigError("deepspeed: no DeepSpeed config selected; add deepspeed=zero2 (conf/deepspeed/)")
    if int(cfg.deepspeed.zero_optimization.stage) not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: {cfg.deepspeed.zero_optimization.stage} not in 0..3")
    if int(t.num_workers) < 1:
        raise ConfigError(f"train.num_workers: {t.num_workers} must be >= 1")
    if t.data.source not in ("shapes", "llava"):
        raise ConfigError(f"train.data.source: {t.data.source!r} must be shapes or llava")
    if t.data.source == "llava":
        for n in _stages(cfg):
            node = t.data[f"stage{n}"]
            if not node.get("json") or not Path(node.json).is_file():
                raise ConfigError(f"train.data.stage{n}.json: LLaVA-format file {node.get('json')!r} not found")
    from bluelm_v.jobs.train.decoder import ATTENTIONS
    from bluelm_v.jobs.train.speed import COMPILE_MODES, SDPA_BACKENDS

    if int(t.get("loss_chunk_tokens") or 0) < 0:
        raise ConfigError(f"train.loss_chunk_tokens: {t.loss_chunk_tokens} must be >= 0 (0 = transformers' loss)")
    if str(t.get("compile_mode") or "default") not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode: {t.compile_mode!r} must be one of {COMPILE_MODES}")
    if str(t.get("sdpa_backend") or "auto") not in SDPA_BACKENDS:
        raise ConfigError(f"train.sdpa_backend: {t.sdpa_backend!r} must be one of {SDPA_BACKENDS}")
    if str(t.get("attention") or "auto") not in ATTENTIONS:
        raise ConfigError(f"train.attention: {t.attention!r} must be one of {ATTENTIONS}")
    if str(t.get("attention") or "auto") in ("flex", "varlen") and not t.use_gpu:
        raise ConfigError(f"train.attention: {t.attention} runs on CUDA only; use auto or sdpa with train.use_gpu=false")
    if any(stage_packing(cfg, n) for n in _stages(cfg)):
        if int(t.max_seq) < 16:
            raise ConfigError(f"train.max_seq: {t.max_seq} must be >= 16 (the packed row length in tokens)")
        if int(t.data.max_length) > int(t.max_seq):
            raise ConfigError(f"train.data.max_length: {t.data.max_length} exceeds train.max_seq {t.max_seq}: "
                              "a sample longer than a packed row cannot be packed")
    if t.get("init_projector") and not Path(t.init_projector).is_file():
        raise ConfigError(f"train.init_projector: {t.init_projector!r} not found")


def resolve_data(cfg, run_dir: Path) -> dict:
    """Per stage {json, image_root} and the eval set (+ chance levels for the shapes set)."""
    d = cfg.train.data
    if d.source == "shapes":
        from bluelm_v.data.shapes import generate

        root = Path(d.get("root") or run_dir / "data" / "shapes")
        paths = generate(root, **OmegaConf.to_container(d.shapes, resolve=True))
        meta = json.loads(Path(paths["meta"]).read_text())
        out = {"stage1": {"json": paths["stage1"], "image_root": paths["image_root"]},
               "stage2": {"json": paths["stage2"], "image_root": paths["image_root"]},
               "eval": {"json": paths["eval"], "image_root": paths["image_root"]},
               "chance": meta["chance"]["mean"], "root": str(root)}
    else:
        out = {f"stage{n}": {"json": d[f"stage{n}"].json, "image_root": d[f"stage{n}"].get("image_root")}
               for n in (1, 2)}
        out["eval"] = {"json": d.eval.get("json"), "image_root": d.eval.get("image_root")}
    prescan_image_sizes(out, _stages(cfg), _cache_dir(cfg, run_dir))
    return out


def _cache_dir(cfg, run_dir: Path) -> str:
    return str(Path(cfg.train.data.get("cache_dir") or run_dir.parent / "length_cache"))


def prescan_image_sizes(data: dict, stages: list[int], cache_dir: str) -> None:
    """Fill the header-size cache of each stage's images here, in parallel Ray tasks, while the
    cluster is free (the workers then only read it)."""
    from bluelm_v.data.image_sizes import cached_scan
    from bluelm_v.data.llava import image_paths, load_records

    for n in stages:
        node = data[f"stage{n}"]
        root = Path(node["image_root"] or Path(node["json"]).parent)
        paths = [str(p) for rec in load_records(node["json"]) if isinstance(rec, dict) for p in image_paths(rec)]
        if paths:
            cached_scan(root, paths, cache_dir)


def stage_config(cfg, n: int, data: dict, run_dir: Path, init_projector: str | None) -> dict:
    """The plain-dict config every worker of stage ``n`` receives."""
    t, s = cfg.train, cfg.train[f"stage{n}"]
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    ev = t.data.eval
    run_eval = bool(s.get("eval")) and bool(data["eval"]["json"])
    return {
        "stage": n, "stage_dir": str(run_dir / f"stage{n}"), "seed": int(t.seed),
        "model": {p: plain(cfg[p]) for p in PARTS}, "tiler": plain(_stage_tiler(cfg, n)),
        "plugins": {"block": list(cfg.plugins.get("block") or []), "autoload": cfg.plugins.get("autoload"),
                    "strict": bool(cfg.plugins.get("strict", False))},
        "data": {"json": data[f"stage{n}"]["json"], "image_root": data[f"stage{n}"]["image_root"],
                 "max_length": int(t.data.max_length), "system": t.data.get("system"),
                 "max_samples": t.data.get("max_samples"), "group_by_length": bool(t.data.group_by_length),
                 "cache_dir": _cache_dir(cfg, run_dir)},
        "packing": stage_packing(cfg, n), "max_seq": int(t.max_seq),
        "pack_longest_first": bool(t.get("pack_longest_first", True)),
        "eval_json": data["eval"]["json"] if run_eval else None,
        "eval_image_root": data["eval"]["image_root"], "eval_max_samples": ev.get("max_samples"),
        "eval_max_new_tokens": int(ev.max_new_tokens),
        "trainable": list(s.trainable),
        "optim": {**plain(t.optim), "lr": float(s.lr), "layer_decay": float(s.get("layer_decay", 1.0))},
        "steps": s.get("steps"), "epochs": s.get("epochs"),
        "micro_batch": int(s.micro_batch), "grad_accum": int(s.grad_accum),
        "deepspeed": plain(cfg.deepspeed), "checkpoint_every": int(t.checkpoint_every),
        "speed": {"compile": bool(t.get("compile", False)), "compile_mode": str(t.get("compile_mode") or "default"),
                  "loss_chunk_tokens": int(t.get("loss_chunk_tokens") or 0),
                  "sdpa_backend": str(t.get("sdpa_backend") or "auto"),
                  "fused_projections": bool(t.get("fused_projections", False)),
                  "attention": str(t.get("attention") or "auto"),
                  "activation_checkpointing": bool(t.get("activation_checkpointing", False)),
                  "encoder_tiles_per_batch": int(t.get("encoder_tiles_per_batch") or 0)},
        "init_projector": init_projector if n == 2 else None,
        "save_model": bool(t.save_model) and n == 2, "peak_tflops": t.get("peak_tflops"),
        "threads_per_worker": max(1, int(t.cpus_per_worker)),
        "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(sys.prefix) / "torch_extensions"),
    }


class StageLog:
    """Receives the rank-0 metrics of each step: loggers + metrics.jsonl + restart bookkeeping."""

    def __init__(self, ctx, stage: int, step_offset: int):
        self.ctx, self.stage, self.offset = ctx, stage, step_offset
        self.path = ctx.run_dir / "metrics.jsonl"
        self.steps: list[int] = []
        self.records: list[dict] = []
        self.resumes: list[int] = []

    def __call__(self, m: dict) -> None:
        if m.get("resumed_from_step") is not None and m["resumed_from_step"] not in self.resumes:
            self.resumes.append(m["resumed_from_step"])
        self.steps.append(m["step"])
        self.records.append(m)
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")
        keys = ("loss", "lr", "grad_norm", "tokens_per_s", "skipped", "mfu", "step_time_s")
        self.ctx.log_metrics({f"train/{k}": m[k] for k in keys if k in m} | {"train/stage": self.stage},
                             step=self.offset + m["step"])

    def mean(self, key: str) -> float | None:
        vals = [r[key] for r in self.records[1:] or self.records if r.get(key) == r.get(key)]  # skip NaN
        return sum(vals) / len(vals) if vals else None


def fit_stage(ctx, n: int, config: dict, step_offset: int) -> dict:
    """One TorchTrainer run; returns the stage's summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bluelm_v.jobs.train.loop import train_stage
    from bluelm_v.jobs.train.relay import MetricsPump

    t = ctx.cfg.train
    log = StageLog(ctx, n, step_offset)
    pump = MetricsPump(log)
    storage = Path(t.get("storage_path") or ctx.run_dir / "ray_results").resolve()
    resources = {"CPU": float(t.cpus_per_worker)} | ({"GPU": 1.0} if t.use_gpu else {})
    trainer = TorchTrainer(
        train_stage, train_loop_config={**config, "relay": pump.actor},
        scaling_config=ScalingConfig(num_workers=int(t.num_workers), use_gpu=bool(t.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"stage{n}", storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=int(t.checkpoints_to_keep)),
                             failure_config=FailureConfig(max_failures=int(t.max_failures))))
    try:
        result = trainer.fit()
    except Exception as exc:
        cause = config_error_in(exc)
        if cause is None:
            raise
        raise ConfigError(cause) from None      # a worker refused the config: one line, as in validate
    finally:
        pump.close()
    final = dict(result.metrics or {})
    ckpt_dir = Path(result.checkpoint.path)
    return {
        "checkpoint": str(ckpt_dir), "projector": str(ckpt_dir / "projector.safetensors"),
        "model": str(ckpt_dir / "model.safetensors") if (ckpt_dir / "model.safetensors").exists() else None,
        "steps": final.get("total_steps"), "final_loss": final.get("loss"),
        "first_loss": log.records[0]["loss"] if log.records else None,
        "tokens_per_s": log.mean("tokens_per_s"), "mfu": log.mean("mfu"), "peak_source": final.get("peak_source"),
        "restarts": len(log.resumes), "resumed_from_steps": log.resumes, "steps_logged": log.steps,
        "frozen_unchanged": final.get("frozen_unchanged"), "base_digest": final.get("base_digest"),
        "trainable_params": final.get("trainable_params"), "data": final.get("data"), "eval": final.get("eval"),
        "world_size": final.get("world_size"), "warmup_steps": final.get("warmup_steps"),
    }


def config_error_in(exc: BaseException) -> str | None:
    """The message of a bluelm-v ConfigError somewhere in ``exc``'s chain (Ray wraps a worker's
    exception in its own), else None."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError):
            original = getattr(e, "cause", None)
            return str(original if isinstance(original, ConfigError) else e).strip().splitlines()[-1]
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def run(ctx) -> dict:
    cfg = ctx.cfg
    stages = _stages(cfg)
    data = resolve_data(cfg, ctx.run_dir)
    init_projector = cfg.train.get("init_projector")
    summary: dict = {"stages_run": stages, "data": data, "stage1_projector": init_projector}
    offset = 0
    for n in stages:
        config = stage_config(cfg, n, data, ctx.run_dir, init_projector)
        res = fit_stage(ctx, n, config, offset)
        summary[f"stage{n}"] = res
        if n == 1:
            init_projector = summary["stage1_projector"] = res["projector"]
        offset += res["steps"] or 0
        write_json(ctx.run_dir / "train_progress.json", summary)   # partial results survive a later failure
    s1, s2 = summary.get("stage1"), summary.get("stage2")
    if s1:
        summary["frozen_unchanged"] = all((s1["frozen_unchanged"] or {}).values())
    if s1 and s2:
        summary["stage2_base_matches_stage1"] = s2["base_digest"] == s1["base_digest"]
    last_eval = next((summary[f"stage{n}"]["eval"] for n in reversed(stages) if summary[f"stage{n}"]["eval"]), None)
    if last_eval:
        summary["accuracy"] = last_eval["accuracy"]
        summary["accuracy_by"] = last_eval["by"]
    if "chance" in data:
        summary["chance_accuracy"] = data["chance"]
    summary["tokens_per_s"] = {f"stage{n}": summary[f"stage{n}"]["tokens_per_s"] for n in stages}
    summary["mfu"] = {f"stage{n}": summary[f"stage{n}"]["mfu"] for n in stages}
    summary["restarts"] = sum(summary[f"stage{n}"]["restarts"] for n in stages)
    from bluelm_v.checkpoint import export_train_checkpoint   # RUN_DIR/checkpoint: evaluate/generate checkpoint=DIR
    summary["checkpoint"] = export_train_checkpoint(cfg, summary, ctx.run_dir / "checkpoint")
    return summary
