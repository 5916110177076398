"""The module DeepSpeed wraps in the train job and in bench/bench_train_gpu.py: BlueLMV + the loss.

    step = TrainStep(model, loss_chunk_tokens=2048, fused=True, attention="varlen", max_seq=4096)
    step(input_ids=..., labels=..., images=[...], attention_mask=...).loss            # padded rows
    step(input_ids=..., labels=..., images=[...], doc_lens=[[812, 3100, 184], ...]).loss   # packed rows

Two paths. The reference one is ``BlueLMV.forward`` (the LLM's own forward and transformers'
loss over full [B, L, V] fp32 logits); it runs when nothing below asks for more. Otherwise the
splice is planned on the host (no device syncs), the decoder stack runs through
jobs/train/decoder.py (fused q|k|v and gate|up matmuls, positions restarting per packed sample,
document-masked attention; one code path for transformers' Llama and the native one) and the loss
is the chunked LM head + cross-entropy of jobs/train/loss.py (or a plain one for
``loss_chunk_tokens=0``); the encoder takes every crop of the micro-batch in one call
(``encoder_tiles=0``) instead of its configured (phone) tiles_per_batch. Right-padded rows need no mask: under causal attention no real token
sees the padding after it, and padding carries label -100.

Packed rows (``doc_lens`` given: per row, each sample's spliced length and then the padding's)
are padded or cut to ``max_seq`` after the splice, so every micro-batch has one shape.
"""
from __future__ import annotations

from types import SimpleNamespace


def _module_class():
    import torch
    import torch.nn.functional as F

    from bluelm_v.jobs.train.decoder import (attention_layout, compiled_decoder_layer, decoder_hidden,
                                             resolve_attention, unsupported)
    from bluelm_v.jobs.train.loss import chunked_linear_ce
    from bluelm_v.splice import SplicePlan, to_device

    class TrainStep(torch.nn.Module):
        """BlueLMV (as ``.model``) + the chosen decoder and loss path."""

        def __init__(self, model, loss_chunk_tokens: int = 0, compiled_loss: bool = False, fused: bool = False,
                     attention: str = "auto", max_seq: int | None = None, packing: bool = False,
                     compiled_layers: bool = False, compile_mode: str | None = None, checkpointing: bool = False,
                     encoder_tiles: int = 0):
            super().__init__()
            if loss_chunk_tokens < 0:
                raise ValueError(f"loss_chunk_tokens {loss_chunk_tokens} must be >= 0")
            self.model = model
            self.loss_chunk_tokens, self.compiled_loss = int(loss_chunk_tokens), bool(compiled_loss)
            self.fused, self.checkpointing, self.packing = bool(fused), bool(checkpointing), bool(packing)
            self.max_seq = int(max_seq) if max_seq else None
            self.encoder_tiles = int(encoder_tiles)       # 0: every crop of the micro-batch in one call
            self.own_decoder = self.packing or self.fused or self.checkpointing or self.loss_chunk_tokens > 0
            if self.packing and not self.max_seq:
                raise ValueError("packing needs max_seq (the packed row length)")
            lm = model.llm.model
            why = unsupported(lm) if self.own_decoder else None
            if why:
                raise ValueError(f"the training decoder (packing, fused projections, chunked loss, checkpointing) "
                                 f"cannot run this LLM: {why}; turn those off to train it through its own forward")
            device = next(model.llm.parameters()).device
            self.attention = resolve_attention(attention, device.type) if self.own_decoder else "causal"
            self.layer_fn = compiled_decoder_layer(compile_mode) if compiled_layers and self.own_decoder else None

        def _visual(self, pixels):
            """[K,3,B,B] -> [K*T', D]: ``encoder_tiles`` crops per encoder call (0: all K at once,
            no patch-embedding pipeline: that overlap pays on a phone, not in a training step)."""
            tiles = self.encoder_tiles or int(pixels.shape[0])
            return self.model.encode_images(pixels, tiles_per_batch=tiles, pipelined=False if not self.encoder_tiles else None)

        def forward(self, input_ids, labels, images, attention_mask=None, doc_lens=None):
            """Host (CPU) or device tensors; host ones are moved without stream synchronisation."""
            m = self.model
            dev = next(m.llm.parameters()).device
            images = [to_device(im, dev) for im in images]
            if not self.own_decoder and doc_lens is None:
                return m(input_ids=to_device(input_ids, dev), attention_mask=to_device(attention_mask, dev),
                         labels=to_device(labels, dev), images=images)
            if doc_lens is not None and not self.packing:
                raise ValueError("packed rows (doc_lens) given to a TrainStep built with packing=False")
            host = [None if t is None else t.cpu() for t in (input_ids, attention_mask, labels)]
            plan = SplicePlan.build(*host, [int(im.shape[0]) * m.tokens_per_crop for im in images])
            text = m.llm.embed(to_device(input_ids.clamp(min=0), dev))           # [B, L, D]
            visual = self._visual(torch.cat(images)) if images else text.new_zeros(0, text.shape[-1])   # [sum N, D]
            embeds, targets = plan.embeds(text, visual), plan.labels             # [B, L', D], [B, L']
            if doc_lens is not None:
                embeds, targets = _to_length(embeds, targets, self.max_seq)
                layout = attention_layout(self.attention, doc_lens, self.max_seq, dev)
            else:
                if plan.right_padded:   # a row's text padding stays in it after the splice: cut to the longest real row
                    longest = int(plan.attention_mask.sum(1).max())
                    embeds, targets = embeds[:, :longest], targets[:, :longest]
                key_mask = None if plan.right_padded else plan.attention_mask
                layout = attention_layout(self.attention, None, embeds.shape[1], dev, key_mask=key_mask)
            m.check_context(embeds.shape[1])
            lm = m.llm.model                                                      # (Native)LlamaForCausalLM
            hidden = decoder_hidden(lm, embeds, layout, fused=self.fused, layer_fn=self.layer_fn,
                                    checkpoint=self.checkpointing)               # [B, L, D]
            d = hidden.shape[-1]
            h = hidden[:, :-1].reshape(-1, d)                                     # [B*(L-1), D]
            y = to_device(targets[:, 1:].reshape(-1), dev)                        # [B*(L-1)]
            if self.loss_chunk_tokens:
                loss = chunked_linear_ce(h, lm.lm_head.weight, y, self.loss_chunk_tokens, self.compiled_loss)
            else:
                loss = F.cross_entropy(lm.lm_head(h).float(), y, ignore_index=-100)
            return SimpleNamespace(loss=loss)

    def _to_length(embeds, targets, length: int):
        """Spliced rows padded (zero embeddings, label -100) or cut to ``length`` tokens; a cut
        removes padding only (collate_packed keeps every row's samples within ``length``)."""
        n = embeds.shape[1]
        if n >= length:
            return embeds[:, :length], targets[:, :length]
        pad = length - n
        return (F.pad(embeds, (0, 0, 0, pad)),
                F.pad(targets, (0, pad), value=-100))

    return TrainStep


_CLASS: dict = {}


def train_step_module(model, loss_chunk_tokens: int = 0, compiled_loss: bool = False, **options):
    """``TrainStep(model, ...)`` (options: fused, attention, max_seq, packing, compiled_layers,
    compile_mode, checkpointing)."""
    if "cls" not in _CLASS:
        _CLASS["cls"] = _module_class()
    return _CLASS["cls"](model, loss_chunk_tokens, compiled_loss, **options)
