"""Tiler ablation (the paper's Table 2): train the same model once per tiler, evaluate each, and
read accuracy beside visual tokens, training speed and phone seconds (docs/design.md §6).

    python -m bluelm_v.launch +experiment=tiler_ablation_tiny ray.num_cpus=4            # CPU smoke run
    python -m bluelm_v.launch +experiment=tiler_ablation                                 # GPUs: one per tiler run
    python -m bluelm_v.launch +experiment=tiler_ablation 'ablation.tilers=[relaxed,single]' dataset.root=DIR
    python -m bluelm_v.launch +experiment=tiler_ablation hydra.run.dir=RUN              # again: resumes

Data: a fine_print benchmark (bluelm_v/data/fine_print.py; ``dataset.root``, default generated
into RUN_DIR/data with ``dataset.generate``): stage 1 on its train captions, stage 2 on its train
conversations, the evaluation on its test split (``dataset.format``: jsonl short answers or tsv
multiple choice).

Per tiler of ``ablation.tilers`` (conf/tiler/NAME.yaml, else the factory's defaults, then
``ablation.overrides.NAME``; tile size = the encoder's): the train job (conf/job/train.yaml +
``ablation.train``) then the evaluate job (conf/job/evaluate.yaml + ``ablation.evaluate``) on
the train run's checkpoint, both composed through ``bluelm_v.launch.run`` inside one Ray task
per tiler. Every run has the same seed (same initial weights), the same steps and the same
data order (sequence packing and length grouping are off: both order samples by their token
counts, which differ per tiler); stage 1 uses one fixed ``single`` crop for all. Tiler runs go ``ablation.parallel`` at
a time (default: as many as the cluster's GPUs or CPUs hold), queued beyond that. Resuming: a
tiler whose train run finished keeps it, one whose evaluation finished keeps that too, and a
half-done evaluation keeps its finished shards.

Phone seconds: the ``ablation.phone.backend`` device (default the simulated Dimensity 9300,
costing the paper's model: SigLIP-400M + the 2.7B LLM) through its public load(cfg, registry) /
run_case(case): encode + prefill per test image at the tiler's grid, default tiles per batch and
prefill chunk. Outputs: RUN_DIR/runs/NAME/{train,evaluate}/, results.json, report.md, and
accuracy_vs_tokens.png.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from bluelm_v.errors import BlueLMVError, ConfigError
from bluelm_v.job import write_json

USES = ("encoder", "downsampler", "projector", "llm", "engine", "quantizer")   # the tilers: ablation.tilers
# checked by validate(): tiler parameters against each factory, ablation.train / ablation.evaluate
# against the keys the train and evaluate jobs declare
OPEN_NODES = ("ablation.overrides", "ablation.train", "ablation.evaluate")
SHARED = (*USES, "ray", "plugins", "logging", "seed", "images")
FORMATS = ("jsonl", "tsv")


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if hasattr(node, "_metadata") else node


def tile_size(cfg) -> int:
    """The encoder's tile size (its image_size setting, else its preset's 384)."""
    return int(cfg.encoder.get("image_size") or 384)


def tiler_node(cfg, name: str) -> dict:
    """conf/tiler/NAME.yaml (when the package has one for that name), ablation.overrides.NAME,
    and the encoder's tile size."""
    from importlib import resources

    import yaml

    node = {"name": name}
    conf = resources.files("bluelm_v.conf") / "tiler" / f"{name}.yaml"
    if conf.is_file():
        data = yaml.safe_load(conf.read_text()) or {}
        if data.get("name", name) == name:
            node.update(data)
    node.update((_plain(cfg.ablation.get("overrides")) or {}).get(name) or {})
    node["tile_size"] = tile_size(cfg)
    return node


