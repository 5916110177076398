"""Speed options of the training step, shared by the train job (``bluelm_v.jobs.train.loop``) and
``bench/bench_train_gpu.py``; config keys ``train.compile``, ``train.compile_mode``,
``train.loss_chunk_tokens``, ``train.sdpa_backend``.

    set_sdpa_backend("flash")                  # CUDA: only this attention kernel may run (else an error)
    compile_blocks(model, mode="default")      # torch.compile each LLM decoder layer and ViT layer
    net = TrainStep(model, loss_chunk_tokens=2048)   # what DeepSpeed wraps: .forward(**batch).loss

``TrainStep`` with ``loss_chunk_tokens=0`` is ``BlueLMV.forward`` (transformers' loss over full
[B, L, V] fp32 logits). With N > 0 the LM head and the cross-entropy run N tokens at a time in a
custom autograd function that computes the gradients of the hidden states and of the head in
its forward pass: no [tokens, vocab] tensor outlives a chunk (FLOPs unchanged, 6 * tokens * V * D).
The attention mask is then dropped when every row is right-padded: under causal attention a
real token never sees the padding after it, so its output is unchanged, padding carries label
-100, and sdpa can run its causal flash kernel instead of a masked one.
"""
from __future__ import annotations

from types import SimpleNamespace

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def set_sdpa_backend(name: str | None) -> None:
    """Restrict torch's scaled_dot_product_attention on CUDA to one kernel family (process-wide;
    an input that kernel cannot take then raises instead of silently using another). ``auto`` /
    None leaves torch's choice. No effect on CPU."""
    import torch

    name = name or "auto"
    if name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa backend {name!r}: use one of {SDPA_BACKENDS}")
    if name == "auto" or not torch.cuda.is_available():
        return
    b = torch.backends.cuda
    b.enable_flash_sdp(name == "flash")
    b.enable_cudnn_sdp(name == "cudnn")
    b.enable_mem_efficient_sdp(name == "efficient")
    b.enable_math_sdp(name == "math")


def compile_blocks(model, mode: str | None = "default") -> int:
    """Regional torch.compile: every LLM decoder layer and encoder layer (layers of one kind share
    one graph; norms, rotary, activations and residual adds fuse into a few Triton kernels).
    The first shape compiles static; a second one (another sequence length or crop count, as in
    LLaVA data) recompiles once with those sizes dynamic (torch's automatic dynamic shapes), so
    varying batches do not recompile every step. Returns the layer count."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    kw = {} if mode in (None, "default") else {"mode": mode}
    n = 0
    for layers in (model.llm.model.model.layers, model.encoder.layers):
        for layer in layers:
            layer.compile(**kw)
            n += 1
    return n


def ce_chunk_eager(h, weight, y, inv_count, with_grad: bool):
    """One chunk: (summed CE of ``h @ weight.T`` over targets != -100, d(mean CE)/d logits in
    h's dtype, or None). h [c, D], weight [V, D], y [c], inv_count: 1 / valid targets (0-d).
    In-place softmax: one [c, V] fp32 buffer at a time."""
    import torch

    valid = y != -100                                             # [c]
    y0 = y.clamp(min=0)
    logits = (h @ weight.t()).float()                             # [c, V] fp32
    lse = torch.logsumexp(logits, dim=-1)                         # [c]
    picked = logits.gather(1, y0[:, None]).squeeze(1)             # [c]
    loss = ((lse - picked) * valid).sum()
    if not with_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()                      # [c, V] softmax, in place
    probs[torch.arange(h.shape[0], device=h.device), y0] -= 1.0
    probs.mul_((valid.float() * inv_count)[:, None])
    return loss, probs.to(h.dtype)


def ce_chunk_fused(h, weight, y, inv_count, with_grad: bool):
    """The same function written without in-place ops, for torch.compile to fuse the softmax,
    the target pick and the scaling into a couple of kernels around the matmul."""
    import torch

    valid = y != -100                                             # [c]
    y0 = y.clamp(min=0)
    logits = (h @ weight.t()).float()                             # [c, V] fp32
    lse = torch.logsumexp(logits, dim=-1)                         # [c]
    hit = torch.arange(logits.shape[1], device=h.device)[None, :] == y0[:, None]   # [c, V]
    picked = torch.where(hit, logits, 0.0).sum(-1)                # [c]
    loss = ((lse - picked) * valid).sum()
    if not with_grad:
        return loss, None
    g = (torch.exp(logits - lse[:, None]) - hit.float()) * (valid.float() * inv_count)[:, None]   # [c, V]
    return loss, g.to(h.dtype)


PAD_ROWS = 128          # compiled path: chunk lengths rounded up to this (few distinct shapes)
_COMPILED_CHUNK = {}


def _chunk_fn(compiled: bool):
    if not compiled:
        return ce_chunk_eager
    if "fn" not in _COMPILED_CHUNK:
        import torch

        _COMPILED_CHUNK["fn"] = torch.compile(ce_chunk_fused, dynamic=False)
    return _COMPILED_CHUNK["fn"]


def _linear_ce_function():
    import torch

    class ChunkedLinearCE(torch.autograd.Function):
        """mean CE of ``hidden @ weight.T`` over targets != -100, in row chunks; the gradients of
        hidden and weight are formed chunk by chunk in the forward (no [N, V] logits kept)."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk: int, compiled: bool):
            # hidden [N, D], weight [V, D], targets [N] (-100 = ignored)
            fn = _chunk_fn(compiled)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]   # frozen head: no grad_w
            with_grad = need_h or need_w
            count = (targets != -100).sum().clamp(min=1).float()
            inv = 1.0 / count
            grad_h = torch.empty_like(hidden) if need_h else None         # [N, D]
            grad_w = torch.zeros_like(weight) if need_w else None         # [V, D]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk]                           # [c, D]
                y = targets[start:start + chunk]                          # [c]
                c = h.shape[0]
                if compiled and c % PAD_ROWS:                             # pad rows: ignored targets
                    extra = PAD_ROWS - c % PAD_ROWS
                    h = torch.cat([h, h.new_zeros(extra, h.shape[1])])
                    y = torch.cat([y, y.new_full((extra,), -100)])
                loss, g = fn(h, weight, y, inv, with_grad)
                total = total + loss
                if need_h:
                    grad_h[start:start + c] = (g @ weight)[:c]            # [c, D]
                if need_w:
                    grad_w.addmm_(g.t(), h)                               # [V, D]
                del g
            ctx.save_for_backward(grad_h, grad_w)
            return total * inv

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            return (grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
                    grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None, None, None, None)

    return ChunkedLinearCE


