"""One training stage inside a Ray Train worker: build the model, wrap it with DeepSpeed, train,
checkpoint through Ray Train, evaluate, export. ``jobs/train/`` passes ``train_stage`` to
``TorchTrainer`` with a plain-dict config (built by ``jobs.train.stage_config``).

Restarts: Ray Train calls this again after a worker failure; ``ray.train.get_checkpoint()``
then holds the last reported DeepSpeed checkpoint (every rank's ZeRO partition merged into one
directory) and training continues at the step stored in it, on the same data order.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from bluelm_v.errors import ConfigError


def _setup_env(config: dict) -> None:
    # Before deepspeed is imported: its CPU comm op is compiled once into this cache.
    if config.get("torch_extensions_dir"):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", config["torch_extensions_dir"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(config: dict, registry, device):
    """The BlueLMV of the config's component nodes, seeded so every rank (and both stages) start
    from the same weights; the stage-1 connector is loaded when ``init_projector`` is set."""
    import torch

    from bluelm_v.model import BlueLMV

    torch.manual_seed(int(config["seed"]))
    model = BlueLMV.from_config(config["model"], registry)
    if config.get("init_projector"):
        from safetensors.torch import load_file

        state = load_file(config["init_projector"])
        for part in ("projector", "downsampler"):
            sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
            if sub or any(True for _ in getattr(model, part).parameters()):
                getattr(model, part).load_state_dict(sub, strict=True)
    return model.to(device)


def eager_if(flag: bool):
    """A context running compiled modules eagerly when ``flag`` (no recompiles per new shape)."""
    import contextlib

    import torch

    return torch.compiler.set_stance("force_eager") if flag else contextlib.nullcontext()


def gathered_state(engine, module) -> dict:
    """A CPU copy of ``module``'s state (ZeRO-3 partitions gathered first; collective)."""
    import deepspeed

    params = list(module.parameters())
    if engine is not None and engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def digests(engine, model, parts) -> dict:
    from bluelm_v.jobs.train.optim import state_digest

    class _Holder:  # state_digest reads .state_dict()
        def __init__(self, state):
            self._s = state

        def state_dict(self):
            return self._s

    return {p: state_digest(_Holder(gathered_state(engine, getattr(model, p)))) for p in parts}


def deepspeed_config(config: dict, device) -> dict:
    import torch

    ds = dict(config["deepspeed"])
    ds["train_micro_batch_size_per_gpu"] = int(config["micro_batch"])
    ds["gradient_accumulation_steps"] = int(config["grad_accum"])
    ds["train_batch_size"] = int(config["micro_batch"]) * int(config["grad_accum"]) * int(config["world_size"])
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    if bf16 == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(bf16)}
    opt = config["optim"]
    params = {"lr": opt["lr"], "betas": list(opt["betas"]), "eps": opt["eps"],
              "weight_decay": opt["weight_decay"], "torch_adam": bool(opt.get("torch_adam", True))}
    if params["torch_adam"] and device.type == "cuda" and opt.get("fused", True):
        params["fused"] = True
    ds["optimizer"] = {"type": "AdamW", "params": params}
    return ds


def zero3_speed(config: dict, rank: int) -> dict:
    """The stage's speed options, less those ZeRO-3 cannot run: the chunked loss and the fused
    projections read weights outside their modules' own forward, where ZeRO-3 never gathers them
    (packing itself works: the training decoder then calls every projection module)."""
    speed = dict(config.get("speed") or {})
    if config["deepspeed"].get("zero_optimization", {}).get("stage") != 3:
        return speed
    for key, what in (("loss_chunk_tokens", "the LM head weight"), ("fused_projections", "the q/k/v and gate/up weights")):
        if speed.get(key):
            if rank == 0:
                print(f"bluelm-v: warning: train.{key} is ignored under ZeRO-3 ({what} stay partitioned outside "
                      "their modules)", file=sys.stderr, flush=True)
            speed[key] = 0 if key == "loss_chunk_tokens" else False
    return speed


def dataset_rank0_first(config: dict, tiler, tok, tokens_per_crop: int, rank: int, dist):
    """The stage's LlavaDataset; rank 0 scans (and fills the length cache) while the others wait,
    then they read the cache."""
    from bluelm_v.data.llava import LlavaDataset

    data = config["data"]

    def build():
        return LlavaDataset(data["json"], data["image_root"], tiler, tok, tokens_per_crop,
                            max_length=data["max_length"], system=data.get("system"),
                            max_samples=data.get("max_samples"), cache_dir=data.get("cache_dir"))

    ds = build() if rank == 0 else None
    dist.barrier()
    return ds if ds is not None else build()


