"""``local_torch``: this host (CPU, or CUDA when present) running the real runtime.

    backend: {name: local_torch, device: auto, threads: 0, check_outputs: true}

load(cfg) builds the configured BlueLMV (tiler, encoder, downsampler, projector, llm) and a
:class:`bluelm_v.runtime.Generator`. A case's ``quantizer`` (absent: the top-level ``quantizer``
node) is applied with the registered quantizer; switching settings rebuilds the model from its
config first, so only one variant is ever in memory. Per case the steps the paper reports are
timed on a synthetic image of the case's size and a prompt padded to ``prompt_tokens``:
encode (batched ``tiles_per_batch``, pipelined patch embedding), chunked prefill, TTFT,
``decode_tokens`` greedy steps, peak RSS during the case.

Output check (``check_outputs``), outside the timed region, against a straightforward
reference on the same weights: image features from one tile at a time without pipelining,
and last-position logits from a single unchunked forward of the transformers model. Recorded:
``check_features_max_abs_diff``, ``check_max_abs_diff`` (logits), ``check_first_token_match``,
``check_ok`` (both diffs within ``check_rtol`` of the reference's scale; ``check_rtol_kv_quantized``
when the setting quantises the KV cache, which the runtime's engine applies and the unchunked
reference forward does not).
"""
from __future__ import annotations

import time

from bluelm_v.errors import ConfigError

from .inputs import PeakSampler, prompt_for, synthetic_image
from .precision import precision_plan
from ..quantizers import quantizer_nodes as _nodes

UNSET = object()