_FN = {}


def chunked_linear_ce(hidden, weight, targets, chunk: int = 2048, compiled: bool = False):
    """Mean cross-entropy of ``hidden [N, D] @ weight[V, D].T`` against ``targets [N]`` (-100
    ignored), ``chunk`` rows at a time (``compiled``: the per-chunk softmax/CE fused by torch.compile)."""
    if "fn" not in _FN:
        _FN["fn"] = _linear_ce_function()
    return _FN["fn"].apply(hidden, weight, targets, int(chunk), bool(compiled))


def _module_class():
    import torch

    from bluelm_v.splice import SplicePlan, to_device

    class TrainStep(torch.nn.Module):
        """The module DeepSpeed wraps: BlueLMV (as ``.model``) + the chosen loss path."""

        def __init__(self, model, loss_chunk_tokens: int = 0, compiled_loss: bool = False):
            super().__init__()
            if loss_chunk_tokens < 0:
                raise ValueError(f"loss_chunk_tokens {loss_chunk_tokens} must be >= 0")
            self.model = model
            self.loss_chunk_tokens, self.compiled_loss = int(loss_chunk_tokens), bool(compiled_loss)

        def forward(self, input_ids, labels, images, attention_mask=None):
            """Host (CPU) or device tensors; host ones are moved without stream synchronisation."""
            m = self.model
            dev = next(m.llm.parameters()).device
            images = [to_device(im, dev) for im in images]
            if not self.loss_chunk_tokens:
                return m(input_ids=to_device(input_ids, dev), attention_mask=to_device(attention_mask, dev),
                         labels=to_device(labels, dev), images=images)
            # the splice is planned on the host (host inputs: no device reads at all)
            host = [None if t is None else t.cpu() for t in (input_ids, attention_mask, labels)]
            plan = SplicePlan.build(*host, [int(im.shape[0]) * m.tokens_per_crop for im in images])
            text = m.llm.embed(to_device(input_ids.clamp(min=0), dev))           # [B, L, D]
            visual = (m.encode_images(torch.cat(images)) if images               # [sum N, D]
                      else text.new_zeros(0, text.shape[-1]))
            embeds, spliced_labels = plan.embeds(text, visual), plan.labels
            m.check_context(embeds.shape[1])
            mask = None if plan.right_padded else to_device(plan.attention_mask, dev)
            lm = m.llm.model                                              # LlamaForCausalLM
            hidden = lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
            d = hidden.shape[-1]                                          # hidden [B, L, D]
            h = hidden[:, :-1].reshape(-1, d)                             # [B*(L-1), D]
            y = to_device(spliced_labels[:, 1:].reshape(-1), dev)         # [B*(L-1)]
            loss = chunked_linear_ce(h, lm.get_output_embeddings().weight, y, self.loss_chunk_tokens,
                                     self.compiled_loss)
            return SimpleNamespace(loss=loss)

    return TrainStep


def train_step_module(model, loss_chunk_tokens: int = 0, compiled_loss: bool = False):
    """``TrainStep(model, ...)``: call with input_ids, labels, images, attention_mask; ``.loss``."""
    return _module_class()(model, loss_chunk_tokens, compiled_loss)


def apply_speed_options(model, options: dict):
    """The job's and the bench's one entry point: sdpa backend, regional compile, loss path.
    ``options``: compile (bool), compile_mode, loss_chunk_tokens (int), sdpa_backend. Returns
    the TrainStep module to hand to DeepSpeed (its ``.model`` is ``model``)."""
    set_sdpa_backend(options.get("sdpa_backend"))
    compiled = bool(options.get("compile"))
    if compiled:
        compile_blocks(model, options.get("compile_mode") or "default")
    return train_step_module(model, int(options.get("loss_chunk_tokens") or 0), compiled_loss=compiled)