def batch_plan(config: dict, lengths, world: int, rank: int):
    """PackedPlan (rows of train.max_seq tokens) or LengthGroupedPlan (one sample a row)."""
    from bluelm_v.jobs.train.data import LengthGroupedPlan
    from bluelm_v.jobs.train.packing import PackedPlan

    micro, seed = int(config["micro_batch"]), int(config["seed"])
    if config.get("packing"):
        return PackedPlan(lengths, int(config["max_seq"]), micro, world, rank, seed=seed,
                          longest_first=bool(config.get("pack_longest_first", True)))
    return LengthGroupedPlan(lengths, micro, world, rank, seed=seed,
                             group_by_length=bool(config["data"].get("group_by_length", True)))


def micro_batch(ds, rows: list[list[int]], pad_id: int, config: dict, tokens_per_crop: int) -> dict:
    """The loaded, collated micro-batch of ``rows`` (sample indices) + ``computed_tokens`` (the
    LLM positions the step runs, padding included)."""
    from bluelm_v.jobs.train.data import collate
    from bluelm_v.jobs.train.packing import collate_packed

    if config.get("packing"):
        max_seq = int(config["max_seq"])
        # a sample whose image fails to decode is replaced by one no longer: the row still fits
        batch = collate_packed([[ds.get(i, fits=ds.lengths[i]) for i in row] for row in rows], pad_id,
                               max_seq, tokens_per_crop)
        batch["computed_tokens"] = len(rows) * max_seq
        return batch
    batch = collate([ds[i] for row in rows for i in row], pad_id)
    batch["computed_tokens"] = len(batch["lengths"]) * max(batch["lengths"])
    return batch


def step_inputs(batch: dict) -> dict:
    """The TrainStep keyword arguments of a collated batch."""
    keys = ("input_ids", "attention_mask", "labels", "images") + (("doc_lens",) if "doc_lens" in batch else ())
    return {k: batch[k] for k in keys}


