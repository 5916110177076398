"""The measured process of the memory job (jobs/memory/ runs it; not a job of its own).

    python -m bluelm_v.jobs.memory.worker RUN_DIR/config.yaml CHECKPOINT_DIR OUT.json

``job.schedule: staged`` (the deployment order): load the ViT + projector, encode the image,
release them, only then load the LLM, prefill in chunks and decode, so the peak is the larger of
the two phases, not their sum. ``together``: ViT and LLM loaded up front (the naive order).
Writes its own peak RSS and the RSS after every stage to OUT.json. With ``implementation:
native`` parts (the memory experiment) this process never imports transformers.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time

VISION_PARTS = ("encoder", "downsampler", "projector")
HEAVY_MODULES = ("transformers", "torch._dynamo", "sympy", "scipy")   # each costs tens of MB resident


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def release_heap() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc malloc_trim)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_mb(model) -> dict:
    """MB of materialised (not meta, not released) parameters and buffers per model part."""
    out = {}
    for part in (*VISION_PARTS, "llm"):
        tensors = [*getattr(model, part).parameters(), *getattr(model, part).buffers()]
        out[part] = round(sum(t.numel() * t.element_size() for t in tensors if not t.is_meta) / 2**20, 3)
    return out


class Stages:
    def __init__(self):
        self.t0, self.rows, self.model = time.perf_counter(), {}, None

    def mark(self, name: str) -> None:
        self.rows[name] = {"rss_mb": round(rss_mb(), 1), "peak_so_far_mb": round(peak_mb(), 1),
                           "t_s": round(time.perf_counter() - self.t0, 2)}
        if self.model is not None:                  # which weights were in memory at this point
            self.rows[name]["resident_mb"] = resident_mb(self.model)
        row = self.rows[name]                       # progress for the parent (jobs/memory/)
        print(f"[memory] {name:16s} rss {row['rss_mb']:7.1f} MiB  peak {row['peak_so_far_mb']:7.1f} MiB  "
              f"t {row['t_s']:6.1f} s", flush=True)

    def peak_stage(self, peak: float) -> str:
        """The first stage whose peak-so-far reached the final peak (the peak happened in it)."""
        return next(n for n, r in self.rows.items() if r["peak_so_far_mb"] >= peak - 0.5)


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


def load_photo(path, size):
    """``path`` or scikit-image's astronaut photo (read as a file: importing skimage.data pulls
    in scipy, ~30 MB the measured process should not carry), resized to ``size`` (w, h)."""
    import importlib.util

    from PIL import Image

    from bluelm_v.data.image_sizes import open_image

    if not path:
        spec = importlib.util.find_spec("skimage")
        path = os.path.join(spec.submodule_search_locations[0], "data", "astronaut.png")
    return open_image(path, "job.image").convert("RGB").resize(tuple(size), Image.BICUBIC)


def main(config_path: str, ckpt: str, out_path: str) -> None:
    stages = Stages()
    stages.mark("python")
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from bluelm_v import plugin_manager
    from bluelm_v.plugins.quantizers.schemes import kv_cache_kind, weight_bytes
    from bluelm_v.nn.meta_build import build_meta_model, materialize_remaining, release_module
    from bluelm_v.runtime import Generator

    cfg = OmegaConf.load(config_path)
    job = cfg.job
    staged = job.get("schedule", "staged") == "staged"
    if job.threads:
        torch.set_num_threads(int(job.threads))
    _, registry, _ = plugin_manager.from_config(cfg)
    torch.set_grad_enabled(False)
    torch.nn.functional.linear(torch.zeros(2, 8), torch.zeros(8, 8))   # MKL / thread pool start-up
    stages.mark("imports")

    model = build_meta_model(cfg, registry)
    stages.model = model
    quantizer = registry.create_from_config("quantizer", cfg.quantizer)
    quantizer.prepare(model)                          # quantised structure, still on meta
    quantizer.load_parts(model, ckpt, VISION_PARTS if staged else None)
    for part in (VISION_PARTS if staged else (*VISION_PARTS, "llm")):
        materialize_remaining(getattr(model, part))   # position ids, rotary tables
    weights = {p: weight_bytes(getattr(model, p))["total"] for p in ("encoder", "downsampler", "projector", "llm")}
    stages.mark("vision_loaded" if staged else "loaded")

    crops = model.tiler.transform(load_photo(job.image, job.image_size))
    n_crops, grid = int(crops.pixels.shape[0]), list(crops.grid)
    t = time.perf_counter()
    feats = model.encode_images(crops.pixels)                               # [K*196, D]
    encode_s = time.perf_counter() - t
    del crops
    stages.mark("encoded")
    for part in VISION_PARTS:
        release_module(getattr(model, part))
    release_heap()
    stages.mark("vision_released")

    if staged:
        quantizer.load_parts(model, ckpt, ("llm",))
        materialize_remaining(model.llm)
        weights["llm"] = weight_bytes(model.llm)["total"]
        stages.mark("llm_loaded")
    gen = Generator(model, engine=cfg.engine, registry=registry, prefill_chunk=int(job.prefill_chunk))
    gen.encoder_released = True
    kv_int8 = kv_cache_kind(model.llm.model) == "int8"
    ids = prompt_of_length(gen, model.tokenizer, int(feats.shape[0]), int(job.prompt_tokens))
    embeds = gen.embed_prompt(ids, [feats])                                # [1, L, D]
    del feats
    eng = gen.engine
    eng.begin(embeds.shape[1] + int(job.decode_tokens) + 1)   # the INT8 cache when kv8 marked the LLM
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
    kv_bytes = int(getattr(eng, "cache_bytes", 0) or 0)

    peak = peak_mb()
    rows, at_peak = stages.rows, stages.peak_stage(peak)
    runtime_mb = rows["imports"]["rss_mb"]
    llm_mb, vis_mb = weights["llm"] / 2**20, sum(weights[p] for p in VISION_PARTS) / 2**20
    vision_phase = at_peak in ("vision_loaded", "loaded", "encoded")
    llm_at_peak = 0.0 if (staged and vision_phase) else llm_mb
    kv_mb = kv_bytes / 2**20 if at_peak in ("prefilled", "decoded") else 0.0
    vis_at_peak = vis_mb if vision_phase else 0.0
    breakdown = {"python_torch": round(runtime_mb, 1), "llm_weights": round(llm_at_peak, 1),
                 "vision_weights": round(vis_at_peak, 1), "kv_cache": round(kv_mb, 1),
                 "activations_and_allocator": round(peak - runtime_mb - llm_at_peak - vis_at_peak - kv_mb, 1),
                 "peak_reached_during": at_peak}
    out = {"peak_rss_mb": peak, "stages": rows, "breakdown": breakdown, "weight_bytes": weights,
           "schedule": "staged" if staged else "together",
           "kv_cache_bytes": kv_bytes, "kv_cache": type(getattr(eng, "cache", None)).__name__, "kv8_marked": kv_int8,
           "engine": eng.name, "transformers_imported": "transformers" in sys.modules,
           "heavy_imports": [m for m in HEAVY_MODULES if m in sys.modules],
           "crops": n_crops, "grid": grid, "prompt_tokens": len(ids) - 1 + n_crops * model.tokens_per_crop,
           "visual_tokens": n_crops * model.tokens_per_crop,
           "decode_tokens": int(job.decode_tokens), "threads": torch.get_num_threads(),
           "timings": {"encode_s": round(encode_s, 2), "prefill_s": round(prefill_s, 2), "decode_s": round(decode_s, 2),
                       "decode_tokens_per_s": round(int(job.decode_tokens) / max(decode_s, 1e-9), 2)},
           "numpy": np.__version__}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
