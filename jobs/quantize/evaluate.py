"""Accuracy and speed measurements of quantised models (used by jobs/quantize/).

    tokens = offline_text_tokens(tokenizer, n_tokens)          # pydoc_data.topics, fixed order
    perplexity(hf_model, tokens, context=512, chunk=128)       # windows fed chunk by chunk via the KV cache
    decode_speed(hf_model, prompt_tokens, n_new=32)            # batch-1 greedy tokens/s
    feature_cosine(ref [K,T,C], test [K,T,C])                  # per-token cosine: mean / min
    sample_images(n)                                           # real photos shipped by scikit-image
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from bluelm_v.plugins.quantizers.schemes import kv_cache_kind

TEXT_SOURCE = "pydoc_data.topics (Python standard library help texts, keys in sorted order)"
IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


def offline_text() -> str:
    """Real English text that ships with Python itself (no download)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def offline_text_tokens(tokenizer, n_tokens: int) -> list[int]:
    ids = tokenizer.encode(offline_text())
    if len(ids) < n_tokens:
        raise ValueError(f"job.n_tokens: the offline text has only {len(ids)} tokens, asked {n_tokens}")
    return ids[:n_tokens]


def new_cache(hf_model, max_tokens: int | None = None):
    """The cache the model is marked for: Int8KVCache after kv8, else a transformers DynamicCache."""
    if kv_cache_kind(hf_model) == "int8":
        from bluelm_v.nn.kv_cache_hf import Int8KVCache

        return Int8KVCache(max_tokens=max_tokens)
    from transformers import DynamicCache

    return DynamicCache(config=hf_model.config)


@torch.no_grad()
def perplexity(hf_model, tokens: list[int], context: int = 512, chunk: int = 128) -> dict:
    """exp(mean NLL) over non-overlapping windows of ``context`` tokens. Each window is fed in
    ``chunk``-token pieces through the model's KV cache (so an INT8 cache is really exercised);
    every token of a window except its first is predicted. Returns {perplexity, nll, n_predicted,
    tokens_per_s, kv_cache}."""
    nll, count, t0 = 0.0, 0, time.perf_counter()
    ids = torch.tensor(tokens, dtype=torch.long)
    for start in range(0, len(tokens) - 1, context):
        window = ids[start:start + context][None]                                  # [1, L]
        if window.shape[1] < 2:
            break
        cache = new_cache(hf_model, window.shape[1])
        for c0 in range(0, window.shape[1], chunk):
            piece = window[:, c0:c0 + chunk]                                       # [1, T]
            pos = torch.arange(c0, c0 + piece.shape[1])
            out = hf_model(input_ids=piece, past_key_values=cache, use_cache=True,
                           cache_position=pos, position_ids=pos[None])
            logits = out.logits[0].float()                                         # [T, V]
            targets = window[0, c0 + 1:c0 + 1 + piece.shape[1]]                    # next tokens
            logits = logits[: targets.shape[0]]
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.shape[0]
    seconds = time.perf_counter() - t0
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "n_predicted": count,
            "tokens_per_s": len(tokens) / seconds, "kv_cache": kv_cache_kind(hf_model)}


@torch.no_grad()
def decode_speed(engine, embed, prompt: list[int], n_new: int = 32) -> dict:
    """Batch-1 greedy decode tokens/s of ``engine`` (a runtime engine over the LLM whose input
    embedding is ``embed``) after a chunked prefill of ``prompt``."""
    ids = torch.tensor([prompt])
    engine.begin(len(prompt) + n_new + 1)
    tok = int(engine.prefill(embed(ids), 128).argmax())
    t0 = time.perf_counter()
    for _ in range(n_new):
        tok = engine.step(tok)
    dt = time.perf_counter() - t0
    return {"decode_tokens_per_s": n_new / dt, "engine": engine.name,
            "kv_cache_class": type(getattr(engine, "cache", None)).__name__,
            "threads": torch.get_num_threads()}


def feature_cosine(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """Per-token cosine similarity of two feature tensors [K, T, C] -> {mean, min}."""
    cos = F.cosine_similarity(ref.float().flatten(0, -2), test.float().flatten(0, -2), dim=-1)
    return {"mean": cos.mean().item(), "min": cos.min().item(), "n_tokens": cos.numel()}


def sample_images(n: int, size: int = 384) -> tuple[torch.Tensor, list[str]]:
    """``n`` real photos from scikit-image's data module as [n, 3, size, size] in [-1, 1]
    (SigLIP normalisation: mean = std = 0.5), squashed to the tile size."""
    import numpy as np
    from PIL import Image
    from skimage import data

    pixels, names = [], []
    for name in IMAGE_NAMES[:n]:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        img = Image.fromarray(arr[..., :3].astype("uint8")).convert("RGB").resize((size, size), Image.BICUBIC)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)   # [3, H, W]
        pixels.append((t - 0.5) / 0.5)
        names.append(name)
    if len(names) < n:
        raise ValueError(f"job.n_images: scikit-image ships {len(IMAGE_NAMES)} usable photos, asked {n}")
    return torch.stack(pixels), names
