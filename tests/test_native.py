"""bluelm_v.nn.llama: the transformers-free Llama and SigLIP trees compute what transformers'
modules compute with the same weights, share their parameter names, and a process that builds
and runs them never imports transformers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bluelm_v.plugin_manager import get


@pytest.fixture(scope="module")
def registry():
    return get()[1]


def _same_weights(dst, src):
    state = src.state_dict()
    assert set(dst.state_dict()) == set(state)          # the same parameter names
    dst.load_state_dict(state, strict=True)


def test_native_llama_matches_transformers_logits_and_engine(registry):
    from bluelm_v.plugins.engines import make_engine

    ref = registry.llm.create("hf_causal", preset="tiny", seed=3)
    nat = registry.llm.create("hf_causal", preset="tiny", implementation="native", seed=4)
    _same_weights(nat.model, ref.model)
    assert nat.model.lm_head.weight is nat.model.get_input_embeddings().weight   # still tied
    ids = torch.randint(0, 300, (2, 23))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0                                       # a right-padded row
    with torch.no_grad():
        want = ref.model(input_ids=ids, attention_mask=mask).logits
        got = nat.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert torch.allclose(got[1, :17], want[1, :17], atol=1e-5)
    # the runtime engine on the native tree generates what it generates on transformers'
    outs = []
    for llm in (ref, nat):
        eng = make_engine(llm.model, "auto")
        eng.begin(40)
        tok = int(eng.prefill(llm.embed(ids[:1, :20]), 8).argmax())
        seq = [tok]
        for _ in range(10):
            seq.append(eng.step(seq[-1]))
        outs.append((type(eng).__name__, seq))
    assert outs[0] == outs[1]


def test_native_siglip_matches_transformers_features(registry):
    ref = registry.encoder.create("siglip", preset="tiny", seed=1)
    nat = registry.encoder.create("siglip", preset="tiny", implementation="native", seed=2)
    _same_weights(nat, ref)
    pixels = torch.randn(3, 3, 384, 384)
    with torch.no_grad():
        assert torch.allclose(nat(pixels), ref(pixels), atol=1e-5)


def test_native_rejects_what_it_cannot_build(registry):
    with pytest.raises(ValueError, match="implementation native builds the random-init presets"):
        registry.llm.create("hf_causal", preset="smollm2_135m", implementation="native")
    with pytest.raises(ValueError, match="unsupported config keys"):
        registry.llm.create("hf_causal", preset="tiny", implementation="native", config={"rope_scaling": {}})


def test_a_native_pipeline_never_imports_transformers(tmp_path):
    code = textwrap.dedent("""
        import json, sys, torch
        from bluelm_v.plugin_manager import get
        from bluelm_v.model import BlueLMV
        from bluelm_v.runtime import Generator
        reg = get()[1]
        cfg = {"tiler": {"name": "relaxed", "max_grid": 2}, "downsampler": {"name": "vila_2x2"},
               "encoder": {"name": "siglip", "preset": "tiny", "implementation": "native"},
               "projector": {"name": "mlp2x_gelu"},
               "llm": {"name": "hf_causal", "preset": "tiny", "implementation": "native"}}
        model = BlueLMV.from_config(cfg, reg)
        reg.quantizer.create("bluelm_mixed", llm_group_size=32).apply(model)
        gen = Generator(model)
        feats = gen.encode_image(torch.rand(2, 3, 384, 384)).result()["features"]
        ids = gen.prompt_ids("<image> what is it?", 1)
        eng = gen.engine
        eng.begin(len(ids) + 400 + 5)
        tok = int(eng.prefill(gen.embed_prompt(ids, [feats]), 128).argmax())
        tok = eng.step(tok)
        print(json.dumps({"transformers": "transformers" in sys.modules, "engine": eng.name,
                          "cache": type(eng.cache).__name__}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"transformers": False, "engine": "fast", "cache": "Int8StaticKVCache"}, r
