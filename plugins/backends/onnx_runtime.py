"""``onnxruntime``: the model as static-shape ONNX graphs run by ONNX Runtime (CPU provider).

    backend: {name: onnxruntime, opset: 17, threads: 0, export_dir: null}

This is the route a phone NPU SDK takes: export, (quantise), compile for fixed shapes, run.
The graphs form the versioned export the device runner reads (plugins/backends/export.py), and
cases run through the runner's own pipeline (bluelm_v/runner.py: preprocessing, vision calls,
splice, chunked prefill, decode), so this backend measures in-process exactly what the ssh and
adb backends run on a device. Graphs (plugins/backends/onnx_export.py), exported on first use
and cached per shape:
  vision_b{B}      encoder + downsampler + projector for exactly B = tiles_per_batch tiles
                   (a last, smaller group is zero-padded to B, as a fixed-shape NPU graph needs)
  llm_r{R}_m{M}    one LLM step of R rows over a static KV buffer of M positions: R = the
                   prefill chunk (the prompt's tail is padded) and R = 1 for decode
``load_s`` of a case = building the torch model + exporting, quantising and compiling the three
graphs it uses (measured when each was first made).
Quantizer settings: a part whose weights the setting makes integer (see precision.py) gets
ONNX Runtime's dynamic INT8 quantisation (MatMulInteger). INT4 (MatMulNBits) needs the extra
package onnx_ir, so INT4 parts also run as INT8 here; ``ort_weights`` in the results says what ran.
KV-cache and activation settings are not modelled (fp32 cache, fp32 activations).

Each case also checks the ONNX outputs against torch on the same fp32 weights: visual tokens,
last-position prefill logits, and the greedy tokens (``check_*`` fields; ``check_ok`` uses
``check_rtol`` of the reference's scale, ``check_rtol_quantized`` for INT8 graphs).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .inputs import PeakSampler, prompt_for, synthetic_image
from .precision import precision_plan
from ..quantizers import quantizer_nodes


class OnnxRuntimeBackend:
    """ONNX export of encoder+projector and LLM prefill/decode steps, run by ONNX Runtime."""

    kind = "real"

    def __init__(self, opset: int = 17, threads: int = 0, export_dir: str | None = None,
                 check_outputs: bool = True, check_rtol: float = 1e-3, check_rtol_quantized: float = 0.1):
        self.opset, self.threads, self.export_dir = int(opset), int(threads), export_dir
        self.check_outputs, self.check_rtol, self.check_rtol_q = check_outputs, check_rtol, check_rtol_quantized
        self.model = self.pipeline = None

    def load(self, cfg, registry) -> dict:
        import onnxruntime

        from bluelm_v.model import BlueLMV
        from bluelm_v.runner import Pipeline

        from .export import Export

        t0 = time.perf_counter()
        self._tmp = None if self.export_dir else tempfile.TemporaryDirectory(prefix="bluelm_v_onnx_")
        self.dir = Path(self.export_dir or self._tmp.name)
        self.registry = registry
        self.model = BlueLMV.from_config(cfg, registry).float().eval()
        self.hf = self.model.llm.model
        self.export = Export(self.model, self.dir, self.opset)
        self.pipeline = Pipeline(str(self.dir), self.threads)
        self.load_s = time.perf_counter() - t0
        return {"load_s": self.load_s, "onnxruntime": onnxruntime.__version__, "export_dir": str(self.dir)}

    def describe(self) -> dict:
        import onnxruntime

        return {"backend": "onnxruntime", "kind": self.kind, "provider": "CPUExecutionProvider",
                "compute_unit": "cpu", "onnxruntime": onnxruntime.__version__, "opset": self.opset}

    # -- one case --------------------------------------------------------------------------
    def run_case(self, case: dict) -> dict:
        import torch

        refuse_unsupported(self.registry, case.get("quantizer"))

        from bluelm_v import chat
        from bluelm_v.runner import cache_length, crop_count, preprocess, read_manifest

        plan = precision_plan(case.get("quantizer"))
        v8, l8 = plan["encoder"].weight_bits < 16, plan["llm"].weight_bits < 16
        tpb, chunk, n_new = int(case["tiles_per_batch"]), int(case["prefill_chunk"]), int(case["decode_tokens"])
        int8 = tuple(p for p, q in (("vision", v8), ("llm", l8)) if q)
        image = synthetic_image(*case["image"], seed=int(case.get("seed") or 0))
        grid = self.model.tiler.select(*image.size)
        spec = self.export.manifest["preprocess"]
        visual = crop_count(grid, spec) * self.model.tokens_per_crop
        tok = self.model.tokenizer
        prompt, length = prompt_for(lambda p: len(chat.prompt_ids(tok, p)), visual, int(case["prompt_tokens"]))
        ids = chat.prompt_ids(tok, prompt)
        made = self.export.ensure(tpb, chunk, cache_length(length, chunk, n_new), int8)
        if made:                                          # the runner's pipeline reads the grown manifest
            self.pipeline.manifest = read_manifest(str(self.dir))
        before = self.pipeline.load_s
        self.pipeline.prepare(tpb, chunk, cache_length(length, chunk, n_new), int8)   # outside the timed part
        self.load_s += self.pipeline.load_s - before + sum(self.export.made_s.pop(f) for f in made)
        with PeakSampler() as mem:
            t0 = time.perf_counter()
            pixels = preprocess(image, grid, spec)                                   # [K,3,S,S]
            out = self.pipeline.run(pixels, ids, tpb, chunk, n_new, int8, started=t0)
        tokens = out.pop("tokens")
        features, first_logits = out.pop("features"), out.pop("first_logits")
        metrics = {**out, "grid": "{}:{}".format(*grid), "load_s": self.load_s, "peak_memory_mb": mem.peak_mb,
                   "ort_weights": {"vision": "int8" if v8 else "fp32", "llm": "int8" if l8 else "fp32"},
                   "tokens": tokens, "text": self.pipeline.decode_text(tokens), "simulated": False}
        if self.check_outputs:
            with torch.no_grad():
                embeds = self.model.splice(torch.tensor([ids]), [torch.from_numpy(features)]).embeds.numpy()
            metrics.update(self._check(torch.from_numpy(pixels), features, embeds, first_logits, tokens, v8 or l8))
        return metrics

    def _check(self, pixels, features, embeds, logits, tokens, quantized: bool) -> dict:
        """Torch on the same fp32 weights: visual tokens, prefill logits, greedy tokens."""
        import torch

        with torch.no_grad():
            ref_feat = self.model.encode_images(pixels.float()).float()           # [K*T', D]
            emb = torch.from_numpy(embeds)
            out = self.hf(inputs_embeds=emb, use_cache=True, logits_to_keep=1)
            ref_logits, cache = out.logits[0, -1].float(), out.past_key_values
            ref_tokens = [int(ref_logits.argmax())]
            for _ in range(len(tokens) - 1):
                out = self.hf(input_ids=torch.tensor([[ref_tokens[-1]]]), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                ref_tokens.append(int(out.logits[0, -1].argmax()))
        feat_diff = float(abs(torch.from_numpy(features) - ref_feat).max())
        logit_diff = float(abs(torch.from_numpy(logits) - ref_logits).max())
        rtol = self.check_rtol_q if quantized else self.check_rtol
        ok = feat_diff <= rtol * max(1.0, float(ref_feat.abs().max())) and \
            logit_diff <= rtol * max(1.0, float(ref_logits.abs().max()))
        return {"check_features_max_abs_diff": feat_diff, "check_max_abs_diff": logit_diff,
                "check_first_token_match": tokens[0] == ref_tokens[0],
                "check_tokens_match": sum(a == b for a, b in zip(tokens, ref_tokens)) / len(tokens), "check_ok": ok}

    def close(self) -> None:
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.sessions.clear()
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None


UNSUPPORTED = {"a16": "INT16 activation rounding", "kv8": "an INT8 KV cache"}


def refuse_unsupported(registry, quantizer) -> None:
    """ConfigError when the case's quantizer asks for what these graphs do not run (a16, kv8):
    the graphs keep fp32 activations and an fp32 KV buffer, so the setting would be ignored."""
    from bluelm_v.errors import ConfigError

    for node in quantizer_nodes(quantizer):
        q = registry.create_from_config("quantizer", node, "case.quantizer")
        for step in getattr(q, "steps", [q]):
            if step.name in UNSUPPORTED:
                raise ConfigError(f"backend onnxruntime cannot run quantizer setting {step.name} "
                                  f"({UNSUPPORTED[step.name]}; from quantizer '{q.name}'): its graphs keep "
                                  f"fp32 activations and KV buffers. Use backend local_torch for it, or a "
                                  f"quantizer without {step.name}")
