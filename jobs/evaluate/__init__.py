"""Evaluate: answer a question file with a model, score it as VLMEvalKit / lmms-eval do, report.

    python -m bluelm_v.launch +experiment=evaluate dataset.path=mmbench_dev.tsv checkpoint=RUN/checkpoint
    python -m bluelm_v.launch +experiment=evaluate dataset.path=DIR/test.jsonl checkpoint=RUN/checkpoint
    python -m bluelm_v.launch +experiment=evaluate dataset.path=q.jsonl dataset.image_root=IMAGES   # model from config
    python -m bluelm_v.launch +experiment=evaluate dataset.path=mmbench.tsv evaluate.circular=true
    python -m bluelm_v.launch +experiment=evaluate ... hydra.run.dir=RUN     # again: finished shards are kept

Inputs (bluelm_v/data/vqa.py): a VLMEvalKit TSV or an LLaVA / lmms-eval JSONL (format from the
extension); a TSV without a required column fails naming it. The model comes from a train
run's checkpoint directory (``checkpoint=RUN/checkpoint``: the weights and the config they were
trained with, tiler included; a checkpoint whose tensors do not fit its config fails naming
the tensor) or, without one, from the config's component nodes.

Work: the questions are cut into shards of ``evaluate.shard_size``; ``evaluate.workers`` Ray
actors (default: one per GPU, else one per ``evaluate.cpus_per_worker`` CPUs) each build the
model once and answer shards, ``evaluate.batch_size`` questions per ``generate_batch`` call.
Each finished shard is written to RUN_DIR/shards/ at once; a rerun of the same run directory
keeps finished shards (a different dataset, model or setting there is an error: use a new
run directory). Shards are merged in question order. Questions whose image is missing or does
not decode, or whose prompt does not fit the context, are counted by reason, never fatal.

Scoring (jobs/evaluate/scoring.py): option-letter extraction then unique option text for
multiple choice (``evaluate.circular``: every rotation of the options must be right),
normalised exact match, VQA soft accuracy for several references, ANLS (threshold 0.5).
Outputs: predictions.jsonl (one line per question: prompt, answer, prediction, score),
summary.json (n_questions, n_scored, skipped by reason, score with its 95% bootstrap interval,
by_category / by_l2_category, mean visual tokens, questions/s), report.md (+ scores.png and
rendered examples under examples/).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from bluelm_v.errors import BlueLMVError, ConfigError
from bluelm_v.job import to_jsonable, write_json

USES = ("tiler", "encoder", "downsampler", "projector", "llm", "engine", "quantizer")
MODEL_NODES = ("tiler", "encoder", "downsampler", "projector", "llm")
POSITIVE = ("batch_size", "shard_size", "max_new_tokens", "bootstrap", "cpus_per_worker")


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if hasattr(node, "_metadata") else node


def validate(cfg, registry) -> None:
    from bluelm_v.data.vqa import read_questions

    ds, ev = cfg.get("dataset"), cfg.get("evaluate")
    if ds is None or ev is None:
        raise ConfigError("evaluate: the evaluate job needs the `dataset` and `evaluate` nodes (conf/job/evaluate.yaml)")
    if not ds.get("path"):
        raise ConfigError("dataset.path: no question file; give a VLMEvalKit .tsv or a .jsonl (dataset.path=FILE)")
    if Path(ds.path).suffix.lower() not in (".tsv", ".jsonl"):
        raise ConfigError(f"dataset.path: {ds.path!r} must end in .tsv (VLMEvalKit) or .jsonl (LLaVA / lmms-eval)")
    if not Path(ds.path).is_file():
        raise ConfigError(f"dataset.path: no such file: {ds.path}")
    if ds.get("image_root") and not Path(ds.image_root).is_dir():
        raise ConfigError(f"dataset.image_root: {ds.image_root!r} is not a directory")
    for key in POSITIVE:
        v = ev.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"evaluate.{key}: a positive integer, got {v!r}")
    if ev.get("workers") is not None and (not isinstance(ev.workers, int) or ev.workers < 1):
        raise ConfigError(f"evaluate.workers: null (one per GPU / CPU slot) or a positive integer, got {ev.workers!r}")
    if str(ev.get("dtype", "auto")) not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"evaluate.dtype: {ev.dtype!r} must be auto, float32 or bfloat16")
    if cfg.get("checkpoint"):
        from bluelm_v.checkpoint import checkpoint_config

        nodes = checkpoint_config(cfg.checkpoint)
        for part in MODEL_NODES:
            registry.validate_node(part, nodes[part], f"checkpoint {cfg.checkpoint}: {part}",
                                   {"downsampler": ("in_dim",), "projector": ("in_dim", "out_dim")}.get(part, ()))
    elif cfg.get("tiler") is None:
        raise ConfigError("tiler: the model needs a tiler node (or checkpoint=DIR)")
    read_questions(ds.path, ds.get("image_root"))         # a bad file fails here, before Ray starts


def model_spec(cfg) -> dict:
    ev = cfg.evaluate
    return {"checkpoint": str(Path(cfg.checkpoint).resolve()) if cfg.get("checkpoint") else None,
            "nodes": None if cfg.get("checkpoint") else {p: _plain(cfg[p]) for p in MODEL_NODES},
            "quantizer": _plain(cfg.get("quantizer")), "engine": _plain(cfg.engine),
            "dtype": str(ev.get("dtype", "auto")), "system": ev.get("system"), "seed": int(cfg.seed)}


def fingerprint(cfg, spec: dict, n_questions: int) -> dict:
    """What makes two runs' shards interchangeable."""
    path = Path(cfg.dataset.path).resolve()
    ev = cfg.evaluate
    stamp = None
    if spec["checkpoint"]:
        info = Path(spec["checkpoint"]) / "checkpoint.json"
        stamp = hashlib.sha1(info.read_bytes()).hexdigest()[:16]
    return {"dataset": str(path), "dataset_bytes": path.stat().st_size, "dataset_mtime_ns": path.stat().st_mtime_ns,
            "questions": n_questions, "model": {**spec, "checkpoint_stamp": stamp},
            "settings": {k: _plain(ev.get(k)) for k in ("max_new_tokens", "circular", "shard_size", "max_questions")}}


