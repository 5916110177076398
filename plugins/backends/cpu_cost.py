"""A phone CPU running llama.cpp, as a roofline of the model's shapes (pure arithmetic, no torch).

    cpu = CpuProfile.from_dict(load_cpu_profile("dimensity9300_cpu"))
    row = llama_cpp_row(cpu, minicpm_v25_workload(registry), image=(768, 1536), prompt_tokens=2048)
    -> {"image_processing_s", "vision_load_s", "encode_s", "slices", "prefill_s", "decode_tokens_per_s", ...}

Every core computes at ``ghz x pipes x ops per pipe per cycle x kernel_efficiency``; llama.cpp
hands out matmul chunks dynamically, so the cores' rates add up. Paths: the ViT (mmproj, F16
weights) on FP16 FMLA (8 lanes x 2 flops per 128-bit pipe); the 4-bit LLM on int8 dot products
(llama.cpp's Q4 x Q8 kernels: SDOT, 16 MACs per 128-bit pipe). Decode reads every weight once per
token (the token-embedding rows excepted) plus the KV cache, at the DRAM bandwidth times
``bandwidth_efficiency``. Loading reads the file from flash at ``storage_read_gbps``.

MiniCPM-V 2.5's image slicing (LLaVA-UHD, as its image processor does it): ``ceil(w*h / 448^2)``
slices (at most 9), the grid among the factorisations of that count +-1 whose aspect ratio is
nearest the image's (log ratio), plus one overview image; each slice ~448^2 pixels -> 1024
patches of 14 px; the resampler turns each into 96 queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CpuCluster:
    cores: int
    ghz: float
    simd_pipes: int            # 128-bit SIMD pipes per core


@dataclass(frozen=True)
class CpuProfile:
    clusters: tuple[CpuCluster, ...]
    memory_bandwidth_gbps: float
    bandwidth_efficiency: float
    kernel_efficiency: float       # fraction of the SIMD peak llama.cpp's GEMMs sustain
    storage_read_gbps: float
    weight_bits: float = 4.5       # Q4_K_M-like: 4-bit codes + scales
    kv_bytes: float = 2.0          # f16 KV cache

    @classmethod
    def from_dict(cls, values: dict) -> "CpuProfile":
        values = dict(values)
        clusters = tuple(CpuCluster(**c) for c in values.pop("clusters"))
        values.pop("sources", None)
        return cls(clusters=clusters, **{k: float(v) for k, v in values.items()})

    def rate(self, ops_per_pipe_cycle: float) -> float:
        """Sustained ops/s of all cores on one kind of instruction."""
        peak = sum(c.cores * c.ghz * 1e9 * c.simd_pipes * ops_per_pipe_cycle for c in self.clusters)
        return peak * self.kernel_efficiency


FP16_FMLA_OPS = 16     # 8 fp16 lanes x (multiply + add) per 128-bit pipe per cycle
INT8_SDOT_OPS = 32     # 16 int8 MACs x 2 per 128-bit pipe per cycle


@dataclass(frozen=True)
class VlmWorkload:
    """What llama.cpp computes for one image and one prompt (shapes from workload.py)."""

    vision: object                     # StackShape of the ViT (tokens_per_item = patches per slice)
    resampler_flops_per_slice: float
    resampler_params: int
    llm: object                        # StackShape of the LLM
    queries_per_slice: int = 96
    slice_side: int = 448
    max_slices: int = 9
    extra: dict = field(default_factory=dict)


def minicpm_slices(width: int, height: int, side: int = 448, max_slices: int = 9) -> tuple[int, int]:
    """MiniCPM-V 2.5's slice grid (columns, rows) for an image; (1, 1) = no slicing."""
    ratio = width * height / (side * side)
    multiple = min(math.ceil(ratio), max_slices)
    if multiple <= 1:
        return (1, 1)
    log_ratio = math.log(width / height)
    best, err = (1, 1), float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slices:
            continue
        for m in range(1, count + 1):
            if count % m == 0:
                e = abs(log_ratio - math.log(m / (count // m)))
                if e < err:
                    best, err = (m, count // m), e
    return best


def _vit_flops(vit, tokens: int) -> float:
    per_token = 2.0 * vit.block_params
    attention = 4.0 * tokens * tokens * vit.heads * vit.head_dim
    return vit.layers * (tokens * per_token + attention) + vit.patch.flops(tokens)


def _llm_flops(llm, rows: int, context: int) -> float:
    """Prefill of ``rows`` tokens after ``context`` tokens: every block linear per token + QK^T/AV."""
    linear = 2.0 * rows * llm.block_params * llm.layers
    attention = 4.0 * llm.layers * llm.heads * llm.head_dim * rows * (context + (rows + 1) / 2)
    return linear + attention


def llama_cpp_row(cpu: CpuProfile, work: VlmWorkload, image: tuple[int, int], prompt_tokens: int) -> dict:
    """The paper's row for a llama.cpp VLM on a phone CPU: image processing (the vision model's
    load + encode of every slice and the overview), prefill of ``prompt_tokens``, decode."""
    m, n = minicpm_slices(*image, work.slice_side, work.max_slices)
    slices = m * n + (1 if m * n > 1 else 0)
    vit, llm = work.vision, work.llm
    vision_bytes = (vit.total_params + work.resampler_params) * 2.0            # F16 mmproj
    vision_load = vision_bytes / (cpu.storage_read_gbps * 1e9)
    encode = slices * (_vit_flops(vit, vit.tokens_per_item) + work.resampler_flops_per_slice) / cpu.rate(FP16_FMLA_OPS)
    prefill = _llm_flops(llm, prompt_tokens, 0) / cpu.rate(INT8_SDOT_OPS)
    head = sum(2.0 * lin.params for lin in llm.per_output) / cpu.rate(INT8_SDOT_OPS)
    weights = (llm.total_params - llm.embedding_params) * cpu.weight_bits / 8
    kv = (prompt_tokens + 1) * 2.0 * llm.layers * llm.kv_heads * llm.head_dim * cpu.kv_bytes
    step = (weights + kv) / (cpu.memory_bandwidth_gbps * 1e9 * cpu.bandwidth_efficiency)
    llm_load = (llm.total_params * cpu.weight_bits / 8) / (cpu.storage_read_gbps * 1e9)
    return {"slices": slices, "grid": f"{m}:{n}", "visual_tokens": slices * work.queries_per_slice,
            "vision_load_s": vision_load, "encode_s": encode, "image_processing_s": vision_load + encode,
            "prefill_s": prefill + head, "decode_tokens_per_s": 1.0 / step, "llm_load_s": llm_load,
            "decode_bytes_per_token": weights + kv}


def minicpm_v25_workload(registry, cache: bool = True) -> VlmWorkload:
    """MiniCPM-V 2.5's shapes, read from modules built on the meta device: SigLIP so400m at 448 px
    (penultimate layer: 26 of 27 blocks, 1024 patches), Llama3-8B (32 layers, 4096 wide, 32 heads,
    8 KV heads, MLP 14336, vocabulary 128256, untied), and a one-layer cross-attention resampler
    of 96 queries from 1152 to 4096."""
    from . import workload
    from ..llms import cache_dir

    nodes = {"encoder": {"name": "siglip", "preset": "so400m", "image_size": 448, "device": "meta"},
             "llm": {"name": "hf_causal", "preset": "bluelm_3b_proxy", "device": "meta", "config": LLAMA3_8B}}

    def measure() -> dict:                     # modules on the meta device: shapes, no memory
        import torch

        with torch.device("meta"):
            enc = registry.create_from_config("encoder", nodes["encoder"], "minicpm.encoder")
            llm = registry.create_from_config("llm", nodes["llm"], "minicpm.llm")
        return {"encoder": workload.encoder_shape(enc), "llm": workload.llm_shape(llm.model)}

    shapes = workload.cached_shapes(nodes, registry, measure, cache_dir() if cache else None)
    vision, lm = shapes["encoder"], shapes["llm"]
    d, q, kv_in, patches = LLAMA3_8B["hidden_size"], 96, vision.hidden, vision.tokens_per_item
    resampler_params = kv_in * d + 4 * d * d + q * d
    resampler_flops = 2.0 * (patches * kv_in * d + 2 * patches * d * d + 2 * q * d * d) + 4.0 * q * patches * d
    return VlmWorkload(vision=vision, resampler_flops_per_slice=resampler_flops, resampler_params=resampler_params,
                       llm=lm, queries_per_slice=q)


LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)


# The Dimensity 9300's CPU (MediaTek's announcement, 2023-11-06: 1x Cortex-X4 3.25 GHz, 3x Cortex-X4
# 2.85 GHz, 4x Cortex-A720 2.0 GHz; LPDDR5T-9600; UFS 4.0). SIMD pipes per core: 4 x 128-bit on
# the X4, 2 x 128-bit on the A720 (Arm's Cortex-X4 / A720 core descriptions). Assumed, not fitted:
# kernel_efficiency 0.5 of the SIMD peak for llama.cpp's F16 and Q4 x Q8 GEMMs. The DRAM
# efficiency is the simulated NPU's fitted one (the same memory system): pass it in.
DIMENSITY_9300_CPU = {
    "clusters": [{"cores": 1, "ghz": 3.25, "simd_pipes": 4}, {"cores": 3, "ghz": 2.85, "simd_pipes": 4},
                 {"cores": 4, "ghz": 2.0, "simd_pipes": 2}],
    "memory_bandwidth_gbps": 76.8, "kernel_efficiency": 0.5, "storage_read_gbps": 4.2,
}
