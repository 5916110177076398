"""Batched generation behind ``Generator.generate_batch`` (bluelm_v/runtime.py):

    results = gen.generate_batch(["<image>\\nWhat is it?", "Hi"], [[photo], []], max_new_tokens=16,
                                 batch_size=32, prefill_chunk=8192, tiles_per_batch=64,
                                 stream=lambda i, piece: print(i, piece))

1. Plan (before any work, so bad input costs nothing): every prompt's ids and placeholder count,
   every image's crop count (tensors: their first dim; paths/PIL images: the tiler's grid for
   the image size, read from the file header), hence every prompt's LLM length, checked
   against the context.
2. Prompts sorted by length (results come back in the caller's order) and cut into batches of
   ``batch_size``; a batch's images are loaded and tiled on a thread pool while the batch
   before it runs.
3. A batch's crops are encoded together (``tiles_per_batch`` per encoder call), spliced per
   prompt, prefilled together and decoded together through the engine's batch API
   (``begin_batch`` / ``prefill_batch`` / ``steps_batch``: plugins/engines/batched.py,
   hf_batch.py); a row stops at an end token, ``max_new_tokens`` or the context, and from then
   on the engine no longer computes it. Greedy: the tokens of one-by-one ``generate``.
Engines without a batch API (or an INT8 KV cache) run the prompts one by one.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .errors import InputError

GPU_PREFILL_TOKENS = 8192     # default tokens per prefill forward on CUDA: GEMMs near the matmul rate


@dataclass
class Row:
    index: int                 # position in the caller's lists
    ids: list[int]             # prompt ids, one sentinel per image
    images: list               # as given
    crops: list[int]           # crops per image (planned)
    length: int                # LLM positions of the prompt (planned)


def is_handle(image: Any) -> bool:
    """An ``EncodedImage`` (a background encoding already under way)."""
    return callable(getattr(image, "result", None)) and callable(getattr(image, "done", None))


def plan(gen, prompts: Sequence, images: Sequence) -> list[Row]:
    """Check every prompt and image and work out each prompt's length (module docstring, 1)."""
    if isinstance(prompts, (str, dict)):
        raise InputError(f"prompts: a list of prompts (got one {type(prompts).__name__}); use generate for one")
    if len(images) != len(prompts):
        raise InputError(f"images: give one list of images per prompt ({len(prompts)} prompts, "
                         f"{len(images)} image lists)")
    per_crop, rows = gen.model.tokens_per_crop, []
    for i, (prompt, ims) in enumerate(zip(prompts, images)):
        if not isinstance(ims, (list, tuple)):
            raise InputError(f"images[{i}]: a list of the images of prompts[{i}] (got {type(ims).__name__})")
        try:
            ids = gen.prompt_ids(prompt, len(ims))
        except InputError as exc:
            raise InputError(str(exc).replace("prompt:", f"prompts[{i}]:", 1)) from None
        crops = [int(im.result()["crops"]) if is_handle(im) else gen.planned_crops(im, f"images[{i}][{j}]")
                 for j, im in enumerate(ims)]
        length = len(ids) - len(ims) + per_crop * sum(crops)
        if length >= gen.max_context:
            raise InputError(f"prompts[{i}]: {length} tokens (visual tokens included) do not fit the "
                             f"context of {gen.max_context} tokens")
        rows.append(Row(i, ids, list(ims), crops, length))
    return rows


def _tile(gen, image: Any, name: str) -> dict:
    """One image -> {"pixels": [K,3,B,B] | None, "grid", "handle": EncodedImage | None}."""
    if is_handle(image):
        return {"pixels": None, "grid": None, "handle": image}
    pixels, grid = gen.prepare_image(image, name)
    return {"pixels": pixels, "grid": grid, "handle": None}


def _encode(gen, tiles: list[list[dict]], tiles_per_batch: int | None) -> list[list[dict]]:
    """A batch's tiled images, all crops through the encoder together -> per row, per image
    {"features": [K*T',D], "grid", "crops"}."""
    enc = gen.model.encoder
    dtype = next((p.dtype for p in enc.parameters() if p.is_floating_point()), None)
    flat = [t for row in tiles for t in row if t["handle"] is None]
    out_feats: list = []
    if flat:
        pixels = torch.cat([t["pixels"].to(device=gen._encoder_device, dtype=dtype) for t in flat])    # [sum K,3,B,B]
        with gen._lock:
            feats = gen.model.encode_images(pixels, tiles_per_batch)                     # [sum K*T',D]
        out_feats = list(feats.split([int(t["pixels"].shape[0]) * gen.model.tokens_per_crop for t in flat]))
    it = iter(out_feats)
    result = []
    for row in tiles:
        done = []
        for t in row:
            if t["handle"] is not None:
                r = t["handle"].result()
                done.append({"features": r["features"], "grid": r["grid"], "crops": r["crops"]})
            else:
                done.append({"features": next(it), "grid": t["grid"], "crops": int(t["pixels"].shape[0])})
        result.append(done)
    return result


class _Streamer:
    """Per-row incremental text for ``stream(index, piece)`` (whole characters only)."""

    def __init__(self, tokenizer, stream, index: int):
        self.tokenizer, self.stream, self.index, self.shown = tokenizer, stream, index, ""

    def update(self, ids: list[int], final: bool = False) -> None:
        if self.stream is None:
            return
        text = self.tokenizer.decode(ids)
        if (final or not text.endswith("\ufffd")) and len(text) > len(self.shown):
            self.stream(self.index, text[len(self.shown):])
            self.shown = text


