"""BlueLMV: tiler -> encoder -> downsampler -> projector -> LLM, built from the registries.

    model = BlueLMV.from_config(cfg, registry)         # cfg has encoder/downsampler/projector/llm
    crops = model.tiler.transform(pil_image)            # Crops: pixels [K,3,B,B], grid, n_crops
    vis = model.encode_images(crops.pixels)             # [K*T', D] visual tokens (T' = 196)
    out = model(input_ids, attention_mask, labels, images=[crops.pixels, ...])
    out.loss, out.logits                                # logits over the spliced sequence

input_ids hold one ``chat.IMAGE_TOKEN_ID`` sentinel per image (in row-major batch order: the
i-th sentinel of the batch takes ``images[i]``); each sentinel is replaced by that image's
K_i*T' visual tokens (labels -100 there); rows are right-padded to the longest spliced row.
Wiring: downsampler in_dim = encoder.hidden_size, projector in_dim = downsampler.out_dim,
out_dim = llm.hidden_size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import ConfigError, InputError
from .splice import SplicePlan


@dataclass
class BlueLMVOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor            # [B, L', V] over the spliced sequence
    attention_mask: torch.Tensor    # [B, L']
    labels: torch.Tensor | None     # [B, L'] (-100 on visual tokens, padding and prompts)


@dataclass
class Spliced:
    embeds: torch.Tensor            # [B, L', D]
    attention_mask: torch.Tensor    # [B, L']
    labels: torch.Tensor | None     # [B, L']


class BlueLMV(torch.nn.Module):
    """The multimodal model. ``tiler`` may be None when crops are made elsewhere."""

    def __init__(self, encoder, downsampler, projector, llm, tiler=None):
        super().__init__()
        self.tiler = tiler
        self.encoder, self.downsampler, self.projector, self.llm = encoder, downsampler, projector, llm
        if tiler is not None and tiler.tile_size != encoder.image_size:     # bluelm_v.types.Tiler has one
            raise ConfigError(f"tiler.tile_size: {tiler.tile_size} but the encoder takes "
                              f"{encoder.image_size} px tiles")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, registry=None) -> "BlueLMV":
        """Build every part from the config nodes ``tiler`` (optional), ``encoder``,
        ``downsampler``, ``projector``, ``llm`` through the registries, wiring the widths."""
        if registry is None:
            from .plugin_manager import from_config
            registry = from_config(cfg)[1]
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        tiler = registry.create_from_config("tiler", get("tiler"), "tiler") if get("tiler") is not None else None
        if tiler is not None and getattr(tiler, "crops_for_encoder", True) is False:
            raise ConfigError(f"tiler: '{get('tiler').get('name')}' decides sizes and visual tokens only (for "
                              f"+experiment=ablate_tiling / tiling_sweep); a model needs a tiler that cuts crops, "
                              f"e.g. tiler=relaxed")
        encoder = registry.create_from_config("encoder", get("encoder"), "encoder")
        downsampler = registry.create_from_config("downsampler", get("downsampler"), "downsampler",
                                                  in_dim=encoder.hidden_size)
        llm = registry.create_from_config("llm", get("llm"), "llm")
        projector = registry.create_from_config("projector", get("projector"), "projector",
                                                in_dim=downsampler.out_dim, out_dim=llm.hidden_size)
        return cls(encoder, downsampler, projector, llm, tiler)

    # -- sizes ----------------------------------------------------------------------------
    @property
    def tokens_per_crop(self) -> int:
        """Visual LLM tokens per crop (196 for SigLIP-384 + vila_2x2)."""
        return self.downsampler.out_tokens(self.encoder.num_tokens)

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    # -- vision ---------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, tiles_per_batch: int | None = None,
                      pipelined: bool | None = None) -> torch.Tensor:
        """[K,3,B,B] crops -> [K*T', D] visual tokens in the LLM's embedding dtype.
        ``tiles_per_batch`` / ``pipelined`` go to the encoder's call (None: its configured value)."""
        if pixels.dim() != 4:
            raise InputError(f"images: expected crops [K,3,B,B], got shape {tuple(pixels.shape)}")
        feats = self.encoder(pixels, tiles_per_batch=tiles_per_batch, pipelined=pipelined)   # [K, T, C]
        merged = self.downsampler(feats)                   # [K, T', C']
        proj_dtype = _param_dtype(self.projector, merged.dtype)
        tokens = self.projector(merged.to(proj_dtype))     # [K, T', D]
        return tokens.reshape(-1, tokens.shape[-1]).to(model_dtype_device(self.llm.model)[0])  # [K*T', D]

    def image_features(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Several images' crops in one encoder pass -> one [K_i*T', D] tensor per image."""
        if not images:
            return []
        device = next(self.encoder.parameters()).device
        sizes = [int(im.shape[0]) * self.tokens_per_crop for im in images]
        tokens = self.encode_images(torch.cat([im.to(device) for im in images]))  # [sum K*T', D]
        return list(tokens.split(sizes))

    # -- splicing -------------------------------------------------------------------------
    def splice(self, input_ids: torch.Tensor, features: Sequence[torch.Tensor],
               attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Spliced:
        """Replace each IMAGE_TOKEN_ID in ``input_ids`` [B,L] by the matching ``features`` [N_i,D];
        returns embeddings [B,L',D], attention mask and labels right-padded to the longest row
        (bluelm_v/splice.py: planned from host copies of the ids, mask and labels, one gather)."""
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        plan = SplicePlan.build(ids.cpu(), _host(attention_mask), _host(labels), [int(f.shape[0]) for f in features])
        text = self.llm.embed(ids.clamp(min=0))            # [B, L, D]; sentinels embed id 0, dropped
        visual = torch.cat(list(features)) if len(features) else text.new_zeros(0, text.shape[-1])   # [sum N, D]
        labels_out = None if plan.labels is None else plan.labels.to(ids.device)
        return Spliced(plan.embeds(text, visual), plan.attention_mask.to(ids.device), labels_out)

    # -- training forward -----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, images: Sequence[torch.Tensor] | None = None,
                **llm_kwargs: Any) -> BlueLMVOutput:
        """input_ids [B,L] with one IMAGE_TOKEN_ID per image, images: list of [K_i,3,B,B]."""
        features = self.image_features(list(images or []))
        s = self.splice(input_ids, features, attention_mask, labels)
        self.check_context(s.embeds.shape[1])
        out = self.llm.model(inputs_embeds=s.embeds, attention_mask=s.attention_mask,
                             labels=s.labels, use_cache=False, **llm_kwargs)
        return BlueLMVOutput(out.loss, out.logits, s.attention_mask, s.labels)

    def check_context(self, n_tokens: int) -> None:
        """InputError when a spliced sequence of ``n_tokens`` does not fit the LLM's context."""
        if n_tokens > self.llm.max_context:
            raise InputError(f"input: {n_tokens} tokens after splicing the images exceed "
                             f"the LLM context of {self.llm.max_context}")


def model_dtype_device(hf_model):
    """(dtype, device) of a causal LM's activations: from its final norm (a quantised embedding
    has no real weight), else its embedding."""
    norm = getattr(getattr(hf_model, "model", None), "norm", None)
    w = getattr(norm, "weight", None)
    if w is None or w.numel() == 0:
        w = hf_model.get_input_embeddings().weight
    return w.dtype, w.device


def _host(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def _param_dtype(module: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default
