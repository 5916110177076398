"""Vision encoders: ``siglip`` (transformers' SigLIP vision tower, penultimate-layer features).

    encoder: {name: siglip, preset: so400m, tiles_per_batch: 4, pipelined: true}

Presets: ``so400m`` (SigLIP so400m-patch14-384: 1152 wide, 27 layers, ~400M params, random
init unless ``path`` names a local checkpoint) and ``tiny`` (same geometry, 384 px / patch 14 ->
729 tokens, but 64 wide and 2 layers: for tests). Features come from the layer ``feature_layer``
(-2 = penultimate, a design choice, docs/design.md §1); the layers after it, the post-LayerNorm and the pooling head
are never built or run.

Tiles are encoded ``tiles_per_batch`` at a time (the paper runs a 2:4 image as 4 + 4 + 1). With
``pipelined: true`` the patch embedding (Conv2D + position embedding) of tile group k+1 runs
while the transformer layers process group k: on a second CUDA stream on GPU, on a worker thread
on CPU (docs/design.md §3, "pipelined patch embedding").
"""
from __future__ import annotations

from bluelm_v import hookimpl

SIGLIP_PRESETS = {
    "so400m": dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                   intermediate_size=4304, patch_size=14, image_size=384),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, patch_size=14, image_size=384),
}
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _siglip_class():
    import torch

    class SiglipEncoder(torch.nn.Module):
        """SigLIP vision tower -> [K, 729, C] penultimate-layer features, batched + pipelined."""

        def __init__(self, preset: str = "tiny", tiles_per_batch: int = 4, pipelined: bool = True,
                     feature_layer: int = -2, path: str | None = None, dtype: str = "float32",
                     attn_implementation: str = "sdpa", device: str = "cpu", seed: int = 0,
                     image_size: int | None = None, implementation: str = "transformers",
                     fused: bool = False, compile: bool = False, cuda_graph: bool = False,
                     fp8: bool = False, attention: str = "auto"):
            super().__init__()
            self._fast_options(fused, compile, cuda_graph, fp8, attention, device)
            if implementation == "native":
                if path:
                    raise ValueError("implementation native builds random-init presets; use "
                                     "implementation: transformers to load a checkpoint from path")
                self._init_native(preset, image_size, feature_layer, tiles_per_batch, pipelined, dtype, device, seed)
                return
            from transformers import SiglipVisionConfig, SiglipVisionModel

            if path:
                full = SiglipVisionModel.from_pretrained(path, local_files_only=True,
                                                         attn_implementation=attn_implementation,
                                                         dtype=torch_dtype(dtype))
                config = full.config
            else:
                geometry = dict(SIGLIP_PRESETS[preset])
                if image_size:                      # another tile size; patch 14 kept
                    geometry["image_size"] = int(image_size)
                config = SiglipVisionConfig(**geometry, hidden_act="gelu_pytorch_tanh",
                                            layer_norm_eps=1e-6, vision_use_head=False,
                                            attn_implementation=attn_implementation)
                with torch.device("meta"):
                    full = SiglipVisionModel(config)
            tower = getattr(full, "vision_model", full)   # transformers < 5 wraps the tower
            keep = _kept_layers(feature_layer, config.num_hidden_layers)
            self.embeddings = tower.embeddings
            self.layers = torch.nn.ModuleList(list(tower.encoder.layers)[:keep])
            self.config, self.tiles_per_batch, self.pipelined = config, int(tiles_per_batch), pipelined
            self.hidden_size = config.hidden_size
            self.image_size = config.image_size
            self.patch_size = config.patch_size
            self.num_tokens = (config.image_size // config.patch_size) ** 2
            if not path:
                if device != "meta":
                    _materialise(self, config, torch_dtype(dtype), device, seed)
            del full, tower

        def _fast_options(self, fused, compile, cuda_graph, fp8, attention, device):
            """The fast path (bluelm_v/nn/siglip_fast.py): on when any option asks for it."""
            from bluelm_v.errors import ConfigError

            dev = torch.device(device)
            if fp8 and dev.type == "cuda" and torch.cuda.is_available() and \
                    torch.cuda.get_device_capability(dev) < (8, 9):
                raise ConfigError(f"encoder.fp8: FP8 matmuls need an sm89+ GPU (Ada, Hopper); "
                                  f"{torch.cuda.get_device_name(dev)} is not one")
            self.fast = bool(fused or compile or cuda_graph or fp8 or attention != "auto")
            self.fp8, self.attention, self.cuda_graph = bool(fp8), attention, bool(cuda_graph)
            self._layer_fn, self._graphed = None, None
            if compile:
                from bluelm_v.nn.siglip_fast import siglip_layer
                self._layer_fn = torch.compile(siglip_layer, dynamic=False)

        # -- the two stages the pipeline overlaps ------------------------------------------
        def _init_native(self, preset, image_size, feature_layer, tiles_per_batch, pipelined, dtype, device, seed):
            """The same tower from bluelm_v.nn.llama (no transformers import), same parameter names."""
            from bluelm_v.nn.siglip import siglip_tower

            geometry = dict(SIGLIP_PRESETS[preset])
            if image_size:
                geometry["image_size"] = int(image_size)
            n_layers = geometry["num_hidden_layers"]
            keep = _kept_layers(feature_layer, n_layers)
            with torch.device("meta"):                 # allocated once, in dtype, by _materialise
                config, self.embeddings, self.layers = siglip_tower(**geometry, keep_layers=keep)
            self.config, self.tiles_per_batch, self.pipelined = config, int(tiles_per_batch), pipelined
            self.hidden_size, self.image_size, self.patch_size = config.hidden_size, config.image_size, config.patch_size
            self.num_tokens = (config.image_size // config.patch_size) ** 2
            if device != "meta":
                _materialise(self, config, torch_dtype(dtype), device, seed)

        def embed(self, pixels):
            """[k,3,B,B] -> [k,T,C]: the patch-embedding Conv2D + position embedding."""
            return self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype))

        def transform(self, tokens):
            """[k,T,C] -> [k,T,C]: the transformer layers up to the feature layer."""
            if self.fast:
                return self._fast_transform(tokens)
            for layer in self.layers:
                tokens = layer(tokens, attention_mask=None)
                if isinstance(tokens, tuple):  # older transformers return (hidden, attn)
                    tokens = tokens[0]
            return tokens

        def forward(self, pixels, tiles_per_batch: int | None = None, pipelined: bool | None = None):
            """[K,3,B,B] -> [K,T,C], ``tiles_per_batch`` tiles per call (None: the configured
            value), the patch embedding of the next group overlapped when ``pipelined``."""
            tiles_per_batch = self.tiles_per_batch if tiles_per_batch is None else int(tiles_per_batch)
            pipelined = self.pipelined if pipelined is None else bool(pipelined)
            if self.cuda_graph and pixels.is_cuda and not torch.is_grad_enabled():
                from bluelm_v.nn.siglip_fast import GraphedRunner
                if self._graphed is None:   # one graph per (tile count, tiles per call); no pipelining
                    self._graphed = {}
                run = self._graphed.setdefault(tiles_per_batch, GraphedRunner(
                    lambda px: torch.cat([self.transform(self.embed(g)) for g in px.split(max(1, tiles_per_batch))])))
                return run(pixels)
            groups = list(pixels.split(max(1, tiles_per_batch)))  # [k,3,B,B] each
            if not pipelined or len(groups) == 1:
                return torch.cat([self.transform(self.embed(g)) for g in groups])
            if pixels.is_cuda:
                return self._forward_streams(groups)
            return self._forward_threads(groups)

        def _fast_transform(self, tokens):
            """The layers as ``siglip_layer`` over raw weights (compiled if asked; FP8 if asked)."""
            from bluelm_v.nn.siglip_fast import attention_backend, layer_weights, siglip_layer

            fn = self._layer_fn or siglip_layer
            heads, eps = self.config.num_attention_heads, self.config.layer_norm_eps
            with attention_backend(self.attention):
                for layer in self.layers:
                    w = layer_weights(layer, self.fp8)
                    tokens = layer(tokens, attention_mask=None) if w is None else fn(tokens, *w, heads=heads, eps=eps)
                    if isinstance(tokens, tuple):
                        tokens = tokens[0]
            return tokens

        def _forward_threads(self, groups):
            from concurrent.futures import ThreadPoolExecutor

            outs = []
            grad = torch.is_grad_enabled()

            def embed_job(g):
                with torch.set_grad_enabled(grad):
                    return self.embed(g)

            with ThreadPoolExecutor(1, thread_name_prefix="patch-embed") as pool:
                pending = pool.submit(embed_job, groups[0])
                for k in range(len(groups)):
                    tokens = pending.result()                       # [k,T,C] of group k
                    if k + 1 < len(groups):
                        pending = pool.submit(embed_job, groups[k + 1])
                    outs.append(self.transform(tokens))
            return torch.cat(outs)

        def _forward_streams(self, groups):
            main, side = torch.cuda.current_stream(), torch.cuda.Stream()
            outs = []
            side.wait_stream(main)                     # inputs were written on the main stream
            with torch.cuda.stream(side):
                first = self.embed(groups[0])
            ready = torch.cuda.Event()
            ready.record(side)
            for k in range(len(groups)):
                main.wait_event(ready)
                tokens = first
                tokens.record_stream(main)
                if k + 1 < len(groups):
                    with torch.cuda.stream(side):
                        first = self.embed(groups[k + 1])    # overlaps the layers of group k
                    ready = torch.cuda.Event()
                    ready.record(side)
                outs.append(self.transform(tokens))
            return torch.cat(outs)

    return SiglipEncoder


