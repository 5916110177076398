"""Quantisation accuracy: LLM perplexity per setting (fp32 .. w4+kv8+a16), encoder w8 cosine, sizes, speed.

    python -m bluelm_v.launch +experiment=quantize llm=smollm2_135m quantizer=bluelm_mixed
    python -m bluelm_v.launch +experiment=quantize llm=smollm2_135m quantizer=bluelm_mixed job.n_tokens=4096
    python -m bluelm_v.launch +experiment=quantize llm=tiny 'job.encoder_presets=[tiny]' job.n_tokens=256

Settings (``job.settings``; the same tokens for every one):
  fp32        the LLM as loaded (for smollm2_135m: the GGUF's Q4_1 weights dequantised to fp32)
  w8          INT8 per-channel weights, every Linear and the embedding table
  w4_g32/64/128   INT4 group-wise weights; embedding table + output head at the quantizer's
              embedding_bits (default INT8); a layer whose width the group size does not divide
              gets the next smaller group (``regrouped`` in the summary)
  w4_kv8      w4 at the quantizer's LLM group size + INT8 KV cache
  w4_kv8_a16  the same + INT16 activation fake-quantisation: the LLM part of ``bluelm_mixed``
The w4 group size / symmetry / embedding_bits of the last two come from the ``quantizer`` node
(bluelm_mixed's llm_* values, or w4's); w4_gXX use its symmetry and embedding_bits too.

Perplexity: ``job.n_tokens`` tokens of the Python standard library's pydoc topic texts (real
English, offline), non-overlapping windows of ``job.context`` tokens, each fed in
``job.chunk``-token pieces through the model's KV cache (so the INT8 cache is exercised).
Each quantised model is saved (safetensors, settings header), its size on disk recorded, and
re-loaded into a fresh model whose logits must equal the in-memory ones (``reload_exact``).
Speed: evaluation tokens/s and batch-1 greedy decode tokens/s (runtime engine).

Encoder: per-token cosine similarity of w8 (with the quantizer's vision activation dtype) vs
fp32 features on ``job.n_images`` real photos from scikit-image, per encoder preset.

Outputs: summary.json (perplexity mapping, n_tokens, sizes on disk, speed, encoder cosine),
results.json (the same, rewritten after every setting: partial results survive a crash).
"""
from __future__ import annotations

import shutil
import time

import torch
from omegaconf import OmegaConf

from bluelm_v.errors import ConfigError
from bluelm_v.job import write_json

# The top-level nodes this job reads (bluelm_v.launch refuses overrides of the others).
USES = ("encoder", "llm", "engine", "quantizer")

SETTINGS = ("fp32", "w8", "w4_g32", "w4_g64", "w4_g128", "w4_kv8", "w4_kv8_a16")


def validate(cfg, registry) -> None:
    job = cfg.job
    bad = [s for s in job.settings if s not in SETTINGS]
    if bad:
        raise ConfigError(f"job.settings: unknown {bad}; choose from {list(SETTINGS)}")
    if job.context < 2 or job.chunk < 1 or job.n_tokens < job.context:
        raise ConfigError(f"job.n_tokens: need n_tokens >= context >= 2 and chunk >= 1 "
                          f"(got {job.n_tokens}, {job.context}, {job.chunk})")
    for p in job.encoder_presets:
        registry.validate_node("encoder", {**OmegaConf.to_container(cfg.encoder), "preset": p}, "job.encoder_presets")


def base_w4(cfg) -> dict:
    """The LLM INT4 settings the quantizer node asks for (bluelm_mixed, w4, or the defaults)."""
    node = OmegaConf.to_container(cfg.quantizer, resolve=True)
    if node.get("name") == "bluelm_mixed":
        return {"group_size": node.get("llm_group_size", 64), "symmetric": node.get("llm_symmetric", False),
                "embedding_bits": node.get("llm_embedding_bits", 8), "vision_act_dtype": node.get("vision_act_dtype", "fp16"),
                "refine": node.get("llm_refine", 0)}
    if node.get("name") == "w4":
        return {"group_size": node.get("group_size", 64), "symmetric": node.get("symmetric", False),
                "embedding_bits": node.get("embedding_bits", 8), "vision_act_dtype": "fp16", "refine": node.get("refine", 0)}
    return {"group_size": 64, "symmetric": False, "embedding_bits": 8, "vision_act_dtype": "fp16", "refine": 0}


def make_quantizer(ctx, setting: str, base: dict):
    """The quantizer object for one setting (all built through the registry)."""
    q = ctx.registry.quantizer
    w4 = dict(targets=["llm"], symmetric=base["symmetric"], embedding_bits=base["embedding_bits"],
              on_bad_shape="smaller_group", refine=base.get("refine", 0))
    if setting == "fp32":
        return q.create("none")
    if setting == "w8":
        return q.create("w8", targets=["llm"], embeddings=True)
    if setting.startswith("w4_g"):
        return q.create("w4", group_size=int(setting[4:]), **w4)
    from bluelm_v.plugins.quantizers.schemes import Composite

    steps = [q.create("w4", group_size=base["group_size"], **w4), q.create("kv8", targets=["llm"])]
    if setting == "w4_kv8_a16":
        steps.append(q.create("a16", targets=["llm"]))
    return Composite(setting, steps)