def validate(cfg, registry) -> None:
    ab, ds = cfg.get("ablation"), cfg.get("dataset")
    if ab is None or ds is None:
        raise ConfigError("ablation: the tiler_ablation job needs `ablation` and `dataset` (conf/job/tiler_ablation.yaml)")
    names = list(_plain(ab.get("tilers")) or [])
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"ablation.tilers: a list of distinct tiler names, got {names!r}")
    stray = sorted(set((_plain(ab.get("overrides")) or {})) - set(names))
    if stray:
        raise ConfigError(f"ablation.overrides.{stray[0]}: not one of ablation.tilers {names}")
    for i, name in enumerate(names):
        registry.validate_node("tiler", tiler_node(cfg, name), f"ablation.tilers[{i}] ({name})")
    if ds.get("format") not in FORMATS:
        raise ConfigError(f"dataset.format: {ds.get('format')!r} must be one of {FORMATS}")
    if ds.get("root") and not (Path(ds.root) / "meta.json").is_file():
        raise ConfigError(f"dataset.root: {ds.root!r} holds no fine_print benchmark (no meta.json); "
                          f"make one with python -m bluelm_v.data.fine_print DIR")
    if ab.get("parallel") is not None and (not isinstance(ab.parallel, int) or ab.parallel < 1):
        raise ConfigError(f"ablation.parallel: null or a positive integer, got {ab.parallel!r}")
    registry.validate_node("backend", ab.phone.backend, "ablation.phone.backend")
    from bluelm_v.compose import unknown_key_error
    from bluelm_v.launch import validate as validate_job

    for job in ("train", "evaluate"):      # only keys the child jobs declare
        line = unknown_key_error({"ablation": {job: _plain(ab.get(job)) or {}}},
                                 {"ablation": {job: _plain(compose([f"job={job}"])[job])}})
        if line:
            raise ConfigError(line)
    train, _ = child_configs(cfg, names[0], {"stage1": "-", "stage2": "-", "image_root": "-", "test": "-"}, Path("."))
    try:                                   # the per-tiler train config, its data paths aside
        validate_job(OmegaConf.merge(train, {"train": {"data": {"source": "shapes"}}}), registry)
    except ConfigError as exc:
        raise ConfigError(f"ablation.train (the per-tiler train job's config): {exc}") from None


# -- composing the per-tiler jobs ----------------------------------------------------------------
def compose(overrides: list[str]):
    """The root config with these overrides: inside the launcher's Hydra app through its
    initialised search path, elsewhere (Ray tasks, scripts) through bluelm_v.compose."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        from hydra import compose as hydra_compose
        cfg = hydra_compose(config_name="config", overrides=overrides)
    else:
        from bluelm_v.compose import compose as compose_root
        cfg = compose_root(overrides)
    OmegaConf.set_struct(cfg, False)                   # the experiment's nodes are merged over it
    return cfg


def child_configs(cfg, name: str, data: dict, run_dir: Path):
    """(train config, evaluate config) of one tiler's runs: the jobs' own defaults, this
    experiment's shared nodes, then ``ablation.train`` / ``ablation.evaluate``."""
    shared = {k: _plain(cfg[k]) for k in SHARED if cfg.get(k) is not None}
    tiler = tiler_node(cfg, name)
    train = compose(["job=train"])
    train = OmegaConf.merge(train, shared, {"tiler": tiler}, {"train": _plain(cfg.ablation.get("train")) or {}}, {"train": {
        "stage": "both", "packing": False,             # packing and length grouping order data by length
        "data": {"source": "llava", "group_by_length": False,
                 "stage1": {"json": data["stage1"], "image_root": data["image_root"]},
                 "stage2": {"json": data["stage2"], "image_root": data["image_root"]},
                 "eval": {"json": None}},
        "stage1": {"tiler": {"name": "single", "tile_size": tile_size(cfg), "mode": "squash"}},
        "stage2": {"tiler": None, "eval": False}}})
    train.tiler = OmegaConf.create(tiler)              # a node of another tiler's keys: replaced, not merged
    evaluate = compose(["job=evaluate"])
    evaluate = OmegaConf.merge(evaluate, shared, {"evaluate": _plain(cfg.ablation.get("evaluate")) or {}}, {
        "checkpoint": str(run_dir / "train" / "checkpoint"),
        "dataset": {"path": data["test"], "image_root": data["image_root"]}})
    return train, evaluate


def benchmark_data(cfg, run_dir: Path) -> dict:
    from bluelm_v.data.fine_print import generate

    ds = cfg.dataset
    root = Path(ds.get("root") or run_dir / "data")
    if ds.get("root"):
        paths = json.loads((root / "meta.json").read_text())["paths"]
    else:
        gen = dict(_plain(ds.generate))
        gen["view"] = gen.get("view") or tile_size(cfg)
        paths = generate(root, **gen)
    return {"stage1": paths["train"]["stage1"], "stage2": paths["train"]["stage2"], "image_root": paths["image_root"],
            "test": paths["test"][ds.format], "scenes": str(root / "scenes.jsonl"), "meta": str(root / "meta.json")}


