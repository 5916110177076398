"""Answering questions with a model: what each evaluation actor (and bench/bench_table2_gpu.py) runs.

    model, described = build_model(spec, registry, device="cpu")        # checkpoint or config nodes
    gen = Generator(model, engine=spec["engine"], registry=registry)
    records = answer_questions(gen, questions, batch_size=8, max_new_tokens=16)

``spec`` is a plain dict: {"checkpoint": DIR | None, "nodes": {tiler, encoder, downsampler,
projector, llm} (used without a checkpoint), "quantizer": node | None, "engine": node,
"dtype": auto | float32 | bfloat16, "system": str | None, "seed": int}.

Questions are answered ``batch_size`` at a time through ``Generator.generate_batch`` (several
prompts, each with its own images, per forward). A question whose image is missing or cannot
be decoded, or whose prompt with its visual tokens does not fit the LLM's context, is not
asked: its record carries ``skipped`` = missing_image | bad_image | too_long and the detail.
"""
from __future__ import annotations

import base64
import binascii
import io
import time
from pathlib import Path

from bluelm_v.chat import prompt_ids
from bluelm_v.data.vqa import build_prompt

SKIP_REASONS = ("missing_image", "bad_image", "too_long")


def build_model(spec: dict, registry, device: str = "cpu"):
    """(BlueLMV with its tiler, description) from a checkpoint or from config nodes."""
    import torch

    from bluelm_v.model import BlueLMV

    dtype = {"auto": torch.bfloat16 if str(device).startswith("cuda") else None, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[spec.get("dtype") or "auto"]
    if spec.get("checkpoint"):
        from bluelm_v.checkpoint import load_checkpoint

        model, info = load_checkpoint(spec["checkpoint"], registry, device=None, dtype=None)
        described = {"checkpoint": spec["checkpoint"], "stages": info["stages"], "config": info["config"]}
    else:
        torch.manual_seed(int(spec.get("seed", 0)))
        model = BlueLMV.from_config(spec["nodes"], registry)
        described = {"checkpoint": None, "config": spec["nodes"]}
    if spec.get("quantizer") and spec["quantizer"].get("name") not in (None, "none"):
        registry.create_from_config("quantizer", spec["quantizer"], "quantizer").apply(model)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.to(device).eval(), described


def load_question_images(question: dict) -> tuple[list, str | None, str]:
    """(PIL images, skip reason or None, detail) of one question."""
    from PIL import Image

    from bluelm_v.errors import InputError
    from bluelm_v.runtime import load_image

    images = []
    for k, spec in enumerate(question.get("images") or []):
        name = f"question {question['id']} image[{k}]"
        if "path" in spec:
            path = Path(spec["path"])
            if not path.is_file():
                return [], "missing_image", f"{path} not found"
            try:
                images.append(load_image(path, name))
            except InputError as exc:
                return [], "bad_image", str(exc)
            continue
        try:
            data = base64.b64decode(spec["base64"], validate=False)
            with Image.open(io.BytesIO(data)) as im:
                images.append(im.convert("RGB"))
        except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as exc:
            return [], "bad_image", f"{name}: base64 image does not decode ({type(exc).__name__}: {exc})"
    return images, None, ""


def visual_tokens(model, images) -> int:
    """LLM positions the images take once tiled (the tiler's grid x tokens per crop)."""
    total = 0
    for im in images:
        m, n = model.tiler.select(*im.size)
        total += int(model.tiler.num_crops(m, n)) * model.tokens_per_crop
    return total


def answer_questions(gen, questions: list[dict], batch_size: int = 8, max_new_tokens: int = 16,
                     prefill_chunk: int | None = None, tiles_per_batch: int | None = None,
                     system: str | None = None) -> list[dict]:
    """One record per question, in order: {id, prompt, prediction, visual_tokens, prompt_tokens,
    seconds} or {id, prompt, skipped, detail}."""
    model = gen.model
    records: list[dict] = []
    ready: list[tuple[dict, str, list]] = []

    def flush() -> None:
        if not ready:
            return
        t0 = time.perf_counter()
        results = gen.generate_batch([p for _, p, _ in ready], [ims for _, _, ims in ready],
                                     max_new_tokens, prefill_chunk=prefill_chunk,
                                     tiles_per_batch=tiles_per_batch, batch_size=batch_size)
        share = (time.perf_counter() - t0) / len(ready)
        for (rec, _, _), res in zip(ready, results):
            rec.update(prediction=res.text.strip(), visual_tokens=int(res.visual_tokens),
                       prompt_tokens=int(res.prompt_tokens), finish_reason=res.finish_reason, seconds=share)
        ready.clear()

    for q in questions:
        prompt = build_prompt(q)
        rec = {"id": q["id"], "prompt": prompt}
        records.append(rec)
        images, reason, detail = load_question_images(q)
        if reason is None:
            length = len(prompt_ids(model.tokenizer, prompt, system=system)) - len(images) + visual_tokens(model, images)
            if length + max_new_tokens > model.llm.max_context:
                reason = "too_long"
                detail = f"{length} prompt tokens + {max_new_tokens} new exceed the context of {model.llm.max_context}"
        if reason is not None:
            rec.update(skipped=reason, detail=detail)
            continue
        ready.append((rec, prompt, images))
        if len(ready) >= batch_size:
            flush()
    flush()
    return records


class ShardAnswerer:
    """A Ray actor: builds the model once, then answers shards of questions."""

    def __init__(self, spec: dict, settings: dict, plugins: dict, threads: int = 1):
        self.spec, self.settings, self.plugins, self.threads = spec, settings, plugins, int(threads)
        self.gen = None

    def load(self) -> dict:
        import torch

        from bluelm_v.plugin_manager import get
        from bluelm_v.runtime import Generator

        torch.set_num_threads(self.threads)
        _, registry, _ = get(**self.plugins)
        device = "cuda" if self.settings.get("use_gpu") and torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        model, described = build_model(self.spec, registry, device)
        self.gen = Generator(model, engine=self.spec["engine"], registry=registry,
                             prefill_chunk=self.settings.get("prefill_chunk") or 128, system=self.spec.get("system"))
        return {"device": device, "load_s": time.perf_counter() - t0, "engine": self.gen.engine.name,
                "tokens_per_crop": model.tokens_per_crop}

    def answer(self, shard: int, questions: list[dict]) -> tuple[int, list[dict]]:
        s = self.settings
        return shard, answer_questions(self.gen, questions, batch_size=int(s["batch_size"]),
                                       max_new_tokens=int(s["max_new_tokens"]), prefill_chunk=s.get("prefill_chunk"),
                                       tiles_per_batch=s.get("tiles_per_batch"), system=self.spec.get("system"))
