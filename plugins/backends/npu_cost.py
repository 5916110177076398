"""A roofline cost model of a phone SoC running BlueLM-V (pure Python: no torch, no state).

Every NPU call (one execution of a compiled graph) costs

    call_overhead + sum over its ops of max(compute, memory)
    compute = flops / (peak[path] * util_rows(rows) * util_batch(items))
    memory  = (weights streamed + KV cache read + spilled activations) / (bandwidth * efficiency)

    util_rows(M)  = M / (M + rows_half)      filling the MAC array needs many rows per matmul
    util_batch(b) = b / (b + batch_half)     independent items (tiles) spread over the cores
    path          = fp16 when activations are floating point, else int4 / int8 by weight bits

On-chip memory: an intermediate tensor that fits in ``on_chip_mb`` stays on chip; one that does
not is placed in DRAM and every access to it is DRAM traffic. The largest intermediate is an attention
score tensor [items, heads, rows, keys], accessed 4 times (QK^T writes it, softmax reads and
rewrites it, the AV product reads it). NPU graphs have static shapes: a prefill chunk always has
``chunk`` rows (the last one padded) and attends over the whole KV buffer.

The patch-embedding Conv2D runs on the CPU at ``cpu_conv_gflops``; with pipelining, the conv of
tile group k+1 overlaps the NPU call of group k (an exact two-resource schedule, below), of which
``pipeline_overlap`` (0..1, a measured fraction) is realised: encode = serial - overlap x (serial -
ideal schedule). 1 is two independent units; 0 is what one shared unit shows (a GPU, one CPU).
None of this knows about particular tile counts or chunk sizes: optima come out of the sums.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

SCORE_ACCESSES = 4  # QK^T write, softmax read + write, AV read


@dataclass(frozen=True)
class NpuProfile:
    """Parameters of one SoC (see conf/backend/dimensity9300.yaml for the calibrated one)."""

    memory_bandwidth_gbps: float = 76.8     # DRAM peak (LPDDR5T-9600 x 64 bit)
    bandwidth_efficiency: float = 0.6       # fraction of it an NPU stream achieves
    fp16_tflops: float = 5.0                # MAC throughput per compute path
    int8_tops: float = 10.0
    int4_tops: float = 20.0
    rows_half: float = 16.0                 # util_rows(rows_half) = 0.5
    batch_half: float = 0.5                 # util_batch(batch_half) = 0.5
    call_overhead_ms: float = 2.0           # per graph execution (dispatch, sync, I/O)
    on_chip_mb: float = 8.0                 # activation memory on chip
    cpu_conv_gflops: float = 25.0           # patch-embedding Conv2D on the CPU
    pipeline_overlap: float = 1.0           # fraction of the ideal conv/ViT overlap realised
    storage_read_gbps: float = 3.5          # model load from flash (UFS)
    runtime_base_mb: float = 150.0          # the runtime process itself (peak memory)

    @classmethod
    def from_dict(cls, values: dict) -> "NpuProfile":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown NPU profile parameter(s) {unknown}; known: {sorted(known)}")
        bad = [k for k, v in values.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0]
        if bad:
            raise ValueError(f"NPU profile parameter(s) {bad} must be non-negative numbers")
        return cls(**{k: float(v) for k, v in values.items()})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Precision:
    """Bits of one part: weights, activations (float or integer) -> its compute path."""

    weight_bits: int = 16
    act_bits: int = 16
    act_float: bool = True

    @property
    def path(self) -> str:
        if self.act_float:
            return "fp16"
        return "int4" if self.weight_bits <= 4 else "int8"

    @property
    def weight_bytes(self) -> float:
        return self.weight_bits / 8

    @property
    def act_bytes(self) -> float:
        return self.act_bits / 8


@dataclass(frozen=True)
class Op:
    """One operator of an NPU call."""

    name: str
    flops: float
    rows: int                  # rows of the matmul (tokens in the call, per item for attention)
    items: int                 # independent items (tiles) in the call
    path: str
    dram_bytes: float = 0.0    # weights / KV cache it must read from DRAM
    spill_bytes: float = 0.0   # intermediate bytes above on-chip capacity x accesses


class CostModel:
    def __init__(self, profile: NpuProfile):
        self.p = profile

    # -- primitives ------------------------------------------------------------------------
    def peak(self, path: str) -> float:
        return {"fp16": self.p.fp16_tflops, "int8": self.p.int8_tops, "int4": self.p.int4_tops}[path] * 1e12

    def util(self, rows: int, items: int) -> float:
        return rows / (rows + self.p.rows_half) * items / (items + self.p.batch_half)

    def spill(self, tensor_bytes: float, accesses: int) -> float:
        """DRAM traffic of an intermediate tensor: none while it fits on chip; once it does not,
        the compiler places it in DRAM and every access goes there."""
        return tensor_bytes * accesses if tensor_bytes > self.p.on_chip_mb * 1e6 else 0.0

    def op_time(self, op: Op) -> float:
        compute = op.flops / (self.peak(op.path) * self.util(op.rows, op.items))
        bandwidth = self.p.memory_bandwidth_gbps * 1e9 * self.p.bandwidth_efficiency
        memory = (op.dram_bytes + op.spill_bytes) / bandwidth
        return max(compute, memory)

    def call_time(self, ops: list[Op]) -> float:
        return self.p.call_overhead_ms * 1e-3 + sum(self.op_time(op) for op in ops)

    # -- graphs ----------------------------------------------------------------------------
    def _attention(self, shape, items: int, rows: int, keys: int, prec: Precision, kv_read: float) -> Op:
        flops = 4.0 * items * rows * keys * shape.heads * shape.head_dim      # QK^T and AV
        scores = items * shape.heads * rows * keys * prec.act_bytes           # [b, h, rows, keys]
        return Op("attention", flops, rows, items, prec.path, kv_read, self.spill(scores, SCORE_ACCESSES))

    def _linears(self, linears, rows_total: int, items: int, prec: Precision, prefix: str = "") -> list[Op]:
        return [Op(prefix + lin.name, lin.flops(rows_total), rows_total, items, prec.path,
                   lin.params * prec.weight_bytes) for lin in linears]

    def vit_call(self, enc, tiles: int, prec: Precision) -> list[Op]:
        """The transformer layers of ``tiles`` tiles in one call (tiles attend only to themselves)."""
        t = enc.tokens_per_item
        per_layer = self._linears(enc.block, tiles * t, tiles, prec) + [self._attention(enc, tiles, t, t, prec, 0.0)]
        return per_layer * enc.layers

    def projector_call(self, proj_linears, tokens: int, prec: Precision) -> list[Op]:
        return self._linears(proj_linears, tokens, 1, prec, "projector.")

    def llm_call(self, llm, rows: int, kv_len: int, prec: Precision, kv_bits: int, head_rows: int) -> list[Op]:
        """One LLM graph execution: ``rows`` new tokens attending over a static ``kv_len`` buffer;
        ``head_rows`` of them go through the lm_head (1 for decode and for the last chunk)."""
        kv_read = kv_len * llm.kv_bytes_per_token(kv_bits) / llm.layers
        per_layer = self._linears(llm.block, rows, 1, prec) + [self._attention(llm, 1, rows, kv_len, prec, kv_read)]
        ops = per_layer * llm.layers
        if head_rows:
            ops += self._linears(llm.per_output, head_rows, 1, prec)
        return ops

    # -- stages ----------------------------------------------------------------------------
    def conv_time(self, enc, tiles: int) -> float:
        return enc.patch.flops(tiles * enc.tokens_per_item) / (self.p.cpu_conv_gflops * 1e9)

    def encode(self, enc, proj_linears, tokens_out: int, tiles: int, tiles_per_batch: int,
               prec: Precision, pipelined: bool = True) -> dict:
        """Encode ``tiles`` tiles ``tiles_per_batch`` at a time, then project the visual tokens.
        Two resources: the CPU runs the convs in order, the NPU the ViT calls in order; call k
        needs conv k done. Without pipelining they alternate."""
        groups = [min(tiles_per_batch, tiles - s) for s in range(0, tiles, tiles_per_batch)]
        conv = [self.conv_time(enc, g) for g in groups]
        vit = [self.call_time(self.vit_call(enc, g, prec)) for g in groups]
        cpu_free = npu_free = 0.0
        for c, v in zip(conv, vit):
            start_conv = cpu_free if pipelined else max(cpu_free, npu_free)
            cpu_free = start_conv + c
            npu_free = max(npu_free, cpu_free) + v
        project = self.call_time(self.projector_call(proj_linears, tokens_out * tiles, prec))
        serial = sum(conv) + sum(vit)
        hidden = min(self.p.pipeline_overlap, 1.0) * (serial - npu_free)
        return {"encode_s": serial - hidden + project, "vit_calls_s": vit, "conv_s": sum(conv),
                "project_s": project, "groups": groups, "hidden_by_pipeline_s": hidden}

    def prefill(self, llm, prompt_tokens: int, chunk: int, kv_len: int, prec: Precision, kv_bits: int) -> dict:
        calls = math.ceil(prompt_tokens / chunk)
        body = self.call_time(self.llm_call(llm, chunk, kv_len, prec, kv_bits, head_rows=0))
        head = self.call_time(self._linears(llm.per_output, 1, 1, prec))
        return {"prefill_s": calls * body + head, "prefill_calls": calls, "chunk_call_s": body}

    def decode_step(self, llm, kv_len: int, prec: Precision, kv_bits: int) -> float:
        return self.call_time(self.llm_call(llm, 1, kv_len, prec, kv_bits, head_rows=1))

    def load(self, weight_bytes: float) -> float:
        return weight_bytes / (self.p.storage_read_gbps * 1e9)
