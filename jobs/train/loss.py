"""The chunked LM head + cross-entropy of the training step (``train.loss_chunk_tokens``).

    loss = chunked_linear_ce(hidden [N, D], lm_head_weight [V, D], targets [N], chunk=2048)

The LM head and the cross-entropy run ``chunk`` tokens at a time in a custom autograd function
that computes the gradients of the hidden states and of the head in its forward pass: no
[tokens, vocab] tensor outlives a chunk (FLOPs unchanged, 6 * tokens * V * D).
"""
from __future__ import annotations


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