def _kept_layers(feature_layer: int, n_layers: int) -> int:
    """How many transformer layers run: up to the feature layer (-2: all but the last)."""
    keep = feature_layer % (n_layers + 1) if feature_layer < 0 else feature_layer
    if not 1 <= keep <= n_layers:
        raise ValueError(f"feature_layer={feature_layer} is outside 1..{n_layers} (or -1..-{n_layers})")
    return keep


def _materialise(module, config, dtype, device, seed: int):
    """Allocate a meta-built module on ``device`` and initialise it module by module (no fp32
    copy is ever made of weights built in bf16)."""
    import torch

    module.to(dtype=dtype)
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, sub in module.named_modules():
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
                _normal_(sub.weight, std, gen)
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
            elif isinstance(sub, torch.nn.LayerNorm):
                sub.weight.fill_(1.0)
                sub.bias.zero_()
        emb = getattr(module, "embeddings", None)
        if emb is not None and hasattr(emb, "position_ids"):
            n = emb.position_ids.shape[-1]
            emb.position_ids.copy_(torch.arange(n, device=device).expand(1, -1))


def _normal_(tensor, std: float, gen):
    """N(0, std) in place, in the tensor's own dtype (no fp32 temporary)."""
    tensor.normal_(0.0, std, generator=gen)


