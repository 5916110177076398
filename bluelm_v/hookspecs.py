"""Every hook contract of bluelm-v. Plugins implement them with ``@bluelm_v.hookimpl``.

A plugin is any module (or object) listed under the entry-point group ``bluelm_v``. The
built-in plugins in ``plugins/`` are listed there too and loaded by the same code path.
"""
from __future__ import annotations

from typing import Any

from . import hookspec


@hookspec
def bluelm_v_register(registry) -> None:
    """Register components: ``registry.tiler.register("name", factory, description=...)``.

    ``registry`` is a :class:`bluelm_v.registry.Registries`; its families are tiler, encoder,
    downsampler, projector, llm, quantizer and backend. Factories are classes or functions
    whose keyword parameters are the config values (``tiler: {name: relaxed, alpha: 0.1}``).

    Contracts per family (what the model, the jobs and the backends call):
      tiler       .select(w, h) -> (m, n); .select_many(ws, hs) -> (ms, ns) numpy arrays;
                  optional .degenerate_many(ws, hs) -> bool[N] (sizes no canvas holds: fallback used);
                  .num_crops(m, n) -> crops incl. thumbnail (numpy-friendly);
                  .transform(PIL.Image) -> bluelm_v.types.Crops
      encoder     torch.nn.Module: forward(pixels [K,3,B,B]) -> [K,T,C]; attrs hidden_size,
                  num_tokens, image_size
      downsampler factory(in_dim=C, ...) -> nn.Module [K,T,C] -> [K,T',C']; attrs out_dim,
                  out_tokens(T) -> T'
      projector   factory(in_dim, out_dim, ...) -> nn.Module [N, in_dim] -> [N, out_dim]
      llm         factory(...) -> bluelm_v.types.LanguageModel-like: .model (causal LM),
                  .tokenizer, .hidden_size
      quantizer   .apply(model) -> model (rewrites weights / KV cache in place); .describe()
      backend     .load(cfg) then .run_case(case: dict) -> dict of measured figures
    """


@hookspec
def bluelm_v_job_start(job: str, config: dict[str, Any], run_dir: str) -> None:
    """A job is starting in ``run_dir`` with the resolved ``config`` (plain dict)."""


@hookspec
def bluelm_v_log_metrics(metrics: dict[str, float], step: int | None) -> None:
    """Scalar metrics from a running job (training loss, benchmark figures, ...)."""


@hookspec
def bluelm_v_log_images(images: dict[str, str], step: int | None) -> None:
    """Image files (PNG paths) a job produced, keyed by a display name."""


@hookspec
def bluelm_v_job_end(job: str, summary: dict[str, Any], run_dir: str, status: str) -> None:
    """A job ended (status 'ok' or 'failed'); ``summary`` is what went into summary.json."""


@hookspec
def bluelm_v_devices(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Extra benchmark devices ({name, backend, ...}) this plugin knows of (phones it can see,
    a lab inventory...). Results of all plugins are concatenated."""
