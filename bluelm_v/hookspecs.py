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

    ``registry`` is a :class:`bluelm_v.registry.Registries` with the families of
    ``bluelm_v.FAMILIES``. Factories are classes or functions whose keyword parameters are the
    config values (``tiler: {name: relaxed, alpha: 0.1}``). Each family's contract is a
    ``typing.Protocol`` in :mod:`bluelm_v.types`; a class is checked against it when it
    registers, any factory's object when it is created (ContractError naming what is missing).

      tiler       bluelm_v.types.Tiler: tile_size; select(w, h) -> (m, n) (m columns along the
                  width); select_many / num_crops numpy-vectorised (thumbnail counted);
                  transform(PIL image) -> bluelm_v.types.Crops; optional degenerate_many, tokens
      encoder     bluelm_v.types.Encoder: nn.Module, forward(pixels [K,3,B,B], *,
                  tiles_per_batch, pipelined) -> [K,T,C]; hidden_size, num_tokens, image_size
      downsampler bluelm_v.types.Downsampler: factory(in_dim=C) -> [K,T,C] -> [K,T',C'];
                  out_dim, out_tokens(T)
      projector   bluelm_v.types.Projector: factory(in_dim, out_dim) -> [N,in_dim] -> [N,out_dim]
      llm         bluelm_v.types.LanguageModel: model, tokenizer, hidden_size, max_context,
                  eos_token_ids, embed(ids)
      engine      bluelm_v.types.Engine: factory(model=causal_lm); begin, prefill, step, steps,
                  name, decode_chunk, length, device, cache_bytes
      quantizer   bluelm_v.types.Quantizer: apply, prepare, save, load, settings, describe
      backend     bluelm_v.types.Backend: load(cfg, registry), run_case(case) -> metrics;
                  optional describe, cool_down(seconds), close
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