def evaluate_setting(ctx, setting: str, base: dict, tokens: list[int], probe: torch.Tensor) -> dict:
    from bluelm_v.jobs.quantize import evaluate
    from bluelm_v.plugins.quantizers.schemes import weight_bytes

    job = ctx.cfg.job
    llm = ctx.create("llm")
    quantizer = make_quantizer(ctx, setting, base)
    t0 = time.perf_counter()
    quantizer.apply(llm)
    quant_s = time.perf_counter() - t0
    hf = llm.model
    row = {"setting": setting, "quantize_s": round(quant_s, 2), "weight_bytes": weight_bytes(hf)}
    row.update(evaluate.perplexity(hf, tokens, job.context, job.chunk))
    with torch.no_grad():
        logits = hf(input_ids=probe).logits
    ckpt = ctx.path("checkpoints") / setting
    saved = quantizer.save(llm, ckpt)
    row["bytes_on_disk"] = sum(v["bytes"] for v in saved.values())
    del llm, hf
    fresh = ctx.create("llm")
    quantizer_again = make_quantizer(ctx, setting, base)
    quantizer_again.load(fresh, ckpt)
    with torch.no_grad():
        row["reload_exact"] = bool(torch.equal(fresh.model(input_ids=probe).logits, logits))
    if not job.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    engine = ctx.registry.create_from_config("engine", ctx.cfg.engine, "engine", model=fresh.model)
    row.update(evaluate.decode_speed(engine, fresh.model.get_input_embeddings(), tokens[: job.decode_prompt],
                                     job.decode_tokens))
    row["quantizer"] = quantizer.describe()
    return row


def encoder_cosine(ctx, base: dict) -> dict:
    from bluelm_v.jobs.quantize import evaluate

    job = ctx.cfg.job
    pixels, names = evaluate.sample_images(job.n_images)                          # [n, 3, 384, 384]
    out = {"images": names, "act_dtype": base["vision_act_dtype"]}
    for preset in job.encoder_presets:
        node = {**OmegaConf.to_container(ctx.cfg.encoder, resolve=True), "preset": preset}
        enc = ctx.create("encoder", node, "encoder").eval()
        with torch.no_grad():
            ref = enc(pixels)                                                     # [n, 729, C]
            t0 = time.perf_counter()
            q = ctx.registry.quantizer.create("w8", targets=["all"], act_dtype=base["vision_act_dtype"])
            q.apply(enc)
            test = enc(pixels)
        out[preset] = {**evaluate.feature_cosine(ref, test), "quantize_and_encode_s": round(time.perf_counter() - t0, 2)}
        del enc, ref, test
    return out


def _count_regrouped(node) -> int:
    """Layers that got a smaller group than asked, anywhere in a describe() tree."""
    if isinstance(node, dict):
        return sum(len(v) if k == "regrouped" else _count_regrouped(v) for k, v in node.items())
    return 0


def run(ctx) -> dict:
    from bluelm_v.jobs.quantize import evaluate

    job = ctx.cfg.job
    if job.threads:
        torch.set_num_threads(int(job.threads))
    base = base_w4(ctx.cfg)
    tokenizer = ctx.create("llm").tokenizer
    tokens = evaluate.offline_text_tokens(tokenizer, job.n_tokens)
    probe = torch.tensor([tokens[:64]])
    results = {"text": evaluate.TEXT_SOURCE, "n_tokens": len(tokens), "context": job.context,
               "chunk": job.chunk, "threads": torch.get_num_threads(), "base_w4": base,
               "perplexity": {}, "rows": {}}
    for setting in ctx.progress(list(job.settings), desc="settings"):
        row = evaluate_setting(ctx, setting, base, tokens, probe)
        results["rows"][setting] = row
        results["perplexity"][setting] = row["perplexity"]
        ctx.log_metrics({f"perplexity/{setting}": row["perplexity"]})
        write_json(ctx.path("results.json"), results)
    if job.encoder_presets:
        results["encoder_cosine"] = encoder_cosine(ctx, base)
        write_json(ctx.path("results.json"), results)
    rows = results["rows"]
    ref = results["perplexity"].get("fp32")
    return {
        "perplexity": results["perplexity"],
        "perplexity_vs_fp32_pct": {k: 100.0 * (v / ref - 1.0) for k, v in results["perplexity"].items()} if ref else {},
        "n_tokens": len(tokens),
        "text": results["text"],
        "bytes_on_disk": {k: r["bytes_on_disk"] for k, r in rows.items()},
        "weight_bytes": {k: r["weight_bytes"]["total"] for k, r in rows.items()},
        "speed": {k: {"eval_tokens_per_s": round(r["tokens_per_s"], 1),
                      "decode_tokens_per_s": round(r["decode_tokens_per_s"], 1),
                      "engine": r["engine"], "kv_cache": r["kv_cache"]} for k, r in rows.items()},
        "reload_exact": {k: r["reload_exact"] for k, r in rows.items()},
        "regrouped_layers": {k: _count_regrouped(r["quantizer"]) for k, r in rows.items()},
        "encoder_cosine": results.get("encoder_cosine", {}),
        "threads": results["threads"],
    }
