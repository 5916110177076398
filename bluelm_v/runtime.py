"""Generation runtime: decoupled image encoding, chunked prefill, KV cache, greedy streaming decode.

    gen = Generator(model, engine="auto", prefill_chunk=128)   # engine: a registered name or node
    handle = gen.encode_image("photo.jpg", tiles_per_batch=4)  # starts encoding NOW, in the background
    res = gen.generate("<image>\nWhat is in the picture?", images=[handle], max_new_tokens=64,
                       stream=lambda piece: print(piece, end="", flush=True), prefill_chunk=256)
    res.text, res.timings["ttft_s"], res.timings["decode_tokens_per_s"]
    results = gen.generate_batch(prompts, [[img] for img in photos], max_new_tokens=16,
                                 batch_size=32)                    # batched: bluelm_v/batch_generate.py

Lower-level steps (what backends time separately): ``encode_image`` -> ``EncodedImage``,
``prompt_ids``, ``embed_prompt`` (splices the visual tokens), ``prefill`` -> logits of the last
position, ``decode`` -> generated ids. Per-call settings (``prefill_chunk``, ``tiles_per_batch``,
``pipelined``) are arguments of those calls; the constructor's values are their defaults. Image paths, prompts and placeholders are checked and
reported as :class:`bluelm_v.errors.InputError` naming the input.
"""
from __future__ import annotations

import gc
import os
import resource
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import batch_generate, chat
from .data.image_sizes import open_image
from .errors import InputError

RUNTIME_DEFAULTS = dict(prefill_chunk=128, release_encoder=False, threads=None, system=None)