def decode_rows(gen, first: list[int], lengths: list[int], capacity: int, max_new: int,
                streamers: list[_Streamer]) -> tuple[list[list[int]], list[str]]:
    """Greedy decode of a prefilled batch from each row's ``first`` token -> (ids, reasons),
    the rules of ``Generator.decode`` per row; finished rows are left out of later steps."""
    eng, n_rows = gen.engine, len(first)
    ids: list[list[int]] = [[] for _ in range(n_rows)]
    reasons = ["length"] * n_rows
    pending = [[t] for t in first]
    length, live = list(lengths), list(range(n_rows))
    while True:
        still = []
        for r in live:
            finished = False
            while pending[r] and not finished:
                tok = pending[r].pop(0)
                if tok in gen.eos:
                    reasons[r], finished = "eos", True
                    break
                ids[r].append(tok)
                streamers[r].update(ids[r])
                finished = len(ids[r]) >= max_new
            if not finished and length[r] >= capacity:
                reasons[r], finished = "context", True
            if not finished:
                still.append(r)
        live = still
        if not live:
            return ids, reasons
        n = min(eng.decode_chunk, max(max_new - len(ids[r]) for r in live),
                min(capacity - length[r] for r in live))
        for r, toks in zip(live, eng.steps_batch(live, [ids[r][-1] for r in live], n)):
            pending[r] = toks
            length[r] += n


@torch.no_grad()
def run_batch(gen, rows: list[Row], tiles: list[list[dict]], max_new: int, chunk: int,
              tiles_per_batch: int | None, stream: Callable | None, batch_index: int,
              release: bool = False) -> list[tuple[int, dict]]:
    """One batch: encode, splice, prefill, decode -> [(row index, GenerationResult fields)];
    ``release``: free the encoder once this batch's images are encoded (the last batch)."""
    t0 = time.perf_counter()
    encoded = _encode(gen, tiles, tiles_per_batch)
    if release:
        gen.release_encoder()
    embeds = []
    for row, enc in zip(rows, encoded):
        e = gen.embed_prompt(row.ids, [x["features"] for x in enc])                    # [1,L,D]
        if e.shape[1] >= gen.max_context:
            raise InputError(f"prompts[{row.index}]: {e.shape[1]} tokens (visual tokens included) do "
                             f"not fit the context of {gen.max_context} tokens")
        embeds.append(e)
    gen.sync()
    t_pre = time.perf_counter()
    eng = gen.engine
    lengths = [int(e.shape[1]) for e in embeds]
    eng.begin_batch(len(rows), max(min(gen.max_context, n + max(1, max_new)) for n in lengths))
    first = eng.prefill_batch(embeds, chunk).argmax(-1).tolist()
    gen.sync()
    t_first = time.perf_counter()
    streamers = [_Streamer(gen.tokenizer, stream, row.index) for row in rows]
    capacity = min(gen.max_context, eng.batch_capacity)
    ids, reasons = decode_rows(gen, first, lengths, capacity, max_new, streamers)
    gen.sync()
    t_end = time.perf_counter()
    out = []
    for row, enc, n, tok_ids, why, s in zip(rows, encoded, lengths, ids, reasons, streamers):
        s.update(tok_ids, final=True)
        n_dec = max(0, len(tok_ids) - 1)
        timings = {"image_encode_s": t_pre - t0, "prefill_s": t_first - t_pre,
                   "prefill_tokens_per_s": sum(lengths) / max(t_first - t_pre, 1e-9),
                   "ttft_s": t_first - t0, "decode_s": t_end - t_first,
                   "decode_tokens_per_s": n_dec / (t_end - t_first) if n_dec else 0.0,
                   "total_s": t_end - t0, "kv_cache_mb": eng.batch_cache_bytes / 2**20,
                   "engine": eng.name, "prefill_chunk": chunk, "batch_size": len(rows),
                   "batch_index": batch_index}
        out.append((row.index, dict(
            text=gen.tokenizer.decode(tok_ids), token_ids=tok_ids, prompt_tokens=n,
            visual_tokens=sum(int(x["features"].shape[0]) for x in enc), grids=[x["grid"] for x in enc],
            crops=[x["crops"] for x in enc], finish_reason=why, timings=timings)))
    return out


def batched(gen, rows: list[Row], max_new_tokens: int, stream: Callable | None, chunk: int | None,
            tiles_per_batch: int | None, batch_size: int | None):
    """Planned rows through the engine's batch API -> (row index, result fields), batch by batch
    (a generator: each batch's results as soon as it is done)."""
    eng = gen.engine
    if chunk is None:
        on_gpu = torch.device(getattr(eng, "device", "cpu")).type == "cuda"
        chunk = max(gen.prefill_chunk, GPU_PREFILL_TOKENS) if on_gpu else gen.prefill_chunk
    size = int(batch_size or len(rows))
    ordered = sorted(rows, key=lambda r: r.length)                 # similar lengths share a batch
    batches = [ordered[k:k + size] for k in range(0, len(ordered), size)]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="image-tile") as pool:
        def submit(batch):
            return [[pool.submit(_tile, gen, im, f"images[{r.index}][{j}]") for j, im in enumerate(r.images)]
                    for r in batch]
        nxt = submit(batches[0]) if batches else None
        for k, batch in enumerate(batches):
            tiles = [[f.result() for f in fs] for fs in nxt]
            if k + 1 < len(batches):
                nxt = submit(batches[k + 1])                       # tiled while this batch runs
            yield from run_batch(gen, batch, tiles, max_new_tokens, chunk, tiles_per_batch, stream, k,
                                 release=gen.release_after and k == len(batches) - 1)
