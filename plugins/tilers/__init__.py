"""Built-in tilers (docs/design.md §2 and §5), one module per rule family:

    anyres.py    relaxed (BlueLM-V-3B), llava_next, llava_onevision
    internvl.py  internvl (InternVL dynamic tiling)
    qwen.py      qwen2_vl, qwen3_vl (smart_resize, no tiles)
    minicpm.py   minicpm_v (slicing)
    idefics3.py  idefics3 (Idefics3 / SmolVLM splitting)
    phi3.py      phi3_vision (HD transform)
    base.py      single, and what every tiler shares

Every tiler: ``tile_size``, ``select(w, h) -> (m, n)`` (m columns along the WIDTH, n rows),
``select_many(ws, hs)``, ``num_crops(m, n)`` (thumbnail included), ``tokens(ws, hs)`` (visual
tokens its own model feeds the LLM), ``decide_many(ws, hs) -> Decisions`` (all of these at
once, vectorised), ``transform(image) -> Crops`` where its views are B x B crops. Sizes the
reference rejects are skipped with a reason (``skipped_many``), never guessed.
Importing this package imports numpy only (torch and PIL load inside ``transform``).
"""
from bluelm_v import hookimpl

from .anyres import FALLBACKS, LlavaNextTiler, LlavaOneVisionTiler, RelaxedTiler, fit_scalar
from .base import THUMBNAILS, Decisions, SingleTiler, Tiler, check_size, check_sizes
from .idefics3 import VARIANTS as IDEFICS3_VARIANTS
from .idefics3 import Idefics3Tiler
from .internvl import InternVLTiler
from .minicpm import MiniCPMVTiler
from .phi3 import Phi3VisionTiler
from .qwen import Qwen2VLTiler, Qwen3VLTiler

__all__ = ["Decisions", "Idefics3Tiler", "InternVLTiler", "LlavaNextTiler", "LlavaOneVisionTiler",
           "MiniCPMVTiler", "Phi3VisionTiler", "Qwen2VLTiler", "Qwen3VLTiler", "RelaxedTiler", "SingleTiler",
           "Tiler", "check_size", "check_sizes", "fit_scalar"]

_TILE = {"tile_size": (14, 4096)}
_TOKENS = {"tokens_per_crop": (1, 100_000)}
_QWEN = {"factor": (1, 1024), "min_pixels": (1, None), "max_pixels": (1, None)}


@hookimpl
def bluelm_v_register(registry):
    reg = registry.tiler.register
    reg("relaxed", RelaxedTiler,
        description="BlueLM-V-3B relaxed aspect-ratio matching (alpha threshold, candidates descending)",
        ranges={**_TILE, **_TOKENS, "max_grid": (1, 12), "alpha": (0.0, 1.0)},
        choices={"thumbnail": THUMBNAILS, "fallback": FALLBACKS})
    reg("llava_next", LlavaNextTiler,
        description="LLaVA-NeXT anyres: max effective resolution, then min waste; padded canvas",
        ranges={**_TILE, **_TOKENS, "max_grid": (1, 12), "patch_size": (1, 1024), "anyres_max": (0, 1024)},
        choices={"thumbnail": THUMBNAILS})
    reg("llava_onevision", LlavaOneVisionTiler,
        description="LLaVA-OneVision anyres_max_9: 6x6 pinpoints of 384, unpad, reduced to ~9 tiles, newlines",
        ranges={**_TILE, "max_grid": (1, 12), "anyres_max": (0, 1024), "patch_size": (1, 1024)},
        choices={"thumbnail": THUMBNAILS})
    reg("internvl", InternVLTiler,
        description="InternVL dynamic tiling: closest aspect ratio, stretched, thumbnail last",
        ranges={**_TILE, **_TOKENS, "min_tiles": (1, 144), "max_tiles": (1, 144)}, choices={"thumbnail": THUMBNAILS})
    reg("single", SingleTiler, description="one tile, no tiling (stage-1 pretraining resolution)",
        ranges={**_TILE, **_TOKENS}, choices={"mode": ("squash", "pad")})
    reg("qwen2_vl", Qwen2VLTiler, description="Qwen2-VL smart_resize (factor 28): one view, (h/28)(w/28) tokens",
        ranges=_QWEN)
    reg("qwen3_vl", Qwen3VLTiler, description="Qwen3-VL smart_resize (factor 32): one view, (h/32)(w/32) tokens",
        ranges=_QWEN)
    reg("minicpm_v", MiniCPMVTiler, description="MiniCPM-V slicing: <= 9 slices of ~448^2 by log aspect + source view",
        ranges={"max_slice_nums": (1, 64), "scale_resolution": (14, 4096), "patch_size": (1, 1024)},
        choices={"version": (2.6, 2.5)})
    reg("idefics3", Idefics3Tiler, description="Idefics3 / SmolVLM: longest edge L, whole T-px tiles + global view",
        ranges={"longest_edge": (1, 4096)}, choices={"variant": tuple(IDEFICS3_VARIANTS)})
    reg("phi3_vision", Phi3VisionTiler, description="Phi-3-vision HD transform: <= hd_num 336-px crops, white padding",
        ranges={"hd_num": (1, 144), **_TOKENS})
