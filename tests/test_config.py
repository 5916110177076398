"""Every experiment and every option of every config group (each folder under conf/) composes,
validates and is built: at its tiny size, or on the meta device where it is full-size. Each is
checked for what it is: its family's Protocol (bluelm_v.types), the shapes and dtypes of a
forward on tiny inputs, what a quantizer leaves on a model; a job option names a job module;
DeepSpeed parses every deepspeed option as the train job hands it over; ray.init accepts every
ray option as the cluster connector passes it. Importing the CLI and loading every plugin
imports none of torch, ray, transformers, deepspeed."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from importlib import resources

import pytest

from bluelm_v import FAMILIES
from bluelm_v.launch import WIRING, job_module, validate
from bluelm_v.plugin_manager import get
from bluelm_v.types import Crops, contract_problems

CONF = resources.files("bluelm_v.conf")
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(q.name.endswith(".yaml") for q in p.iterdir())
                and p.name != "experiment")
OPTIONS = [(g, p.name[:-5]) for g in GROUPS for p in sorted((CONF / g).iterdir(), key=lambda p: p.name)
           if p.name.endswith(".yaml")]
EXPERIMENTS = sorted(p.name[:-5] for p in (CONF / "experiment").iterdir() if p.name.endswith(".yaml"))
REGISTRY = get()[1]


def user_inputs(experiment, tmp_path):
    """Experiments that need the user's own data files: (overrides naming them, key that
    must be reported when they are missing)."""
    if experiment == "train":
        data = tmp_path / "llava.json"
        data.write_text("[]")
        return [f"train.data.stage{n}.{k}={data if k == 'json' else tmp_path}"
                for n in (1, 2) for k in ("json", "image_root")], "train.data.stage1.json"
    if experiment == "evaluate":
        questions = tmp_path / "questions.jsonl"
        questions.write_text('{"question_id": 1, "image": "a.png", "text": "What?", "answer": "x"}\n')
        return [f"dataset.path={questions}"], "dataset.path"
    return [], None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(compose, experiment, tmp_path):
    from bluelm_v.errors import ConfigError

    overrides, required_key = user_inputs(experiment, tmp_path)
    if required_key:  # without the user's data it fails before work, naming the key
        with pytest.raises(ConfigError, match=required_key):
            validate(compose([f"+experiment={experiment}"]), REGISTRY)
    cfg = compose([f"+experiment={experiment}", *overrides])
    assert cfg.job.name and cfg.description
    assert ("job", cfg.job.name) in OPTIONS, f"experiment {experiment} runs job {cfg.job.name}: no conf/job option"
    validate(cfg, REGISTRY)


def test_every_group_folder_is_checked_here():
    assert set(FAMILIES) <= set(GROUPS)
    assert set(GROUPS) == set(CHECKS), f"conf/ groups without a check here: {set(GROUPS) - set(CHECKS)}"


def compose_option(compose, group, option, base=()):
    """``group=option`` (``+group=option`` when the root config does not select the group)."""
    plus = "" if group in compose(list(base)) else "+"
    return compose([*base, f"{plus}{group}={option}"])


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_group_option_composes_builds_and_is_what_it_says(compose, group, option, tmp_path):
    CHECKS[group](compose, option, tmp_path)


# -- the component families ------------------------------------------------------------------
def build(compose, family, option, **wiring):
    """The option's node validated, then created (``wiring``: what the framework passes)."""
    node = compose_option(compose, family, option)[family]
    REGISTRY.validate_node(family, node, family, WIRING.get(family, ()))
    made = REGISTRY.create_from_config(family, node, family, **wiring)
    assert contract_problems(family, made) == []
    return made


