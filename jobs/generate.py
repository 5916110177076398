"""Generate: answer a prompt about an image with the BlueLM-V runtime, streamed, with timings.

    python -m bluelm_v.launch +experiment=generate image=photo.jpg 'prompt="<image>\\nWhat is shown?"'
    python -m bluelm_v.launch +experiment=generate image=photo.jpg max_new_tokens=128 runtime.prefill_chunk=32
    python -m bluelm_v.launch +experiment=generate image=null 'prompt="What is the capital of France?"'
    python -m bluelm_v.launch +experiment=generate image=photo.jpg runtime.release_encoder=true llm=tiny
    python -m bluelm_v.launch +experiment=generate image=null 'prompt="Hi!"' quantizer=w4
    python -m bluelm_v.launch +experiment=generate image=photo.jpg engine=triton   (CUDA + triton)
    python -m bluelm_v.launch +experiment=generate checkpoint=RUN/checkpoint image=photo.png \
        'prompt="<image>\nWhat colour is the background?"'                       (a trained model)

The model is a train run's checkpoint (``checkpoint=RUN/checkpoint``: its weights, tiler and
parts as trained, bluelm_v/checkpoint.py) or is built from the config (tiler / encoder /
downsampler / projector / llm; defaults: relaxed tiler up to 3x3 + thumbnail, tiny SigLIP,
vila_2x2, mlp2x_gelu, the real SmolLM2-135M: an untrained image path), and the top-level
``quantizer`` (default none; e.g. ``quantizer=w4``) is applied to it; the LLM
runs on the ``engine`` (default auto: fast for Llama-family LLMs, else hf; hf, fast, triton).
The image starts encoding in the background before the prompt is tokenised (decoupled image
encoding), the prompt is prefilled ``runtime.prefill_chunk`` tokens per forward into a KV cache,
and the answer is decoded greedily and printed as it comes. summary.json holds the text, the
grid, crops, visual_tokens, image_encode_s, prefill_s, ttft_s, decode_tokens_per_s,
peak_rss_mb and the config used. Bad inputs (missing/corrupt/empty image, placeholder count,
a prompt longer than the context) stop with one line naming the input.
"""
from __future__ import annotations

import sys
import time

from bluelm_v.errors import ConfigError, InputError
from bluelm_v.runtime import RUNTIME_DEFAULTS, load_image

# The top-level nodes this job reads (bluelm_v.launch refuses overrides of the others).
USES = ("tiler", "encoder", "downsampler", "projector", "llm", "engine", "quantizer")


def _images(cfg) -> list[str]:
    image = cfg.get("image")
    if image is None or image == "":
        return []
    if isinstance(image, str):
        return [image]
    return [str(i) for i in image]


def _device(name: str) -> str:
    """``device``: auto (CUDA when torch sees a GPU, else CPU) | cpu | cuda."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda is set but torch sees no CUDA device")
    return name


def validate(cfg, registry) -> None:
    n = cfg.get("max_new_tokens", 64)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"max_new_tokens: must be an integer >= 1, got {n!r}")
    runtime = dict(cfg.get("runtime") or {})
    for key in runtime:
        if key not in RUNTIME_DEFAULTS:
            raise ConfigError(f"runtime.{key}: unknown runtime parameter; known: "
                              f"{', '.join(RUNTIME_DEFAULTS)}")
    chunk = runtime.get("prefill_chunk", 128)
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"runtime.prefill_chunk: must be an integer >= 1, got {chunk!r}")
    if cfg.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {cfg.get('device')!r} is not one of auto, cpu, cuda")
    if not isinstance(cfg.get("prompt"), str):
        raise ConfigError("prompt: must be a string")
    if cfg.get("checkpoint"):
        from bluelm_v.checkpoint import checkpoint_config

        checkpoint_config(cfg.checkpoint)


def run(ctx) -> dict:
    from omegaconf import OmegaConf

    from bluelm_v.model import BlueLMV
    from bluelm_v.runtime import Generator

    cfg = ctx.cfg
    images = _images(cfg)
    prompt = cfg.prompt.replace("\\n", "\n")     # a typed \n (Hydra keeps it literal) is a newline
    for i, path in enumerate(images):          # fail on a bad image before loading any model
        load_image(path, "image" if len(images) == 1 else f"image[{i}]")
    placeholders = prompt.count("<image>")
    if placeholders != len(images):
        raise InputError(f"prompt: has {placeholders} <image> placeholder(s) but {len(images)} image(s) "
                         f"were given (image={cfg.get('image')!r}); put one <image> where each image goes")
    t0 = time.perf_counter()
    if cfg.get("checkpoint"):
        from bluelm_v.checkpoint import load_checkpoint

        model, _ = load_checkpoint(cfg.checkpoint, ctx.registry)
    else:
        model = BlueLMV.from_config(cfg, ctx.registry)
    model = model.to(_device(cfg.get("device", "auto")))
    if cfg.get("quantizer") is not None:          # e.g. quantizer=w4: rewrites weights in place
        ctx.create("quantizer").apply(model)
    load_s = time.perf_counter() - t0
    runtime = {**RUNTIME_DEFAULTS, **OmegaConf.to_container(cfg.get("runtime") or {}, resolve=True)}
    runtime["system"] = cfg.get("system")
    gen = Generator(model, engine=cfg.engine, registry=ctx.registry, **runtime)
    def print_piece(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream = print_piece if cfg.get("stream", True) else None
    handles = [gen.encode_image(p, "image" if len(images) == 1 else f"image[{i}]")
               for i, p in enumerate(images)]
    try:
        res = gen.generate(prompt, handles, max_new_tokens=int(cfg.max_new_tokens), stream=stream)
    finally:
        gen.close()
    if stream is not None:
        sys.stdout.write("\n")
        sys.stdout.flush()
    t = res.timings
    summary = {
        "text": res.text,
        "finish_reason": res.finish_reason,
        "new_tokens": len(res.token_ids),
        "grid": list(res.grids[0]) if len(res.grids) == 1 and res.grids[0] else res.grids,
        "crops": res.crops[0] if len(res.crops) == 1 else res.crops,
        "visual_tokens": res.visual_tokens,
        "prompt_tokens": res.prompt_tokens,
        "load_s": round(load_s, 3),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    ctx.log_metrics({k: float(v) for k, v in t.items() if isinstance(v, (int, float))})
    return summary
