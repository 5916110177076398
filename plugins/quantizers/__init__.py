"""Quantizers: ``none``, ``w8``, ``w4``, ``kv8``, ``a16`` and the paper's composite ``bluelm_mixed``.

    quantizer: {name: bluelm_mixed}                     # ViT/projector INT8 (fp16 act.), LLM INT4 g64
                                                        # + INT16 activations, INT8 KV cache
    quantizer: {name: w4, group_size: 128, symmetric: true}
    q = registry.quantizer.create("w4", group_size=32); q.apply(model); q.save(model, "ckpt/")

Every quantizer rewrites layers IN PLACE, one layer at a time (``apply(model)``), stores real
packed weights (INT4: two codes per byte + fp16 scales/zeros per group), and saves/loads
safetensors files whose header records its settings (``save(model, dir)``, ``load(model, dir)``:
a file saved with other settings, a corrupted file or a layer shape that does not fit
is a clear error and nothing is half-loaded). Implementation: bluelm_v/nn/ and plugins/quantizers/ (torch is imported
only when a quantizer is created). Kernels per device: bluelm_v/nn/quant_linear.py.
"""
from __future__ import annotations

from bluelm_v import hookimpl

TARGETS = ("all", "encoder", "downsampler", "projector", "llm")
GROUP_SIZES = (32, 64, 128)
KERNELS = ("auto", "cpu_fused", "cpu_tiled", "cpu_bf16", "cpu_lowp", "dequant", "torch_int8pack", "torch_int4pack",
           "compiled", "ort")
BAD_SHAPE = ("error", "skip", "smaller_group")


def _check_targets(targets) -> list:
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"targets: {bad} are not model parts; use any of {list(TARGETS)}")
    return list(targets)


def none(targets: list = ("all",)):
    """No quantisation: fp32 weights, fp activations and KV cache."""
    from bluelm_v.plugins.quantizers.schemes import Quantizer

    return Quantizer(_check_targets(targets))


def w8(targets: list = ("encoder", "downsampler", "projector"), act_dtype: str = "fp32",
       embeddings: bool = False, skip: list = (), kernel: str = "auto"):
    """INT8 weights, per output channel, symmetric (act_dtype fp16 simulates FP16 activations)."""
    from bluelm_v.plugins.quantizers.schemes import W8

    return W8(_check_targets(targets), act_dtype, embeddings, skip, kernel)


def w4(targets: list = ("llm",), group_size: int = 64, symmetric: bool = False, embedding_bits: int | None = 8,
       on_bad_shape: str = "error", skip: list = (), kernel: str = "auto", refine: int = 0):
    """INT4 weights, group-wise (32/64/128), two per byte, fp16 scales (+ zeros if asymmetric)."""
    from bluelm_v.plugins.quantizers.schemes import W4

    return W4(_check_targets(targets), group_size, symmetric, embedding_bits, on_bad_shape, skip, kernel, refine)


def kv8(targets: list = ("llm",)):
    """INT8 KV cache with per-token, per-head scales (the runtime builds it for marked LLMs)."""
    from bluelm_v.plugins.quantizers.schemes import KV8

    return KV8(_check_targets(targets))


def a16(targets: list = ("llm",), bits: int = 16, granularity: str = "tensor", skip: list = ()):
    """INT16 activation fake-quantisation of every linear layer's input (NPU numerics)."""
    from bluelm_v.plugins.quantizers.schemes import A16

    return A16(_check_targets(targets), bits, granularity, skip)


def bluelm_mixed(llm_group_size: int = 64, llm_symmetric: bool = False, llm_embedding_bits: int | None = 8,
                 vision_act_dtype: str = "fp16", act_bits: int = 16, kv_cache: bool = True,
                 on_bad_shape: str = "error", kernel: str = "auto", llm_refine: int = 0):
    """The paper's scheme: encoder+projector w8 (fp16 activations), LLM w4 + a16, KV cache kv8.
    ``llm_refine``: least-squares refinements of each INT4 group's scale/zero (w4's ``refine``)."""
    from bluelm_v.plugins.quantizers.schemes import A16, KV8, W4, W8, Composite

    steps = [W8(["encoder", "downsampler", "projector"], vision_act_dtype, False, (), kernel),
             W4(["llm"], llm_group_size, llm_symmetric, llm_embedding_bits, on_bad_shape, (), kernel, llm_refine),
             A16(["llm"], act_bits, "tensor")]
    if kv_cache:
        steps.append(KV8(["llm"]))
    return Composite("bluelm_mixed", steps)


def quantizer_nodes(q) -> list[dict]:
    """A quantizer setting as written in a config or a benchmark case (None, a name, a node, an
    omegaconf node, or a list of those) -> a list of plain ``{name: ..., **params}`` nodes."""
    if q is None:
        return []
    if hasattr(q, "_metadata"):
        from omegaconf import OmegaConf
        q = OmegaConf.to_container(q, resolve=True)
    nodes = q if isinstance(q, (list, tuple)) else [q]
    return [{"name": n} if isinstance(n, str) else dict(n) for n in nodes]


def quantizer_label(q) -> str:
    """A quantizer node (or list of nodes) as one short label: ``w4(group_size=64)+kv8``."""
    nodes = quantizer_nodes(q)
    if not nodes:
        return "none"
    parts = []
    for n in nodes:
        extra = ",".join(f"{k}={v}" for k, v in sorted(n.items()) if k != "name")
        parts.append(f"{n.get('name')}({extra})" if extra else str(n.get("name")))
    return "+".join(parts)


@hookimpl
def bluelm_v_register(registry):
    q = registry.quantizer
    q.register("none", none)
    q.register("w8", w8, choices={"act_dtype": ("fp32", "fp16", "bf16"), "kernel": KERNELS})
    q.register("w4", w4, ranges={"refine": (0, 20)},
               choices={"group_size": GROUP_SIZES, "kernel": KERNELS, "on_bad_shape": BAD_SHAPE,
                        "embedding_bits": (4, 8, None)})
    q.register("kv8", kv8)
    q.register("a16", a16, ranges={"bits": (2, 24)}, choices={"granularity": ("tensor", "token")})
    q.register("bluelm_mixed", bluelm_mixed,
               ranges={"act_bits": (2, 24), "llm_refine": (0, 20)},
               choices={"llm_group_size": GROUP_SIZES, "vision_act_dtype": ("fp32", "fp16", "bf16"),
                        "llm_embedding_bits": (4, 8, None),
                        "kernel": KERNELS, "on_bad_shape": BAD_SHAPE})
