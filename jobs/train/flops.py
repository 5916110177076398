"""Model FLOPs of a training step and the device peak, for MFU = achieved model FLOP/s / peak.

Counted analytically (never profiled): every Linear/Conv2d weight costs 2 FLOPs per token per
forward multiply-add, attention adds 4 * T^2 * width per layer and sequence (QK^T and AV, the
full square: the usual convention). A part's backward costs 2x its forward when its weights
train, 1x when it is frozen but a trainable part sits before it (input gradients only), 0 when
nothing before it trains (stage 1's frozen encoder). Only real tokens count, never padding.

Peak: ``peak_tflops`` from config wins; else a table of dense bf16 peaks by GPU name (H100/H200
SXM 989, A100 312, ...); on CPU the best of a few fp32 matmuls measured at start-up (the
achievable matmul rate, so CPU MFU reads "fraction of this core's matmul throughput").
"""
from __future__ import annotations

import time

GPU_PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
                        "A10G": 125.0, "L4": 121.0, "RTX 4090": 165.0}
PARTS = ("encoder", "downsampler", "projector", "llm")


def full_numel(t) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (its shard is then empty)."""
    return int(getattr(t, "ds_numel", t.numel()))


def matmul_params(module) -> int:
    import torch

    return sum(full_numel(m.weight) for m in module.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight is not None)


class StepFlops:
    """Per-part FLOP coefficients of one model, fixed at construction."""

    def __init__(self, model, trainable: list[str]):
        self.params = {p: matmul_params(getattr(model, p)) for p in PARTS}
        self.backward = {}
        upstream = False
        for p in PARTS:
            own = p in trainable and any(q.requires_grad for q in getattr(model, p).parameters())
            self.backward[p] = 2.0 if own else (1.0 if upstream else 0.0)
            upstream = upstream or own
        enc = model.encoder
        self.enc_layers = len(getattr(enc, "layers", [])) or getattr(getattr(enc, "config", None), "num_hidden_layers", 0)
        self.enc_width, self.enc_tokens = enc.hidden_size, enc.num_tokens
        cfg = model.llm.config
        self.llm_layers, self.llm_width = cfg.num_hidden_layers, cfg.hidden_size
        self.visual_per_crop = model.tokens_per_crop

    def __call__(self, crops: int, seq_lengths: list[int]) -> float:
        """FLOPs of forward + backward for ``crops`` image crops and LLM sequences of these
        (spliced, unpadded) lengths."""
        vit_tokens = crops * self.enc_tokens
        fwd = {
            "encoder": 2.0 * self.params["encoder"] * vit_tokens
            + crops * self.enc_layers * 4.0 * self.enc_tokens ** 2 * self.enc_width,
            "downsampler": 2.0 * self.params["downsampler"] * crops * self.visual_per_crop,
            "projector": 2.0 * self.params["projector"] * crops * self.visual_per_crop,
            "llm": 2.0 * self.params["llm"] * sum(seq_lengths)
            + sum(self.llm_layers * 4.0 * s * s * self.llm_width for s in seq_lengths),
        }
        return sum(f * (1.0 + self.backward[p]) for p, f in fwd.items())

    def attention(self, crops: int, seq_lengths: list[int], causal_work: bool = False) -> float:
        """The attention-score part of ``self(crops, seq_lengths)`` (QK^T and AV, forward + backward);
        ``causal_work``: the LLM's causal half that a flash kernel actually computes instead of
        the counted full square. The rest of a step's model FLOPs are matmuls with weights."""
        enc = crops * self.enc_layers * 4.0 * self.enc_tokens ** 2 * self.enc_width
        llm = sum(self.llm_layers * 4.0 * s * s * self.llm_width for s in seq_lengths) * (0.5 if causal_work else 1.0)
        return enc * (1.0 + self.backward["encoder"]) + llm * (1.0 + self.backward["llm"])


def device_peak_flops(device, peak_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one worker's device, where the figure came from)."""
    import torch

    if peak_tflops:
        return float(peak_tflops) * 1e12, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS_BF16.items():
            if key in name:
                return tflops * 1e12, f"table ({name}, dense bf16)"
        return float("nan"), f"unknown GPU {name}: set train.mfu.peak_tflops"
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best, f"measured fp32 matmul ({torch.get_num_threads()} threads)"
