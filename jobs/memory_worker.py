"""The measured process of the memory job (jobs/memory.py runs it; not a job of its own).

    python -m bluelm_v.jobs.memory_worker RUN_DIR/config.yaml CHECKPOINT_DIR OUT.json

Loads the quantised pipeline (ViT + LLM together), encodes one image, releases the ViT,
prefills in chunks, decodes, and writes its own peak RSS and the RSS after every stage to OUT.json.
"""
from __future__ import annotations

import gc
import json
import resource
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        import os
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Stages:
    def __init__(self):
        self.t0, self.rows = time.perf_counter(), {}

    def mark(self, name: str) -> None:
        self.rows[name] = {"rss_mb": round(rss_mb(), 1), "peak_so_far_mb": round(peak_mb(), 1),
                           "t_s": round(time.perf_counter() - self.t0, 2)}


def prompt_of_length(gen, tokenizer, n_visual: int, total: int) -> list[int]:
    """Chat prompt ids with one image sentinel whose spliced length is exactly ``total``."""
    from bluelm_v.chat import IMAGE_TOKEN_ID

    ids = gen.prompt_ids("<image>\n", 1)
    base = len(ids) - 1 + n_visual
    if base > total:
        raise ValueError(f"job.prompt_tokens: {total} is less than the {base} positions of the image + template")
    at = ids.index(IMAGE_TOKEN_ID) + 1
    filler = tokenizer.encode("a")[:1] or [0]
    return ids[:at] + filler * (total - base) + ids[at:]


def main(config_path: str, ckpt: str, out_path: str) -> None:
    stages = Stages()
    stages.mark("python")
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from PIL import Image

    import transformers.models.llama.modeling_llama  # noqa: F401 -- import cost belongs to "imports"
    import transformers.models.siglip.modeling_siglip  # noqa: F401

    from bluelm_v import plugin_manager
    from bluelm_v.quant.kv_cache import kv_cache_nbytes
    from bluelm_v.quant.schemes import kv_cache_kind, weight_bytes
    from bluelm_v.quant.streaming import build_meta_model, materialize_remaining, release_module
    from bluelm_v.runtime import Generator

    cfg = OmegaConf.load(config_path)
    job = cfg.job
    if job.threads:
        torch.set_num_threads(int(job.threads))
    _, registry, _ = plugin_manager.from_config(cfg)
    torch.set_grad_enabled(False)
    torch.nn.functional.linear(torch.zeros(2, 8), torch.zeros(8, 8))   # MKL / thread pool start-up
    stages.mark("imports")

    model = build_meta_model(cfg, registry)
    quantizer = registry.create_from_config("quantizer", cfg.quantizer)
    quantizer.load(model, ckpt)                      # ViT + projector + LLM, read straight into place
    materialize_remaining(model)                     # rotary tables, position ids
    weights = {p: weight_bytes(getattr(model, p))["total"] for p in ("encoder", "downsampler", "projector", "llm")}
    stages.mark("loaded")

    w, h = (int(v) for v in job.image_size)
    if job.image:
        image = Image.open(job.image).convert("RGB")
    else:
        from skimage import data          # a real photo shipped by scikit-image
        image = Image.fromarray(data.astronaut())
    image = image.resize((w, h), Image.BICUBIC)
    crops = model.tiler.transform(image)
    kv_int8 = kv_cache_kind(model.llm.model) == "int8"
    gen = Generator(model, prefill_chunk=int(job.prefill_chunk), release_encoder=True, engine=job.engine)
    t = time.perf_counter()
    feats = gen.encode_image(crops.pixels).result()["features"]            # [K*196, D]
    encode_s = time.perf_counter() - t
    stages.mark("encoded")
    gen.release_encoder()
    release_module(model.encoder)
    release_module(model.projector)
    gc.collect()
    stages.mark("encoder_released")

    ids = prompt_of_length(gen, model.tokenizer, int(feats.shape[0]), int(job.prompt_tokens))
    embeds = gen.embed_prompt(ids, [feats])                                # [1, L, D]
    del feats
    eng = gen.engine
    max_len = embeds.shape[1] + int(job.decode_tokens) + 1
    eng.begin(max_len)                             # the engine allocates the INT8 cache when kv8 marked the LLM
    t = time.perf_counter()
    logits = eng.prefill(embeds, int(job.prefill_chunk))
    prefill_s = time.perf_counter() - t
    del embeds
    stages.mark("prefilled")
    tok = int(logits.argmax())
    t = time.perf_counter()
    for _ in range(int(job.decode_tokens)):
        tok = eng.step(tok)                        # every step, EOS or not: a fixed amount of work
    decode_s = time.perf_counter() - t
    stages.mark("decoded")
    cache = getattr(eng, "cache", None)
    kv_bytes = getattr(eng, "cache_bytes", 0) or (kv_cache_nbytes(cache) if cache is not None else 0)

    peak = peak_mb()
    rows = stages.rows
    at_peak = next(n for n, r in rows.items() if r["peak_so_far_mb"] >= peak - 0.5)
    runtime_mb = rows["imports"]["rss_mb"]
    llm_mb, vis_mb = weights["llm"] / 2**20, (weights["encoder"] + weights["projector"]) / 2**20
    kv_mb = kv_bytes / 2**20 if at_peak in ("prefilled", "decoded") else 0.0
    vis_at_peak = vis_mb if at_peak in ("loaded", "encoded") else 0.0
    breakdown = {"python_torch_transformers": round(runtime_mb, 1), "llm_weights": round(llm_mb, 1),
                 "vision_weights": round(vis_at_peak, 1), "kv_cache": round(kv_mb, 1),
                 "activations_and_allocator": round(peak - runtime_mb - llm_mb - vis_at_peak - kv_mb, 1),
                 "peak_reached_during": at_peak}
    out = {"peak_rss_mb": peak, "stages": rows, "breakdown": breakdown, "weight_bytes": weights,
           "kv_cache_bytes": kv_bytes, "kv_cache": type(cache).__name__, "kv8_marked": kv_int8, "engine": eng.name,
           "crops": int(crops.pixels.shape[0]), "grid": list(crops.grid), "prompt_tokens": len(ids) - 1 + int(
               crops.pixels.shape[0]) * model.tokens_per_crop, "visual_tokens": int(crops.pixels.shape[0]) * model.tokens_per_crop,
           "decode_tokens": int(job.decode_tokens), "threads": torch.get_num_threads(),
           "timings": {"encode_s": round(encode_s, 2), "prefill_s": round(prefill_s, 2), "decode_s": round(decode_s, 2),
                       "decode_tokens_per_s": round(int(job.decode_tokens) / max(decode_s, 1e-9), 2)},
           "numpy": np.__version__}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