def check_tiler(compose, option, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    t = build(compose, "tiler", option)
    ws, hs = np.array([1000, 384, 30, 4000]), np.array([500, 384, 900, 1000])
    ms, ns = t.select_many(ws, hs)
    assert ms.dtype.kind == "i" and ns.dtype.kind == "i" and ms.shape == ns.shape == (4,)
    assert [t.select(int(w), int(h)) for w, h in zip(ws, hs)] == list(zip(ms.tolist(), ns.tolist()))
    crops = np.asarray(t.num_crops(ms, ns))                     # vectorised, thumbnail counted
    assert crops.shape == (4,) and (crops >= ms * ns).all() and (crops <= ms * ns + 1).all()
    if getattr(t, "crops_for_encoder", True) is False:          # a sizes-and-tokens rule: no crops
        from bluelm_v.errors import InputError
        assert np.asarray(t.tokens(ws, hs)).shape == (4,)
        with pytest.raises(InputError, match="decides sizes and visual tokens only"):
            t.transform(Image.new("RGB", (200, 120)))
        return
    c = t.transform(Image.new("RGB", (200, 120), (10, 200, 30)))
    b = t.tile_size
    assert isinstance(c, Crops) and tuple(c.grid) == t.select(200, 120)
    assert tuple(c.pixels.shape) == (int(t.num_crops(*c.grid)), 3, b, b) == (c.n_crops, 3, b, b)
    assert c.pixels.dtype == torch.float32 and -1.0 <= float(c.pixels.min()) <= float(c.pixels.max()) <= 1.0


def check_encoder(compose, option, tmp_path):
    import torch

    node = compose_option(compose, "encoder", option).encoder
    full = node.preset != "tiny"                                # full-size: built on the meta device
    e = REGISTRY.create_from_config("encoder", {**node, "device": "meta"} if full else node, "encoder")
    assert contract_problems("encoder", e) == [] and isinstance(e, torch.nn.Module)
    b = e.image_size
    pixels = torch.zeros(3, 3, b, b, device="meta" if full else "cpu")
    with torch.no_grad():
        out = e(pixels, tiles_per_batch=2, pipelined=False)
    assert tuple(out.shape) == (3, e.num_tokens, e.hidden_size) and out.dtype == torch.float32
    assert (b, e.num_tokens, e.hidden_size) == {"so400m": (384, 729, 1152), "tiny": (384, 729, 64)}[node.preset]


def check_downsampler(compose, option, tmp_path):
    import torch

    d = build(compose, "downsampler", option, in_dim=64)
    with torch.no_grad():
        out = d(torch.randn(2, 729, 64))
    assert tuple(out.shape) == (2, d.out_tokens(729), d.out_dim) and out.dtype == torch.float32


def check_projector(compose, option, tmp_path):
    import torch

    p = build(compose, "projector", option, in_dim=256, out_dim=64)
    with torch.no_grad():
        out = p(torch.randn(5, 256))
    assert tuple(out.shape) == (5, 64) and out.dtype == torch.float32


def check_llm(compose, option, tmp_path):
    import torch

    node = compose_option(compose, "llm", option).llm
    meta = node.preset == "bluelm_3b_proxy"                     # 2.7B: built on the meta device
    llm = REGISTRY.create_from_config("llm", {**node, "device": "meta"} if meta else node, "llm")
    assert contract_problems("llm", llm) == []
    ids = torch.tensor([llm.tokenizer.encode("a cat")[:4] or [1]], device="meta" if meta else "cpu")   # [1,L]
    with torch.no_grad():
        emb = llm.embed(ids)                                    # [1,L,D]
        logits = llm.model(inputs_embeds=emb).logits            # [1,L,V]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[node.dtype]
    assert tuple(emb.shape) == (1, ids.shape[1], llm.hidden_size) and emb.dtype == dtype
    assert tuple(logits.shape) == (1, ids.shape[1], llm.model.config.vocab_size)
    assert llm.max_context >= 2048 and llm.eos_token_ids and all(isinstance(i, int) for i in llm.eos_token_ids)
    assert (llm.hidden_size, llm.model.config.num_hidden_layers) == \
        {"tiny": (64, 2), "bluelm_3b_proxy": (2304, 40), "smollm2_135m": (576, 30)}[node.preset]


def check_engine(compose, option, tmp_path):
    import torch

    from bluelm_v.errors import ConfigError
    from bluelm_v.plugins.engines import triton_unavailable

    node = compose_option(compose, "engine", option).engine
    reason = triton_unavailable() if option == "triton" else None
    if reason:                                                  # fails before any work, saying why
        with pytest.raises(ConfigError, match=f"engine: engine 'triton' cannot run on this machine: {reason}"):
            REGISTRY.validate_node("engine", node, "engine", WIRING["engine"])
        return
    llm = REGISTRY.llm.create("hf_causal", preset="tiny")
    eng = build(compose, "engine", option, model=llm.model)
    eng.begin(16)
    logits = eng.prefill(torch.randn(1, 7, 64) * 0.5, 4)        # [V]
    assert tuple(logits.shape) == (llm.model.config.vocab_size,) and logits.dtype == torch.float32
    tokens = eng.steps(int(logits.argmax()), 3)
    assert len(tokens) == 3 and all(isinstance(t, int) for t in tokens)
    assert eng.length == 10 and eng.cache_bytes > 0 and eng.name in ("hf", "fast", "triton")


# what each quantizer option leaves on a model (bluelm_v.plugins.quantizers.schemes.applied_settings)
QUANTIZER_MARKS = {"none": set(), "w8": {"w8"}, "w4": {"w4", "w8"}, "kv8": {"kv8"}, "a16": {"a16"},
                   "bluelm_mixed": {"w4", "w8", "a16", "kv8"}}


def check_quantizer(compose, option, tmp_path):
    import torch

    from bluelm_v.model import BlueLMV
    from bluelm_v.plugins.quantizers.schemes import applied_settings

    q = build(compose, "quantizer", option)
    model = BlueLMV.from_config(compose([]), REGISTRY)          # the tiny default model
    q.apply(model)
    assert set(applied_settings(model)) == QUANTIZER_MARKS[option]
    assert q.settings() and isinstance(q.describe(), dict)
    with torch.no_grad():
        tokens = model.encode_images(torch.zeros(1, 3, 384, 384))   # [T', D]
    assert tuple(tokens.shape) == (196, 64) and tokens.dtype == torch.float32


def check_backend(compose, option, tmp_path):
    cfg = compose_option(compose, "backend", option)
    b = build(compose, "backend", option)
    if type(b).__name__ != "SimulatedNpu":      # real devices: run by tests/test_backends.py
        return
    b.load(cfg, REGISTRY)                        # the paper's full-size model, read on the meta device
    m = b.run_case({"image": [768, 1536], "tiles_per_batch": 4, "prefill_chunk": 128, "prompt_tokens": 2048,
                    "decode_tokens": 8, "quantizer": {"name": "bluelm_mixed"}})
    crops = int(b.tiler.num_crops(*b.tiler.select(768, 1536)))
    assert m["crops"] == crops and m["visual_tokens"] == crops * 196
    assert all(m[k] > 0 for k in ("encode_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_memory_mb"))


# -- job, ray, deepspeed ----------------------------------------------------------------------
def check_job(compose, option, tmp_path):
    from bluelm_v.job import list_jobs

    cfg = compose_option(compose, "job", option)
    mod = job_module(cfg.job.name)
    assert callable(mod.run) and (mod.__doc__ or "").strip(), f"job {cfg.job.name}: run() and a docstring"
    assert option in {row["job"] for row in list_jobs()}, f"job={option}: no experiment runs it"


def check_ray(compose, option, tmp_path):
    """cluster.connect with this option: every call it makes to ray.init binds to ray.init's
    real signature (a stand-in module records the calls; no cluster is started)."""
    import types

    import ray

    from bluelm_v import cluster

    cfg = compose_option(compose, "ray", option)
    signature, calls = inspect.signature(ray.init), []

    def init(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        hidden = next(p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD)
        extra = [k for k in bound.arguments.get(hidden, {}) if not k.startswith("_")]   # only _options go there
        assert not extra, f"ray={option}: ray.init has no parameter(s) {extra}"
        calls.append(bound)

    stand_in = types.SimpleNamespace(init=init, is_initialized=lambda: False, cluster_resources=lambda: {"CPU": 1.0},
                                     shutdown=lambda: None)
    real = sys.modules["ray"]
    sys.modules["ray"] = stand_in
    try:
        cluster.connect(cfg.ray)
    finally:
        sys.modules["ray"] = real
    assert len(calls) == 1
    passed = calls[0].arguments
    if cfg.ray.address not in (None, "", "local"):
        assert passed.get("address") == cfg.ray.address
    if cfg.ray.get("num_cpus") is not None:
        assert passed.get("num_cpus") == cfg.ray.num_cpus


def check_deepspeed(compose, option, tmp_path):
    """The config the train job hands DeepSpeed (jobs/train: stage_config -> deepspeed_config)
    parses with DeepSpeed's own config classes (unknown keys are errors there)."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    from bluelm_v.jobs.train import stage_config
    from bluelm_v.jobs.train.loop import deepspeed_config

    cfg = compose_option(compose, "deepspeed", option, base=["+experiment=train_tiny"])
    assert int(cfg.deepspeed.zero_optimization.stage) in (0, 1, 2, 3)
    assert cfg.deepspeed.get("bf16", {}).get("enabled", "auto") in ("auto", True, False)
    none = {"json": None, "image_root": None}
    config = stage_config(cfg, 2, {"stage1": none, "stage2": none, "eval": none}, tmp_path, None)
    parsed = DeepSpeedConfig(deepspeed_config({**config, "world_size": 1}, torch.device("cpu")))
    assert parsed.zero_optimization_stage == int(cfg.deepspeed.zero_optimization.stage)
    assert parsed.train_micro_batch_size_per_gpu == config["micro_batch"]


CHECKS = {"tiler": check_tiler, "encoder": check_encoder, "downsampler": check_downsampler,
          "projector": check_projector, "llm": check_llm, "engine": check_engine, "quantizer": check_quantizer,
          "backend": check_backend, "job": check_job, "ray": check_ray, "deepspeed": check_deepspeed}


# -- the rest -----------------------------------------------------------------------------------
def test_unknown_component_in_config_fails_before_work(compose):
    from bluelm_v.errors import ConfigError

    cfg = compose(["+experiment=ablate_tiling", "tiler.name=relaxd"])
    with pytest.raises(ConfigError, match="tiler: no tiler named 'relaxd'"):
        validate(cfg, REGISTRY)


def test_cli_and_every_plugin_load_without_heavy_imports():
    code = ("import sys\n"
            "import bluelm_v.cli\n"
            "from bluelm_v import plugin_manager\n"
            "_, registry, report = plugin_manager.get()\n"
            "heavy = [m for m in ('torch', 'ray', 'transformers', 'deepspeed') if m in sys.modules]\n"
            "print(json.dumps({'heavy': heavy, 'rows': len(registry.rows()), 'loaded': len(report.loaded)}))\n")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["heavy"] == [] and result["rows"] >= len(FAMILIES) and result["loaded"] >= len(FAMILIES)