def _check_chunk(chunk: int) -> int:
    if int(chunk) < 1:
        raise InputError(f"prefill_chunk: {chunk} tokens; it must be >= 1")
    return int(chunk)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def load_image(image: Any, name: str = "image"):
    """A path or PIL image -> an RGB PIL image; unusable input -> InputError naming it."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    else:
        path = Path(image)
        if not path.exists():
            raise InputError(f"{name}: {str(path)!r} does not exist")
        if not path.is_file():
            raise InputError(f"{name}: {str(path)!r} is not a file")
        if path.stat().st_size == 0:
            raise InputError(f"{name}: {str(path)!r} is empty (0 bytes)")
        try:
            img = open_image(path, name)      # refuses more pixels than images.max_pixels
            img.load()
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{name}: {str(path)!r} is not a readable image ({exc})") from None
    if img.width <= 0 or img.height <= 0:
        raise InputError(f"{name}: image has size {img.width}x{img.height}")
    return img.convert("RGB")


@dataclass
class EncodedImage:
    """A (possibly still running) background encoding of one image."""

    future: Future
    name: str
    submitted: float

    def result(self) -> dict:
        """{"features": [N,D], "grid": (m,n) | None, "crops": K, "encode_s": s, "done_at": t}"""
        return self.future.result()

    def done(self) -> bool:
        return self.future.done()


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int                 # LLM positions of the prompt, visual tokens included
    visual_tokens: int
    grids: list = field(default_factory=list)
    crops: list = field(default_factory=list)
    finish_reason: str = "length"      # eos | length | context
    timings: dict = field(default_factory=dict)


class Generator:
    """Generation over a :class:`bluelm_v.model.BlueLMV`: one prompt (``generate``) or many
    decoded together (``generate_batch``); see the module docstring."""

    def __init__(self, model, engine: Any = "auto", registry=None, prefill_chunk: int = 128,
                 release_encoder: bool = False, threads: int | None = None, system: str | None = None):
        """``engine``: a registered engine name, a config node ``{name: fast, ...}`` (created
        through ``registry``, default: the installed plugins) or an engine object."""
        _check_chunk(prefill_chunk)
        if threads:
            torch.set_num_threads(int(threads))
        self.model = model.eval()
        self.tokenizer = model.llm.tokenizer
        self.prefill_chunk, self.release_after, self.system = int(prefill_chunk), release_encoder, system
        if isinstance(engine, (str, dict)) or hasattr(engine, "_metadata"):
            if registry is None:
                from .plugin_manager import get
                registry = get()[1]
            engine = registry.create_from_config("engine", engine, "engine", model=model.llm.model)
        self.engine = engine
        self.eos = model.llm.eos_token_ids
        self.max_context = model.llm.max_context
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="image-encode")
        self._lock = threading.Lock()
        self.encoder_released = False
        p = next(iter(model.encoder.parameters()), None)
        p = p if p is not None else next(iter(model.encoder.buffers()), None)
        self._encoder_device = p.device if p is not None else torch.device("cpu")

    # -- images ---------------------------------------------------------------------------
    def encode_image(self, image: Any, name: str = "image", tiles_per_batch: int | None = None,
                     pipelined: bool | None = None) -> EncodedImage:
        """Start encoding ``image`` (path, PIL image or crops tensor [K,3,B,B]) in the background,
        ``tiles_per_batch`` crops per encoder call (None: the encoder's configured value)."""
        if self.encoder_released:
            raise InputError(f"{name}: the encoder was released (runtime.release_encoder=true); "
                             "give every image before generating")
        if not isinstance(image, torch.Tensor):
            from PIL import Image
            if not isinstance(image, Image.Image):
                p = Path(image)
                if not p.is_file() or p.stat().st_size == 0:
                    load_image(image, name)       # raises the precise InputError now
        return EncodedImage(self._pool.submit(self._encode_now, image, name, tiles_per_batch, pipelined),
                            name, time.perf_counter())

    @torch.no_grad()
    def _encode_now(self, image: Any, name: str, tiles_per_batch: int | None, pipelined: bool | None) -> dict:
        t0 = time.perf_counter()
        pixels, grid = self.prepare_image(image, name)
        device = self._encoder_device
        with self._lock:
            feats = self.model.encode_images(pixels.to(device), tiles_per_batch, pipelined)   # [K*T', D]
        done = time.perf_counter()
        return {"features": feats, "grid": grid, "crops": int(pixels.shape[0]),
                "encode_s": done - t0, "done_at": done}

    def prepare_image(self, image: Any, name: str = "image") -> tuple[torch.Tensor, tuple | None]:
        """A path, PIL image or crops tensor -> (crops [K,3,B,B], grid (m, n) or None): the
        tiler's work, on the host."""
        if isinstance(image, torch.Tensor):
            if image.dim() not in (3, 4):
                raise InputError(f"{name}: crops must be [K,3,B,B], got shape {tuple(image.shape)}")
            return (image if image.dim() == 4 else image[None]), None
        if self.model.tiler is None:
            raise InputError(f"{name}: the model has no tiler; pass crops [K,3,B,B]")
        crops = self.model.tiler.transform(load_image(image, name))
        return crops.pixels, tuple(crops.grid)

    def planned_crops(self, image: Any, name: str = "image") -> int:
        """How many crops ``image`` makes, without tiling it: a tensor's first dim; for a path or
        PIL image the tiler's grid for its size (a file's size read from its header)."""
        if isinstance(image, torch.Tensor):
            return int(self.prepare_image(image, name)[0].shape[0])
        if self.model.tiler is None:
            raise InputError(f"{name}: the model has no tiler; pass crops [K,3,B,B]")
        from PIL import Image, UnidentifiedImageError

        if isinstance(image, Image.Image):
            size = image.size
        else:
            path = Path(image)
            if not path.is_file() or path.stat().st_size == 0:
                load_image(image, name)                   # raises the precise InputError
            try:
                with Image.open(path) as img:
                    size = img.size
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise InputError(f"{name}: {str(path)!r} is not a readable image ({exc})") from None
        tiler = self.model.tiler
        return int(tiler.num_crops(*tiler.select(*size)))

    def release_encoder(self) -> None:
        """Free the vision encoder's weights (after all images are encoded)."""
        if self.encoder_released:
            return
        with self._lock:
            enc = self.model.encoder
            for p in enc.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            for m in enc.modules():    # quantised layers keep their codes in buffers
                for n, b in list(m._buffers.items()):
                    if b is not None:
                        m._buffers[n] = torch.empty(0, dtype=b.dtype, device=b.device)
            self.encoder_released = True
        gc.collect()

    # -- text -----------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list, n_images: int) -> list[int]:
        texts = [prompt] if isinstance(prompt, str) else [m.get("content", m.get("value", ""))
                                                          for m in prompt]
        if not all(isinstance(t, str) for t in texts):
            raise InputError("prompt: must be text")
        found = sum(chat.count_placeholders(t) for t in texts)
        if found != n_images:
            raise InputError(f"prompt: has {found} {chat.IMAGE_PLACEHOLDER} placeholder(s) but "
                             f"{n_images} image(s) were given; put one {chat.IMAGE_PLACEHOLDER} "
                             f"where each image goes")
        return chat.prompt_ids(self.tokenizer, prompt, system=self.system)

    def embed_prompt(self, ids: list[int], features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prompt ids + visual features -> [1, L, D] embeddings."""
        device = self.engine.device if hasattr(self.engine, "device") else "cpu"
        t = torch.tensor([ids], device=device)
        return self.model.splice(t, [f.to(device) for f in features]).embeds

    # -- LLM ------------------------------------------------------------------------------
    def prefill(self, embeds: torch.Tensor, max_new_tokens: int = 0, chunk: int | None = None) -> torch.Tensor:
        """Reset the KV cache and consume ``embeds`` [1,L,D] in chunks of ``chunk`` tokens
        (None: the constructor's ``prefill_chunk``) -> [V] last logits."""
        chunk = self.prefill_chunk if chunk is None else _check_chunk(chunk)
        length = embeds.shape[1]
        if length >= self.max_context:
            raise InputError(f"prompt: {length} tokens (visual tokens included) do not fit the "
                             f"context of {self.max_context} tokens")
        self.engine.begin(min(self.max_context, length + max(1, max_new_tokens)))
        return self.engine.prefill(embeds, chunk)

    def decode(self, first_token: int, max_new_tokens: int,
               stream: Callable[[str], Any] | None = None) -> tuple[list[int], str, str]:
        """Greedy decode from ``first_token`` -> (ids, text, finish_reason). Tokens are asked of
        the engine ``decode_chunk`` at a time (CUDA graphs: no host round trip per token); any
        made past an end token are dropped."""
        ids, shown, reason = [], "", "length"
        token, pending = first_token, []
        chunk = self.engine.decode_chunk
        while True:
            if token in self.eos:
                reason = "eos"
                break
            ids.append(token)
            if stream is not None:
                text = self.tokenizer.decode(ids)
                if not text.endswith("\ufffd") and len(text) > len(shown):
                    stream(text[len(shown):])
                    shown = text
            if len(ids) >= max_new_tokens:
                break
            if not pending:
                room = self.engine_capacity() - self.engine.length
                if room <= 0:
                    reason = "context"
                    break
                pending = self.engine.steps(token, min(chunk, max_new_tokens - len(ids), room))
            token = pending.pop(0)
        text = self.tokenizer.decode(ids)
        if stream is not None and len(text) > len(shown):
            stream(text[len(shown):])
        return ids, text, reason

    def engine_capacity(self) -> int:
        cache = getattr(self.engine, "cache", None)
        return getattr(cache, "max_len", self.max_context) if cache is not None else self.max_context

    # -- everything ------------------------------------------------------------------------
    def generate(self, prompt: str | list, images: Sequence[Any] = (), max_new_tokens: int = 64,
                 stream: Callable[[str], Any] | None = None, prefill_chunk: int | None = None,
                 tiles_per_batch: int | None = None) -> GenerationResult:
        """Encode images (background), tokenise, prefill in chunks, decode greedily."""
        t0 = time.perf_counter()
        handles = [im if isinstance(im, EncodedImage) else
                   self.encode_image(im, f"image[{i}]", tiles_per_batch=tiles_per_batch)
                   for i, im in enumerate(images)]
        ids = self.prompt_ids(prompt, len(handles))           # runs while the images encode
        t_tok = time.perf_counter()
        encoded = [h.result() for h in handles]
        t_feat = time.perf_counter()
        if self.release_after and encoded:
            self.release_encoder()
        embeds = self.embed_prompt(ids, [e["features"] for e in encoded])
        self.sync()
        t_pre = time.perf_counter()
        logits = self.prefill(embeds, max_new_tokens, prefill_chunk)
        first = int(logits.argmax())
        self.sync()
        t_first = time.perf_counter()
        out_ids, text, reason = self.decode(first, max_new_tokens, stream)
        self.sync()
        t_end = time.perf_counter()
        n_dec = max(0, len(out_ids) - 1)
        visual = sum(int(e["features"].shape[0]) for e in encoded)
        starts = [h.submitted for h in handles]
        timings = {
            "image_encode_s": (max(e["done_at"] for e in encoded) - min(starts)) if encoded else 0.0,
            "encode_wait_s": t_feat - t_tok,           # what the prompt still waited for the images
            "tokenize_s": t_tok - t0,
            "prefill_s": t_first - t_pre,
            "prefill_tokens_per_s": embeds.shape[1] / max(t_first - t_pre, 1e-9),
            "ttft_s": t_first - t0,
            "decode_s": t_end - t_first,
            "decode_tokens_per_s": n_dec / (t_end - t_first) if n_dec else 0.0,
            "total_s": t_end - t0,
            "peak_rss_mb": peak_rss_mb(),
            "kv_cache_mb": getattr(self.engine, "cache_bytes", 0) / 2**20,
            "engine": self.engine.name,
            "prefill_chunk": prefill_chunk or self.prefill_chunk,
        }
        return GenerationResult(text=text, token_ids=out_ids, prompt_tokens=int(embeds.shape[1]),
                                visual_tokens=visual, grids=[e["grid"] for e in encoded],
                                crops=[e["crops"] for e in encoded], finish_reason=reason,
                                timings=timings)

    def generate_batch(self, prompts: Sequence[str | list], images: Sequence[Sequence[Any]],
                       max_new_tokens: int = 64, stream: Callable[[int, str], Any] | None = None,
                       prefill_chunk: int | None = None, tiles_per_batch: int | None = None,
                       batch_size: int | None = None) -> list[GenerationResult]:
        """``generate`` for many prompts at once -> one result per prompt, in order.
        ``images[i]``: the images of ``prompts[i]`` (paths, PIL images, crops tensors or
        ``encode_image`` handles). Prompts of similar length are batched ``batch_size`` at a time
        (None: all at once); a batch's crops are encoded together, its rows prefilled packed
        ``prefill_chunk`` tokens a forward (None: the constructor's value on CPU, at least 8192
        on CUDA) and decoded together, finished rows dropped (bluelm_v/batch_generate.py).
        ``stream(i, piece)``: new text of prompt i. Greedy: the tokens of ``generate``, prompt by
        prompt. Every prompt and image is checked before any work starts."""
        if prefill_chunk is not None:
            _check_chunk(prefill_chunk)
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch_size: {batch_size}; it must be >= 1")
        rows = batch_generate.plan(self, prompts, images)
        if not (hasattr(self.engine, "begin_batch") and self.engine.supports_batch()):
            return [self.generate(p, ims, max_new_tokens, None if stream is None else
                                  (lambda piece, i=i: stream(i, piece)), prefill_chunk, tiles_per_batch)
                    for i, (p, ims) in enumerate(zip(prompts, images))]   # no batch API: one by one
        results: list = [None] * len(rows)
        for index, fields in batch_generate.batched(self, rows, max_new_tokens, stream, prefill_chunk,
                                                    tiles_per_batch, batch_size):
            fields["timings"]["peak_rss_mb"] = peak_rss_mb()
            results[index] = GenerationResult(**fields)
        return results

    def sync(self) -> None:
        """Wait for the device (CUDA) before reading a timer."""
        dev = getattr(self.engine, "device", None)
        if dev is not None and torch.device(dev).type == "cuda":
            torch.cuda.synchronize()



    def close(self) -> None:
        self._pool.shutdown(wait=True)
