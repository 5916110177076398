"""``simulated_npu``: a phone SoC as a roofline cost model (plugins/backends/npu_cost.py).

    backend: {name: simulated_npu, profile: dimensity9300}                    # conf/backend/dimensity9300.yaml
    backend: {name: simulated_npu, profile: {base: dimensity9300, on_chip_mb: 120}}   # a variant
    backend: {name: simulated_npu, profile: {memory_bandwidth_gbps: 51.2, ...}}       # another SoC

The workload is read from real modules built on the meta device (no memory): with
``model: paper`` the paper's model (SigLIP so400m, vila_2x2, mlp2x_gelu, bluelm_3b_proxy), with
``model: config`` the configured encoder / downsampler / projector / llm; the shapes are cached
under $BLUELM_V_CACHE (``cache_shapes: false`` re-reads them every load). A profile named by a
string is the ``profile`` node of conf/backend/NAME.yaml. Precision per part comes from the
case's quantizer (see ``precision.py``). ``realtime_scale`` > 0 sleeps that fraction of the
simulated time, so a simulated phone occupies its actor like a real one (scheduling, timeouts).
"""
from __future__ import annotations

import time
from importlib import resources

from bluelm_v.errors import ConfigError

from .npu_cost import CostModel, NpuProfile
from .precision import precision_plan

PAPER_MODEL = {
    "encoder": {"name": "siglip", "preset": "so400m"},
    "downsampler": {"name": "vila_2x2"},
    "projector": {"name": "mlp2x_gelu"},
    "llm": {"name": "hf_causal", "preset": "bluelm_3b_proxy"},
}


def load_profile(spec) -> tuple[str, NpuProfile]:
    """A profile name (conf/backend/NAME.yaml's ``profile`` node) or a dict, optionally with
    ``base: NAME`` whose values it overrides -> (label, NpuProfile)."""
    if hasattr(spec, "_metadata"):
        from omegaconf import OmegaConf
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, str):
        return spec, NpuProfile.from_dict(_named_profile(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"backend.profile: expected a profile name or a mapping, got {spec!r}")
    values = dict(spec)
    base = values.pop("base", None)
    label = values.pop("label", None) or (f"{base}+custom" if base else "custom")
    merged = {**(_named_profile(base) if base else {}), **values}
    try:
        return label, NpuProfile.from_dict(merged)
    except ValueError as exc:
        raise ConfigError(f"backend.profile: {exc}") from None


def _named_profile(name: str) -> dict:
    return named_node(name, "profile")


def named_node(name: str, key: str = "profile") -> dict:
    """The ``key`` mapping (``profile``) of conf/backend/NAME.yaml."""
    import yaml

    path = resources.files("bluelm_v.conf") / "backend" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name[:-5] for p in (resources.files("bluelm_v.conf") / "backend").iterdir()
                       if p.name.endswith(".yaml") and isinstance((yaml.safe_load(p.read_text()) or {}).get("profile"), dict))
        raise ConfigError(f"backend.profile: no NPU profile '{name}' (conf/backend/{name}.yaml); known: {known}")
    node = (yaml.safe_load(path.read_text()) or {}).get(key)
    if not isinstance(node, dict):
        raise ConfigError(f"backend.profile: conf/backend/{name}.yaml has no '{key}' mapping")
    return {k: v for k, v in node.items() if k not in ("base", "label")}