class LocalTorch:
    """This host (CPU, or CUDA if present): the real runtime with the configured quantizer."""

    kind = "real"

    def __init__(self, device: str = "auto", threads: int = 0, check_outputs: bool = True,
                 engine: str = "auto", check_rtol: float = 1e-3, check_rtol_kv_quantized: float = 0.05):
        self.device, self.threads, self.check_outputs = device, int(threads), check_outputs
        self.engine, self.check_rtol, self.check_rtol_kv = engine, float(check_rtol), float(check_rtol_kv_quantized)
        self.cfg = self.registry = self.model = self.gen = None
        self._variant = UNSET
        self._reference: dict = {}

    # -- building ---------------------------------------------------------------------------
    def _torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def load(self, cfg, registry) -> dict:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.cfg, self.registry = cfg, registry
        info = self._build(cfg.get("quantizer"))
        return {**info, "torch_threads": torch.get_num_threads(), "device": self._torch_device()}

    def _build(self, quantizer) -> dict:
        """(Re)build the model for one quantizer setting; returns the build figures."""
        import torch

        from bluelm_v.model import BlueLMV
        from bluelm_v.runtime import Generator

        self.close()
        t0 = time.perf_counter()
        model = BlueLMV.from_config(self.cfg, self.registry).to(self._torch_device()).eval()
        t_build = time.perf_counter() - t0
        for node in _nodes(quantizer):
            q = self.registry.create_from_config("quantizer", node, "case.quantizer")
            model = q.apply(model) or model
        self.model, self._variant, self._reference = model, _key(quantizer), {}
        # The device's own `engine:` wins; left at auto, the run's top-level `engine=` applies.
        top = self.cfg.get("engine")
        engine = top if self.engine == "auto" and top is not None else self.engine
        self.gen = Generator(model, engine=engine, registry=self.registry)
        self.load_s = time.perf_counter() - t0
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        torch.manual_seed(0)
        return {"load_s": self.load_s, "build_s": t_build, "weights_mb": weights / 2**20,
                "engine": self.gen.engine.name}

    def describe(self) -> dict:
        import platform

        import torch

        return {"backend": "local_torch", "kind": self.kind, "device": self._torch_device(),
                "compute_unit": "gpu" if self._torch_device() == "cuda" else "cpu", "runtime": "torch",
                "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads()}

    # -- one case --------------------------------------------------------------------------
    def run_case(self, case: dict) -> dict:
        import torch

        quantizer = case["quantizer"] if "quantizer" in case else self.cfg.get("quantizer")
        if _key(quantizer) != self._variant:
            self._build(quantizer)
        gen = self.gen
        image = synthetic_image(*case["image"], seed=int(case.get("seed") or 0))
        n_new = int(case["decode_tokens"])
        with PeakSampler() as mem, torch.no_grad():
            t0 = time.perf_counter()
            handle = gen.encode_image(image, tiles_per_batch=int(case["tiles_per_batch"]),
                                      pipelined=bool(case.get("pipelined", True)))   # in the background
            ids = self._prompt_ids(case)                             # tokenises meanwhile
            enc = handle.result()
            emb = gen.embed_prompt(ids, [enc["features"]])           # [1, L, D]
            gen.sync()
            t_pre = time.perf_counter()
            logits = gen.prefill(emb, max(n_new, 1), chunk=int(case["prefill_chunk"]))   # [V]
            token = int(logits.argmax())
            gen.sync()
            t_first = time.perf_counter()
            out = [token]
            for _ in range(max(0, n_new - 1)):                       # fixed count: EOS ignored
                token = gen.engine.step(token)
                out.append(token)
            gen.sync()
            t_end = time.perf_counter()
        metrics = {
            "grid": "{}:{}".format(*enc["grid"]) if enc["grid"] else None, "crops": enc["crops"],
            "visual_tokens": int(enc["features"].shape[0]), "prompt_tokens": int(emb.shape[1]),
            "load_s": self.load_s, "encode_s": enc["encode_s"], "prefill_s": t_first - t_pre,
            "prefill_tokens_per_s": emb.shape[1] / max(t_first - t_pre, 1e-9), "ttft_s": t_first - t0,
            "decode_tokens": len(out),
            "decode_tokens_per_s": (len(out) - 1) / (t_end - t_first) if len(out) > 1 else None,
            "peak_memory_mb": mem.peak_mb, "engine": gen.engine.name, "tokens": out, "simulated": False,
        }
        if self.check_outputs:
            try:
                kv_quantized = precision_plan(_nodes(quantizer))["kv_bits"] < 16
            except ConfigError:                                      # a quantizer the plan table does not know
                kv_quantized = False
            metrics.update(self._check(case, image, enc["features"], ids, logits,
                                       self.check_rtol_kv if kv_quantized else self.check_rtol))
        return metrics

    def _prompt_ids(self, case: dict) -> list[int]:
        """Ids of a prompt whose LLM length is prompt_tokens, for the crops this image gets."""
        tiler = self.model.tiler
        m, n = tiler.select(*case["image"])
        visual = int(tiler.num_crops(m, n)) * self.model.tokens_per_crop
        key = ("prompt", visual, int(case["prompt_tokens"]))
        if key not in self._reference:
            text, _ = prompt_for(lambda p: len(self.gen.prompt_ids(p, 1)), visual, int(case["prompt_tokens"]))
            self._reference[key] = self.gen.prompt_ids(text, 1)
        return self._reference[key]

    def _check(self, case, image, features, ids, logits, rtol: float) -> dict:
        import torch

        key = ("ref", tuple(case["image"]), int(case.get("seed") or 0), len(ids))
        if key not in self._reference:
            with torch.no_grad():
                pixels = self.model.tiler.transform(image).pixels.to(self._torch_device())
                ref_feat = self.model.encode_images(pixels, tiles_per_batch=1, pipelined=False)   # [K*T', D]
                ref_emb = self.gen.embed_prompt(ids, [ref_feat])                                  # [1, L, D]
                out = self.model.llm.model(inputs_embeds=ref_emb, logits_to_keep=1)
                ref_logits = out.logits[0, -1].float()                                          # [V]
            self._reference[key] = (ref_feat.float(), ref_logits)
        ref_feat, ref_logits = self._reference[key]
        feat_diff = float((features.float() - ref_feat).abs().max())
        logit_diff = float((logits.float() - ref_logits).abs().max())
        ok = feat_diff <= rtol * max(1.0, float(ref_feat.abs().max())) and \
            logit_diff <= rtol * max(1.0, float(ref_logits.abs().max()))
        return {"check_features_max_abs_diff": feat_diff, "check_max_abs_diff": logit_diff,
                "check_first_token_match": int(logits.argmax()) == int(ref_logits.argmax()), "check_ok": ok,
                "check_rtol": rtol}

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
        self.gen = self.model = None
        self._variant = UNSET


def _key(quantizer) -> str:
    import json

    return json.dumps(_nodes(quantizer), sort_keys=True, default=str)