def siglip(preset: str = "tiny", tiles_per_batch: int = 4, pipelined: bool = True,
           feature_layer: int = -2, path: str | None = None, dtype: str = "float32",
           attn_implementation: str = "sdpa", device: str = "cpu", seed: int = 0,
           image_size: int | None = None, implementation: str = "transformers",
           fused: bool = False, compile: bool = False, cuda_graph: bool = False, fp8: bool = False,
           attention: str = "auto"):
    """SigLIP vision tower (transformers), penultimate-layer features, batched + pipelined tiles.
    ``image_size`` overrides the preset's tile size (a multiple-of-14 side keeps every pixel seen).
    ``implementation: native`` builds the same tower from bluelm_v.nn.llama (no transformers import).
    Inference speed (bluelm_v/nn/siglip_fast.py; any of them turns the fast path on): ``fused``
    (q|k|v as one GEMM, the layer as one function), ``compile`` (torch.compile of that layer),
    ``cuda_graph`` (one CUDA graph per tile count, no pipelining), ``fp8`` (e4m3 matmuls, sm89+),
    ``attention`` (the SDPA backend: auto, flash, cudnn, efficient, math)."""
    return _siglip_class()(preset=preset, tiles_per_batch=tiles_per_batch, pipelined=pipelined,
                           feature_layer=feature_layer, path=path, dtype=dtype,
                           attn_implementation=attn_implementation, device=device, seed=seed,
                           image_size=image_size, implementation=implementation, fused=fused,
                           compile=compile, cuda_graph=cuda_graph, fp8=fp8, attention=attention)


@hookimpl
def bluelm_v_register(registry):
    registry.encoder.register(
        "siglip", siglip,
        description="SigLIP ViT (transformers): so400m/tiny presets, penultimate layer, "
                    "tiles_per_batch + pipelined patch embedding",
        ranges={"tiles_per_batch": (1, None), "image_size": (14, 4096)},
        choices={"preset": tuple(SIGLIP_PRESETS), "dtype": DTYPES,
                 "attn_implementation": ("sdpa", "eager"), "implementation": ("transformers", "native"),
                 "attention": ("auto", "flash", "cudnn", "efficient", "math")})
