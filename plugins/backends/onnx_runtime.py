"""``onnxruntime``: the model as static-shape ONNX graphs run by ONNX Runtime (CPU provider).

    backend: {name: onnxruntime, opset: 17, threads: 0, export_dir: null}

This is the route a phone NPU SDK takes: export, (quantise), compile for fixed shapes, run.
Graphs (plugins/backends/onnx_export.py), exported on first use and cached per shape:
  vision_b{B}      encoder + downsampler + projector for exactly B = tiles_per_batch tiles
                   (a last, smaller group is zero-padded to B, as a fixed-shape NPU graph needs)
  llm_r{R}_m{M}    one LLM step of R rows over a static KV buffer of M positions: R = the
                   prefill chunk (the prompt's tail is padded) and R = 1 for decode
``load_s`` of a case = building the torch model + exporting, quantising and compiling the three
graphs it uses (measured when each was first made).
Quantizer settings: a part whose weights the setting makes integer (see precision.py) gets
ONNX Runtime's dynamic INT8 quantisation (MatMulInteger). INT4 (MatMulNBits) needs the extra
package onnx_ir, so INT4 parts also run as INT8 here; ``ort_weights`` in the results says what ran.
``a16`` (also inside bluelm_mixed) is exported into the graphs: the quantizer's own rounding
hooks are on the torch modules while they are traced, so each targeted linear layer's input is
rounded in the graph (an INT8 graph then also rounds activations to 8 bits, per MatMulInteger).
``kv8`` rounds every new K/V row to INT8 codes x fp16 scales in the graph, the values an INT8
cache holds; the buffer passed between steps stays fp32. ``ort_a16`` (the parts rounded) and
``ort_kv8`` in the results say what ran. Graphs are cached per setting.

Each case also checks the ONNX outputs against torch on the same fp32 weights: visual tokens,
last-position prefill logits, and the greedy tokens (``check_*`` fields; ``check_ok`` uses
``check_rtol`` of the reference's scale, ``check_rtol_quantized`` for INT8 graphs).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .inputs import PeakSampler, prompt_for, synthetic_image
from .local_torch import _nodes
from .precision import precision_plan

VISION_PARTS = ("encoder", "downsampler", "projector")


class OnnxRuntimeBackend:
    """ONNX export of encoder+projector and LLM prefill/decode steps, run by ONNX Runtime."""

    kind = "real"

    def __init__(self, opset: int = 17, threads: int = 0, export_dir: str | None = None,
                 check_outputs: bool = True, check_rtol: float = 1e-3, check_rtol_quantized: float = 0.1):
        self.opset, self.threads, self.export_dir = int(opset), int(threads), export_dir
        self.check_outputs, self.check_rtol, self.check_rtol_q = check_outputs, check_rtol, check_rtol_quantized
        self.sessions: dict = {}
        self.model = None

    def load(self, cfg, registry) -> dict:
        import torch

        from bluelm_v.model import BlueLMV

        t0 = time.perf_counter()
        self._tmp = None if self.export_dir else tempfile.TemporaryDirectory(prefix="bluelm_v_onnx_")
        self.dir = Path(self.export_dir or self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.model = BlueLMV.from_config(cfg, registry).float().eval()
        self.hf = self.model.llm.model
        self.table = self.hf.get_input_embeddings().weight.detach().float().numpy()   # [V, D]
        torch.manual_seed(0)
        self.load_s = time.perf_counter() - t0
        import onnxruntime
        return {"load_s": self.load_s, "onnxruntime": onnxruntime.__version__, "export_dir": str(self.dir)}

    def describe(self) -> dict:
        import onnxruntime

        return {"backend": "onnxruntime", "kind": self.kind, "provider": "CPUExecutionProvider",
                "onnxruntime": onnxruntime.__version__, "opset": self.opset}

    # -- graphs ----------------------------------------------------------------------------
    def _session(self, name: str, export, int8: bool):
        import onnxruntime as ort

        key = (name, int8)
        if key not in self.sessions:
            t0 = time.perf_counter()
            path = self.dir / f"{name}.onnx"
            if not path.exists():
                export(path)
            if int8:
                from onnxruntime.quantization import QuantType, quantize_dynamic
                qpath = self.dir / f"{name}.int8.onnx"
                if not qpath.exists():
                    logging.disable(logging.WARNING)     # it logs every tensor it cannot infer
                    try:
                        quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
                    finally:
                        logging.disable(logging.NOTSET)
                path = qpath
            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.sessions[key] = (session, time.perf_counter() - t0)
        return self.sessions[key]

    def _vision(self, tiles: int, int8: bool, tag: str = ""):
        from .onnx_export import export_vision
        return self._session(f"vision_b{tiles}{tag}", lambda p: export_vision(self.model, tiles, p, self.opset), int8)

    def _llm(self, rows: int, max_len: int, int8: bool, tag: str = "", kv8: bool = False):
        from .onnx_export import export_llm_step
        return self._session(f"llm_r{rows}_m{max_len}{tag}{'_kv8' if kv8 else ''}",
                             lambda p: export_llm_step(self.hf, rows, max_len, p, self.opset, kv8), int8)

    @contextmanager
    def _emulated(self, quantizer):
        """The case's a16 hooks on the torch model (traced into graphs made meanwhile) ->
        (parts rounded, graph-name tag, kv8); the hooks are removed afterwards."""
        from bluelm_v.nn.activation_quant import activation_quant_of, remove_activation_quant

        steps = []
        for node in _nodes(quantizer):
            q = self.registry.create_from_config("quantizer", node, "case.quantizer")
            steps += getattr(q, "steps", [q])
        a16 = [s for s in steps if s.name == "a16"]
        try:
            for step in a16:
                step.apply(self.model)
            parts = [p for p in (*VISION_PARTS, "llm")
                     if any(activation_quant_of(m) is not None for m in getattr(self.model, p).modules())]
            digest = hashlib.sha1(json.dumps([s.settings() for s in a16], sort_keys=True).encode()).hexdigest()[:8]
            yield parts, f"_a{digest}", any(s.name == "kv8" for s in steps)
        finally:
            for m in self.model.modules():
                remove_activation_quant(m)

    # -- one case --------------------------------------------------------------------------
    def run_case(self, case: dict) -> dict:
        with self._emulated(case.get("quantizer")) as settings:
            return self._run_case(case, *settings)

    def _run_case(self, case: dict, a16_parts: list, tag: str, kv8: bool) -> dict:
        import numpy as np
        import torch

        from bluelm_v import chat

        plan = precision_plan(case.get("quantizer"))
        v8, l8 = plan["encoder"].weight_bits < 16, plan["llm"].weight_bits < 16
        v_tag = tag if set(a16_parts) & set(VISION_PARTS) else ""
        l_tag = tag if "llm" in a16_parts else ""
        tpb, chunk, n_new = int(case["tiles_per_batch"]), int(case["prefill_chunk"]), int(case["decode_tokens"])
        image = synthetic_image(*case["image"], seed=int(case.get("seed") or 0))
        crops = self.model.tiler.transform(image)
        pixels = crops.pixels.float().numpy()                                   # [K,3,S,S]
        tok = self.model.tokenizer
        prompt, _ = prompt_for(lambda p: len(chat.prompt_ids(tok, p)), crops.n_crops * self.model.tokens_per_crop,
                               int(case["prompt_tokens"]))
        ids = chat.prompt_ids(tok, prompt)
        length = len(ids) - 1 + crops.n_crops * self.model.tokens_per_crop    # the sentinel becomes K*T'
        max_len = -(-length // chunk) * chunk + max(n_new, 1)
        graphs = [self._vision(tpb, v8, v_tag), self._llm(chunk, max_len, l8, l_tag, kv8),
                  self._llm(1, max_len, l8, l_tag, kv8)]
        (vision, _), (prefill, _), (decode, _) = graphs     # exported + compiled outside the timed region
        with PeakSampler() as mem:
            t0 = time.perf_counter()
            groups = []
            for s in range(0, len(pixels), tpb):
                g = pixels[s:s + tpb]
                pad = np.zeros((tpb - len(g),) + g.shape[1:], np.float32)
                out = vision.run(None, {"pixels": np.concatenate([g, pad]) if len(pad) else g})[0]
                groups.append(out[: len(g) * self.model.tokens_per_crop])     # [g*T', D]
            features = np.concatenate(groups)                                 # [K*T', D]
            t_enc = time.perf_counter()
            with torch.no_grad():
                embeds = self.model.splice(torch.tensor([ids]), [torch.from_numpy(features)]).embeds.numpy()
            assert embeds.shape[1] == length, (embeds.shape, length)
            t_pre = time.perf_counter()
            padded = np.zeros((1, max_len - max(n_new, 1), embeds.shape[2]), np.float32)
            padded[:, :length] = embeds
            shape = tuple(prefill.get_inputs()[1].shape)                      # [L, KV, M, d]
            k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            for s in range(0, length, chunk):
                last = min(length - 1 - s, chunk - 1)
                logits, k, v = prefill.run(None, {"embeds": padded[:, s:s + chunk], "k_cache": k, "v_cache": v,
                                                  "start": np.array([s]), "last": np.array([last])})
            token = int(logits[0].argmax())
            t_first = time.perf_counter()
            tokens, first_logits = [token], logits[0]
            for pos in range(length, length + n_new - 1):
                logits, k, v = decode.run(None, {"embeds": self.table[token][None, None], "k_cache": k, "v_cache": v,
                                                 "start": np.array([pos]), "last": np.array([0])})
                token = int(logits[0].argmax())
                tokens.append(token)
            t_end = time.perf_counter()
        metrics = {"grid": "{}:{}".format(*crops.grid), "crops": crops.n_crops, "visual_tokens": len(features),
                   "prompt_tokens": length, "load_s": self.load_s + sum(s for _, s in graphs), "encode_s": t_enc - t0,
                   "prefill_s": t_first - t_pre, "prefill_tokens_per_s": length / max(t_first - t_pre, 1e-9),
                   "ttft_s": t_first - t0, "decode_tokens": len(tokens),
                   "decode_tokens_per_s": (len(tokens) - 1) / (t_end - t_first) if len(tokens) > 1 else None,
                   "peak_memory_mb": mem.peak_mb, "ort_weights": {"vision": "int8" if v8 else "fp32",
                                                                  "llm": "int8" if l8 else "fp32"},
                   "ort_a16": a16_parts, "ort_kv8": kv8, "simulated": False}
        if self.check_outputs:
            metrics.update(self._check(crops.pixels, features, embeds, first_logits, tokens, v8 or l8, kv8))
        return metrics

    def _check(self, pixels, features, embeds, logits, tokens, quantized: bool, kv8: bool = False) -> dict:
        """Torch on the same fp32 weights and the same a16/kv8 settings: visual tokens, prefill
        logits, greedy tokens."""
        import torch

        cache = None
        if kv8:
            from bluelm_v.nn.kv_cache_hf import Int8KVCache
            cache = Int8KVCache(max_tokens=embeds.shape[1] + len(tokens))
        with torch.no_grad():
            ref_feat = self.model.encode_images(pixels.float()).float()           # [K*T', D]
            emb = torch.from_numpy(embeds)
            out = self.hf(inputs_embeds=emb, use_cache=True, logits_to_keep=1, past_key_values=cache)
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
        self.sessions.clear()
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None