class ShardStore:
    """RUN_DIR/shards: one JSONL file per finished shard (written whole, then renamed)."""

    def __init__(self, root: Path, key: dict):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        meta = root / "fingerprint.json"
        key = to_jsonable(key)
        if meta.exists() and json.loads(meta.read_text()) != key:
            old = json.loads(meta.read_text())
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise ConfigError(f"hydra.run.dir: {root.parent} holds shards of another evaluation (differs in: "
                              f"{', '.join(diff)}); use a new run directory")
        write_json(meta, key)

    def path(self, shard: int) -> Path:
        return self.root / f"shard_{shard:05d}.jsonl"

    def finished(self, shard: int, ids: list[str]) -> list[dict] | None:
        p = self.path(shard)
        if not p.exists():
            return None
        try:
            records = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
        return records if [r.get("id") for r in records] == ids else None

    def write(self, shard: int, records: list[dict]) -> None:
        tmp = self.path(shard).with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
        tmp.replace(self.path(shard))


def worker_count(ev, n_shards: int) -> tuple[int, bool]:
    """(actors, use_gpu): one per GPU when the cluster has GPUs (and use_gpu is not false),
    else one per cpus_per_worker CPUs; never more than there are shards."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    use_gpu = gpus > 0 if ev.get("use_gpu", "auto") == "auto" else bool(ev.use_gpu)
    slots = gpus if use_gpu else int(res.get("CPU", 1) // int(ev.cpus_per_worker))
    wanted = int(ev.workers) if ev.get("workers") else max(1, slots)
    return max(1, min(wanted, n_shards)), use_gpu


def answer_shards(ctx, pending: dict[int, list[dict]], spec: dict, store: ShardStore) -> dict:
    """Fan the pending shards out to Ray actors; each shard is stored as it finishes."""
    import ray

    from bluelm_v.jobs.evaluate.answer import ShardAnswerer

    ev = ctx.cfg.evaluate
    n_workers, use_gpu = worker_count(ev, len(pending))
    settings = {k: _plain(ev.get(k)) for k in ("batch_size", "max_new_tokens", "prefill_chunk", "tiles_per_batch")}
    settings["use_gpu"] = use_gpu
    plugins = {"block": list(ctx.cfg.plugins.get("block") or []), "autoload": ctx.cfg.plugins.get("autoload"),
               "strict": bool(ctx.cfg.plugins.get("strict", False))}
    remote = ray.remote(ShardAnswerer).options(num_cpus=int(ev.cpus_per_worker), num_gpus=1 if use_gpu else 0,
                                               max_restarts=1, max_task_retries=1)
    actors = [remote.remote(spec, settings, plugins, int(ev.cpus_per_worker)) for _ in range(n_workers)]
    try:
        loads = ray.get([a.load.remote() for a in actors])
    except ray.exceptions.RayTaskError as exc:        # e.g. a checkpoint that does not fit its config
        for a in actors:
            ray.kill(a)
        raise user_error(exc) from None
    queue = sorted(pending)
    inflight = {}
    bar = ctx.progress(total=sum(len(v) for v in pending.values()), desc="questions", unit="q")
    t0 = time.perf_counter()
    try:
        for actor in actors:
            if queue:
                k = queue.pop(0)
                inflight[actor.answer.remote(k, pending[k])] = actor
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(done[0])
            shard, records = ray.get(done[0])
            store.write(shard, records)
            bar.update(len(records))
            if queue:
                k = queue.pop(0)
                inflight[actor.answer.remote(k, pending[k])] = actor
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    return {"workers": n_workers, "use_gpu": use_gpu, "answer_wall_s": time.perf_counter() - t0, "loads": loads}


def user_error(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task failure (printed as one line), else the failure."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BlueLMVError) else exc


def run(ctx) -> dict:
    from bluelm_v.data.vqa import read_questions, reference_text
    from bluelm_v.jobs.evaluate import report, scoring

    cfg, ev = ctx.cfg, ctx.cfg.evaluate
    questions = read_questions(cfg.dataset.path, cfg.dataset.get("image_root"))[: ev.get("max_questions") or None]
    asked = [r for q in questions for r in scoring.rotations(q)] if ev.get("circular") else questions
    spec = model_spec(cfg)
    store = ShardStore(ctx.run_dir / "shards", fingerprint(cfg, spec, len(asked)))
    size = int(ev.shard_size)
    shards = {k: asked[a:a + size] for k, a in enumerate(range(0, len(asked), size))}
    done = {k: store.finished(k, [q["id"] for q in qs]) for k, qs in shards.items()}
    pending = {k: qs for k, qs in shards.items() if done[k] is None}
    print(f"evaluate: {len(asked)} questions in {len(shards)} shards, {len(shards) - len(pending)} already answered")
    info = answer_shards(ctx, pending, spec, store) if pending else {"workers": 0, "answer_wall_s": 0.0}

    by_id = {q["id"]: q for q in asked}
    records = []
    for k in sorted(shards):                               # merged in question order
        for rec in store.finished(k, [q["id"] for q in shards[k]]):
            q = by_id[rec["id"]]
            out = {"id": q["id"], "prompt": rec["prompt"], "answer": reference_text(q), "answers": q["answers"],
                   "prediction": rec.get("prediction"), "metric": q["metric"], "category": q.get("category"),
                   "l2_category": q.get("l2_category"), "images": [i.get("path") for i in q.get("images") or []],
                   "circular_group": q.get("circular_group"), "rotation": q.get("rotation")}
            if rec.get("skipped"):
                out.update(score=None, skipped=rec["skipped"], detail=rec.get("detail"))
            else:
                out.update(scoring.score_prediction(q, rec["prediction"]),
                           visual_tokens=rec.get("visual_tokens"), seconds=rec.get("seconds"))
            records.append(out)
    with (ctx.run_dir / "predictions.jsonl").open("w") as fh:
        fh.writelines(json.dumps(to_jsonable(r)) + "\n" for r in records)
    summary = summarise(records, ev, circular=bool(ev.get("circular")))
    answered = [r for r in records if r.get("seconds") is not None]
    summary.update(dataset=str(cfg.dataset.path), model={k: spec[k] for k in ("checkpoint", "dtype")},
                   shards=len(shards), shards_reused=len(shards) - len(pending), workers=info.get("workers"),
                   questions_per_s=(len(answered) / info["answer_wall_s"]) if pending and info["answer_wall_s"] else None,
                   predictions=str(ctx.run_dir / "predictions.jsonl"))
    summary["report"] = str(report.write(ctx.run_dir, records, summary, by_id, n_examples=int(ev.get("examples", 6))))
    ctx.log_metrics({"eval/score": summary["score"] or 0.0, "eval/n_scored": summary["n_scored"]})
    return summary


def summarise(records: list[dict], ev, circular: bool = False) -> dict:
    """The summary's score block: overall and per category, 95% bootstrap intervals, counts."""
    from collections import Counter

    from bluelm_v.jobs.evaluate import scoring

    skipped = Counter(r["skipped"] for r in records if r.get("skipped"))
    scored = [r for r in records if r.get("score") is not None]
    not_extracted = sum(1 for r in scored if r["metric"] == "choice" and r.get("extracted") is None)
    if circular:     # a question is scored only when all its rotations were asked
        groups = Counter(r["circular_group"] for r in records)
        asked = Counter(r["circular_group"] for r in scored)
        scored = scoring.circular_scores([r for r in scored if asked[r["circular_group"]] == groups[r["circular_group"]]])
    n_questions = len({r.get("circular_group") or r["id"] for r in records}) if circular else len(records)
    b, seed = int(ev.get("bootstrap", 1000)), int(ev.get("seed", 0))
    overall = scoring.summarise_scores(scored, b, seed)
    out = {"n_questions": n_questions, "n_scored": len(scored), "skipped": dict(skipped),
           "score": overall["score"], "score_ci95": overall["ci95"]}
    for key, field in (("by_category", "category"), ("by_l2_category", "l2_category"), ("by_metric", "metric")):
        names = sorted({r.get(field) for r in scored if r.get(field)})
        if names:
            out[key] = {n: scoring.summarise_scores([r for r in scored if r.get(field) == n], b, seed) for n in names}
    if any(r["metric"] == "choice" for r in scored):
        out["choice_not_extracted"] = not_extracted       # answers naming no single option (score 0)
    tokens = [r["visual_tokens"] for r in records if r.get("visual_tokens") is not None]
    out["mean_visual_tokens"] = sum(tokens) / len(tokens) if tokens else None
    return out