# -- one tiler (a Ray task) ----------------------------------------------------------------------
def finished(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "ok" else None


def run_tiler(name: str, train_cfg: dict, eval_cfg: dict, run_dir: str, phone: dict, sizes: list) -> dict:
    """Train (unless done), evaluate (unless done), price on the phone; returns the row."""
    from bluelm_v import launch

    run_dir = Path(run_dir)
    train = finished(run_dir / "train")
    if train is None or not train.get("checkpoint"):
        train = launch.run(OmegaConf.create(train_cfg), run_dir / "train")
    if not train.get("checkpoint"):
        raise ConfigError(f"ablation: the {name} train run kept no checkpoint (train.save_model must be true)")
    evaluation = finished(run_dir / "evaluate") or launch.run(OmegaConf.create(eval_cfg), run_dir / "evaluate")
    return {"tiler": name, "train": train, "evaluate": evaluation,
            "phone": phone_seconds(train_cfg["tiler"], phone, sizes)}


def phone_seconds(tiler: dict, phone: dict, sizes: list) -> dict:
    """Mean encode + prefill seconds per image on ``phone['backend']`` at this tiler's grids."""
    from bluelm_v.plugin_manager import get

    _, registry, _ = get()
    backend = registry.create_from_config("backend", phone["backend"], "ablation.phone.backend")
    backend.load({"tiler": tiler}, registry)
    base = {"tiles_per_batch": int(phone["tiles_per_batch"]), "prefill_chunk": int(phone["prefill_chunk"]),
            "decode_tokens": 1, "quantizer": None}
    totals = {"encode_s": 0.0, "prefill_s": 0.0, "visual_tokens": 0.0}
    for w, h in sizes:
        first = backend.run_case({**base, "image": [int(w), int(h)], "prompt_tokens": 0})
        out = backend.run_case({**base, "image": [int(w), int(h)],
                                "prompt_tokens": int(first["visual_tokens"]) + int(phone["text_tokens"])})
        for k in totals:
            totals[k] += float(out[k])
    n = max(1, len(sizes))
    if hasattr(backend, "close"):
        backend.close()
    return {"seconds_per_image": (totals["encode_s"] + totals["prefill_s"]) / n, "encode_s": totals["encode_s"] / n,
            "prefill_s": totals["prefill_s"] / n, "visual_tokens": totals["visual_tokens"] / n, "images": len(sizes),
            "device": phone["backend"]}


def parallel_runs(ab, train_cfg) -> int:
    import ray

    if ab.get("parallel"):
        return int(ab.parallel)
    res = ray.cluster_resources()
    t = train_cfg.train
    if t.use_gpu:
        return max(1, int(res.get("GPU", 0) // int(t.num_workers)))
    return max(1, int(res.get("CPU", 1) // (int(t.num_workers) * float(t.cpus_per_worker))))


def run(ctx) -> dict:
    import ray

    from bluelm_v.jobs.tiler_ablation import report

    cfg, run_dir = ctx.cfg, ctx.run_dir
    names = list(_plain(cfg.ablation.tilers))
    data = benchmark_data(cfg, run_dir)
    scenes = [json.loads(line) for line in Path(data["scenes"]).read_text().splitlines()]
    sizes = [(s["width"], s["height"]) for s in scenes if s["image"].startswith("images/test/")]
    sizes = sizes[: int(cfg.ablation.phone.max_images)]
    phone = _plain(cfg.ablation.phone)
    jobs = {n: child_configs(cfg, n, data, run_dir / "runs" / n) for n in names}
    width = parallel_runs(cfg.ablation, jobs[names[0]][0])
    print(f"tiler_ablation: {len(names)} tilers, {width} at a time; runs in {run_dir / 'runs'}")
    task = ray.remote(num_cpus=0)(run_tiler)
    queue, inflight, rows = list(names), {}, {}
    bar = ctx.progress(total=len(names), desc="tilers", unit="tiler")
    while queue or inflight:
        while queue and len(inflight) < width:
            n = queue.pop(0)
            train_cfg, eval_cfg = (OmegaConf.to_container(c, resolve=True) for c in jobs[n])
            inflight[task.remote(n, train_cfg, eval_cfg, str(run_dir / "runs" / n), phone, sizes)] = n
        done, _ = ray.wait(list(inflight), num_returns=1)
        name = inflight.pop(done[0])
        try:
            rows[name] = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:     # a user error inside a tiler's run: one line
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, BlueLMVError) else exc) from None
        write_json(run_dir / "results.json", rows)            # partial results survive a later failure
        bar.update(1)
    bar.close()
    table = report.table([rows[n] for n in names])
    meta = json.loads(Path(data["meta"]).read_text())
    paths = report.write(run_dir, table, meta, cfg)
    ctx.log_images({k: v for k, v in paths.items() if k.endswith("png")})
    return {"tilers": names, "table": table, "chance": meta["chance"], "data": data, **paths}