class SimulatedNpu:
    """A phone NPU as a roofline cost model of the real model's FLOPs and bytes per step."""

    kind = "simulated"

    def __init__(self, profile: str | dict = "dimensity9300", model: str = "paper",
                 realtime_scale: float = 0.0, cache_shapes: bool = True):
        if model not in ("paper", "config"):
            raise ValueError(f"model must be 'paper' or 'config', got {model!r}")
        self.profile_name, self.profile = load_profile(profile)
        self.model_source, self.realtime_scale = model, float(realtime_scale)
        self.cache_shapes = cache_shapes
        self.cost = CostModel(self.profile)
        self.shapes = None

    # -- loading ---------------------------------------------------------------------------
    def load(self, cfg, registry) -> dict:
        """Read the workload's shapes from meta-device modules (cached on disk) and the tiler."""
        from . import workload
        from ..llms import cache_dir

        nodes = {k: _plain(cfg.get(k)) if self.model_source == "config" else v for k, v in PAPER_MODEL.items()}
        for part in ("encoder", "llm"):
            nodes[part] = {**nodes[part], "device": "meta"}
        self.tiler = registry.create_from_config("tiler", cfg.get("tiler"), "tiler")
        self.shapes = workload.cached_shapes(nodes, registry, lambda: _measure(nodes, registry),
                                             cache_dir() if self.cache_shapes else None)
        return {"model": self.model_source, "encoder_params": self.shapes["encoder"].total_params,
                "llm_params": self.shapes["llm"].total_params}

    def describe(self) -> dict:
        return {"backend": "simulated_npu", "kind": self.kind, "compute_unit": "npu (simulated)",
                "runtime": "cost model", "profile": self.profile_name,
                "profile_values": self.profile.to_dict(), "model": self.model_source}

    # -- one case --------------------------------------------------------------------------
    def run_case(self, case: dict) -> dict:
        if self.shapes is None:
            raise RuntimeError("simulated_npu: load(cfg) must run before run_case")
        enc, llm, proj = self.shapes["encoder"], self.shapes["llm"], self.shapes["projector"]
        plan = precision_plan(case.get("quantizer"))
        w, h = case["image"]
        m, n = case.get("grid") or self.tiler.select(w, h)
        tiles = int(self.tiler.num_crops(m, n))
        visual = tiles * self.shapes["tokens_per_crop"]
        prompt = max(int(case["prompt_tokens"]), visual)            # the LLM input holds the image
        decode_tokens = int(case["decode_tokens"])
        kv_len = int(case.get("kv_cache_tokens") or prompt + decode_tokens)

        weights = {"encoder": enc.total_params * plan["encoder"].weight_bytes,
                   "projector": self.shapes["projector_params"] * plan["projector"].weight_bytes,
                   "llm": llm.total_params * plan["llm"].weight_bytes}
        load_s = self.cost.load(sum(weights.values()))
        e = self.cost.encode(enc, proj, self.shapes["tokens_per_crop"], tiles, int(case["tiles_per_batch"]),
                             plan["encoder"], pipelined=bool(case.get("pipelined", True)))
        p = self.cost.prefill(llm, prompt, int(case["prefill_chunk"]), kv_len, plan["llm"], plan["kv_bits"])
        step = self.cost.decode_step(llm, kv_len, plan["llm"], plan["kv_bits"])
        peak = self._peak_memory_mb(weights, tiles, int(case["tiles_per_batch"]), kv_len,
                                    int(case["prefill_chunk"]), plan, bool(case.get("release_encoder", True)))
        out = {
            "grid": f"{m}:{n}", "crops": tiles, "visual_tokens": visual, "prompt_tokens": prompt, "load_s": load_s,
            "encode_s": e["encode_s"], "encode_vit_calls_s": e["vit_calls_s"], "encode_conv_s": e["conv_s"],
            "encode_project_s": e["project_s"], "encode_hidden_by_pipeline_s": e["hidden_by_pipeline_s"],
            "prefill_s": p["prefill_s"], "prefill_calls": p["prefill_calls"],
            "prefill_tokens_per_s": prompt / p["prefill_s"],
            "ttft_s": e["encode_s"] + p["prefill_s"] + step,          # image sent with the prompt
            "decode_tokens_per_s": 1.0 / step, "decode_bandwidth_limit_tokens_per_s":
                self.profile.memory_bandwidth_gbps * 1e9 / (weights["llm"] + kv_len * llm.kv_bytes_per_token(plan["kv_bits"])),
            "peak_memory_mb": peak, "simulated": True,
        }
        if self.realtime_scale > 0:
            time.sleep(self.realtime_scale * (out["encode_s"] + out["prefill_s"] + decode_tokens * step))
        return out

    def _peak_memory_mb(self, weights, tiles, tpb, kv_len, chunk, plan, release_encoder) -> float:
        """Weights resident per phase + the largest activations of that phase + the runtime.
        Both parts load together; with release_encoder the ViT is freed before the prefill."""
        enc, llm = self.shapes["encoder"], self.shapes["llm"]
        a_enc = plan["encoder"].act_bytes
        batch = min(tpb, tiles)
        vit_act = batch * enc.tokens_per_item * (3 * enc.hidden + max(l.out_features for l in enc.block)) * a_enc \
            + batch * enc.heads * enc.tokens_per_item ** 2 * a_enc
        features = tiles * self.shapes["tokens_per_crop"] * llm.hidden * a_enc
        encode_phase = weights["encoder"] + weights["projector"] + weights["llm"] + vit_act + features
        kv = kv_len * llm.kv_bytes_per_token(plan["kv_bits"])
        a_llm = plan["llm"].act_bytes
        llm_act = chunk * (3 * llm.hidden + 2 * max(l.out_features for l in llm.block)) * a_llm \
            + llm.heads * chunk * kv_len * a_llm
        llm_phase = weights["llm"] + weights["projector"] + kv + llm_act + features
        if not release_encoder:
            llm_phase += weights["encoder"]
        return (max(encode_phase, llm_phase)) / 1e6 + self.profile.runtime_base_mb

    def close(self) -> None:
        self.shapes = None


def _measure(nodes: dict, registry) -> dict:
    """Build the model on the meta device (no memory) and read its shapes."""
    import torch

    from bluelm_v.model import BlueLMV

    from . import workload

    with torch.device("meta"):
        model = BlueLMV.from_config(nodes, registry)
    return {"encoder": workload.encoder_shape(model.encoder), "projector": workload.mlp_shape(model.projector),
            "llm": workload.llm_shape(model.llm.model), "tokens_per_crop": model.tokens_per_crop,
            "projector_params": sum(p.numel() for p in model.projector.parameters())}


def _plain(node):
    if hasattr(node, "_metadata"):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if node is not None else None