def train_stage(config: dict) -> None:
    """Ray Train's train_loop_per_worker for one stage."""
    _setup_env(config)
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device

    from bluelm_v.data.llava import load_records
    from bluelm_v.plugin_manager import get as get_plugins
    from bluelm_v.jobs.train.evaluate import evaluate
    from bluelm_v.jobs.train.flops import StepFlops, device_peak_flops, full_numel
    from bluelm_v.jobs.train.optim import (build_param_groups, freeze_except, lr_multiplier, set_lr,
                                         warmup_steps_for)
    from bluelm_v.jobs.train.speed import apply_speed_options

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    stage_dir = Path(config["stage_dir"])
    (stage_dir / "pids").mkdir(parents=True, exist_ok=True)
    (stage_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(int(config["threads_per_worker"]))
    relay = config.get("relay")

    _, registry, _ = get_plugins(**config["plugins"])
    model = build_model(config, registry, device)
    tiler = registry.create_from_config("tiler", config["tiler"], "train.tiler")
    trainable = list(config["trainable"])
    frozen = [p for p in ("encoder", "llm") if p not in trainable]
    freeze_except(model, trainable)
    model.train()
    base_digest = digests(None, model, ("encoder", "llm"))      # before any optimizer step
    speed = zero3_speed(config, rank)
    packing = bool(config.get("packing"))
    speed.update(packing=packing, max_seq=int(config["max_seq"]))
    try:
        net = apply_speed_options(model, speed)                # TrainStep: BlueLMV + decoder + loss path
    except ValueError as exc:
        raise ConfigError(f"train.stage{config['stage']}: {exc}") from None
    opt = config["optim"]
    groups = build_param_groups(model, trainable, opt["lr"], opt["weight_decay"], opt.get("layer_decay", 1.0))
    scales = [g.pop("lr_scale") for g in groups]
    for g in groups:
        g.pop("name")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False)
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=groups,
                                           config=deepspeed_config({**config, "world_size": world}, device))

    tok = model.tokenizer
    data = config["data"]
    ds = dataset_rank0_first(config, tiler, tok, model.tokens_per_crop, rank, dist)
    micro, accum = int(config["micro_batch"]), int(config["grad_accum"])
    plan = batch_plan(config, ds.lengths, world, rank)
    batches_per_epoch = plan.steps_per_epoch // accum
    total = int(config["steps"]) if config.get("steps") else max(1, int(float(config["epochs"]) * batches_per_epoch))
    warmup = warmup_steps_for(total, float(opt["warmup_ratio"]))
    flops_of = StepFlops(model, trainable)
    peak, peak_src = device_peak_flops(device, config.get("peak_tflops"))

    start, resumed_from = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, load_optimizer_states=True, load_lr_scheduler_states=False)
        start = resumed_from = int(client["step"])

    def save_and_report(step: int, metrics: dict, extra=None) -> None:
        with tempfile.TemporaryDirectory(prefix=f"bluelm_v_ckpt_r{rank}_") as tmp:
            engine.save_checkpoint(tmp, tag=f"step{step:06d}", client_state={"step": step, "stage": config["stage"]})
            if extra is not None:
                extra(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_step{step:06d}")

    prescan_skipped = sum(ds.skipped.values())
    last = {}
    for step in range(start, total):
        lr = set_lr(engine.optimizer, float(opt["lr"]), scales,
                    lr_multiplier(step, total, warmup, float(opt.get("min_lr_ratio", 0.0))))
        t0 = time.perf_counter()
        loss_sum, tokens, computed, flops = torch.zeros((), dtype=torch.float64, device=device), 0, 0, 0.0
        for a in range(accum):
            batch = micro_batch(ds, plan.rows(step * accum + a), tok.pad_token_id, config, model.tokens_per_crop)
            # host tensors: TrainStep plans the image splice on the host and copies without syncs
            out = engine(**step_inputs(batch))
            engine.backward(out.loss)
            engine.step()
            loss_sum += out.loss.detach()                          # stays on the device: no sync per micro-step
            tokens += batch["llm_tokens"]
            computed += batch["computed_tokens"]
            flops += flops_of(batch["crops"], batch["lengths"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        runtime_skipped = sum(ds.skipped.values()) - prescan_skipped
        agg = torch.tensor([0.0, tokens, flops, runtime_skipped, dt, computed], dtype=torch.float64, device=device)
        agg[0] = loss_sum / accum
        dist.all_reduce(agg)
        grad_norm = engine.get_global_grad_norm()
        step_time = agg[4].item() / world
        last = {"stage": config["stage"], "step": step + 1, "loss": agg[0].item() / world, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": agg[1].item() / step_time, "step_time_s": step_time,
                "skipped": prescan_skipped + int(agg[3].item()),
                "mfu": agg[2].item() / step_time / (peak * world), "epoch": (step * accum) // plan.steps_per_epoch,
                "fill": agg[1].item() / max(1.0, agg[5].item()),
                "resumed_from_step": resumed_from}
        if rank == 0 and relay is not None:
            relay.push.remote(last)
        if (step + 1) % int(config["checkpoint_every"]) == 0 and step + 1 < total:
            save_and_report(step + 1, last)

    # -- after the last step: checks, evaluation, exports, the final checkpoint -------------
    final = dict(last, total_steps=total, warmup_steps=warmup, world_size=world, peak_flops=peak,
                 peak_source=peak_src, data=ds.summary(), resumed_from_step=resumed_from, packing=packing,
                 packed_fill=getattr(plan, "fill", None),
                 trainable_params={p: sum(full_numel(q) for q in getattr(model, p).parameters() if q.requires_grad)
                                   for p in ("encoder", "downsampler", "projector", "llm")})
    after = digests(engine, model, ("encoder", "llm"))
    final["base_digest"] = base_digest
    final["frozen_unchanged"] = {p: after[p] == base_digest[p] for p in frozen}
    if config.get("eval_json"):
        records = load_records(config["eval_json"])[: config.get("eval_max_samples") or None]
        with eager_if(bool(speed.get("compile"))):             # decoding changes shapes every token
            final["eval"] = evaluate(model, records, config["eval_image_root"], tiler, tok, rank, world,
                                     int(config["eval_max_new_tokens"]), device, system=data.get("system"))
    connector = {f"{p}.{k}": v for p in ("projector", "downsampler")
                 for k, v in gathered_state(engine, getattr(model, p)).items()}
    full = gathered_state(engine, model) if config.get("save_model") else None
    from bluelm_v.checkpoint import tied_names

    tied = tied_names(model)

    def export(path: Path) -> None:
        if rank != 0:
            return
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in connector.items()}, str(path / "projector.safetensors"))
        if full is not None:   # tied weights (LM head = embeddings) are stored once
            save_file({k: v.contiguous() for k, v in full.items() if k not in tied}, str(path / "model.safetensors"))

    save_and_report(total, {**final, "final": True}, extra=export)
