"""Model components (encoder, downsampler, projector, LLM), the chat template and BlueLMV."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bluelm_v.chat import IGNORE_INDEX, IMAGE_TOKEN_ID, prompt_ids, tokenize_conversation
from bluelm_v.errors import InputError
from bluelm_v.plugin_manager import get

TINY = {"tiler": {"name": "relaxed", "max_grid": 3}, "encoder": {"name": "siglip", "preset": "tiny"},
        "downsampler": {"name": "vila_2x2"}, "projector": {"name": "mlp2x_gelu"},
        "llm": {"name": "hf_causal", "preset": "tiny"}}


@pytest.fixture(scope="module")
def registry():
    return get()[1]


@pytest.fixture(scope="module")
def model(registry):
    from bluelm_v.model import BlueLMV

    torch.manual_seed(0)
    return BlueLMV.from_config(TINY, registry)


# -- encoder ------------------------------------------------------------------------------
def test_siglip_tiny_geometry_and_batching_do_not_change_features(registry):
    enc = registry.encoder.create("siglip", preset="tiny", tiles_per_batch=2, pipelined=True)
    x = torch.randn(5, 3, 384, 384)
    with torch.no_grad():
        piped = enc(x)                       # 2 + 2 + 1, patch embedding on a worker thread
        enc.pipelined = False
        serial = enc(x)
        enc.tiles_per_batch = 5
        one_call = enc(x)
    assert piped.shape == (5, 729, enc.hidden_size) and enc.num_tokens == 729
    torch.testing.assert_close(piped, serial)
    torch.testing.assert_close(piped, one_call, rtol=1e-4, atol=1e-5)


def test_siglip_features_are_the_penultimate_layer_of_the_transformers_model(registry, tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                             intermediate_size=64, patch_size=14, image_size=384)
    torch.manual_seed(1)
    ref = SiglipVisionModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    enc = registry.encoder.create("siglip", path=str(tmp_path), pipelined=False)
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        got = enc(x)
    assert len(enc.layers) == 2   # the last layer is never built
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_so400m_preset_matches_the_paper_on_the_meta_device(registry):
    enc = registry.encoder.create("siglip", preset="so400m", device="meta")
    n = sum(p.numel() for p in enc.parameters())
    assert enc.hidden_size == 1152 and enc.num_tokens == 729 and len(enc.layers) == 26
    assert 380e6 < n < 420e6     # ~400M (26 of 27 layers, no head)


# -- downsampler / projector --------------------------------------------------------------
def test_vila_2x2_merges_blocks_and_zero_pads_the_27x27_grid(registry):
    ds = registry.downsampler.create("vila_2x2", in_dim=3)
    grid = torch.arange(27 * 27 * 3, dtype=torch.float32).reshape(1, 27, 27, 3)
    out = ds(grid.reshape(1, 729, 3))
    assert out.shape == (1, 196, 12) and ds.out_dim == 12 and ds.out_tokens(729) == 196
    block = torch.cat([grid[0, 0, 0], grid[0, 0, 1], grid[0, 1, 0], grid[0, 1, 1]])
    torch.testing.assert_close(out[0, 0], block)
    corner = out[0, 195]                         # rows/cols 26..27: only (26, 26) is real
    torch.testing.assert_close(corner[:3], grid[0, 26, 26])
    assert torch.all(corner[3:] == 0)
    ident = registry.downsampler.create("identity", in_dim=3)
    assert ident(grid.reshape(1, 729, 3)).shape == (1, 729, 3) and ident.out_tokens(729) == 729


def test_mlp2x_gelu_with_and_without_layernorm(registry):
    with_ln = registry.projector.create("mlp2x_gelu", in_dim=16, out_dim=8)
    without = registry.projector.create("mlp2x_gelu", in_dim=16, out_dim=8, layer_norm=False)
    assert isinstance(with_ln[0], torch.nn.LayerNorm) and not isinstance(without[0], torch.nn.LayerNorm)
    assert with_ln(torch.randn(5, 16)).shape == (5, 8)


# -- LLM ----------------------------------------------------------------------------------
def test_bluelm_3b_proxy_has_the_minicpm_2b_shape(registry):
    llm = registry.llm.create("hf_causal", preset="bluelm_3b_proxy", device="meta")
    cfg = llm.model.config
    n = sum(p.numel() for p in llm.model.parameters())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.vocab_size) == (2304, 40, 36, 5760, 122753)
    assert llm.model.lm_head.weight is llm.model.get_input_embeddings().weight
    assert abs(n - 2.72e9) / 2.72e9 < 0.01


@pytest.mark.slow
def test_full_size_llm_is_built_without_an_fp32_copy(tmp_path):
    """A 0.2B-parameter slice of the proxy in bf16: peak RSS grows by ~the bf16 weights, not by
    the 2x more an fp32 build + cast would need."""
    code = textwrap.dedent("""
        import json, resource, sys, torch
        from bluelm_v.plugin_manager import get
        reg = get()[1]
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        llm = reg.llm.create("hf_causal", preset="bluelm_3b_proxy", dtype="bfloat16",
                             config={"num_hidden_layers": 2, "vocab_size": 32000})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        nbytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        w = llm.model.model.layers[0].mlp.up_proj.weight
        print(json.dumps({"grew": (peak - base) * 1024, "nbytes": nbytes, "std": float(w.float().std()),
                          "dtype": str(w.dtype)}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dtype"] == "torch.bfloat16" and abs(r["std"] - 0.02) < 0.002
    assert r["grew"] < 1.3 * r["nbytes"] + 150e6, r


def test_llm_loads_a_local_directory_and_a_gguf_file(registry, tmp_path):
    from bluelm_v.plugins.llms import smollm2_gguf_path

    src = registry.llm.create("hf_causal", preset="tiny", seed=3)
    src.model.save_pretrained(tmp_path / "tiny")
    loaded = registry.llm.create("hf_causal", preset=None, path=str(tmp_path / "tiny"), tokenizer="byte")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, src.model(ids).logits)
    gguf = registry.llm.create("hf_causal", preset=None, path=str(smollm2_gguf_path()))
    assert gguf.model.config.num_hidden_layers == 30 and gguf.tokenizer.token_id("<|im_end|>") is not None


def test_tiny_llm_tokenizer_round_trip(registry):
    llm = registry.llm.create("hf_causal", preset="tiny")
    tok = llm.tokenizer
    ids = tok.encode("héllo <|im_end|>")
    assert ids[-1] == tok.eos_token_id and tok.decode(ids) == "héllo "
    assert llm.embed(torch.tensor([ids])).shape == (1, len(ids), llm.hidden_size)


# -- chat template ------------------------------------------------------------------------
def test_tokenize_conversation_puts_loss_only_on_assistant_turns(model):
    tok = model.tokenizer
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]
    out = tokenize_conversation(conv, tok)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) and out["n_images"] == 1 and ids.count(IMAGE_TOKEN_ID) == 1
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(supervised, keep_special=True) == "A cat.<|im_end|>\nBlack.<|im_end|>\n"
    assert all(l == IGNORE_INDEX or l == i for i, l in zip(ids, labels))
    with pytest.raises(InputError):
        tokenize_conversation([{"from": "robot", "value": "x"}], tok)


def test_prompt_ids_end_with_the_assistant_header(model):
    tok = model.tokenizer
    ids = prompt_ids(tok, "<image>\nHi")
    assert tok.decode(ids, keep_special=True).endswith("<|im_start|>assistant\n")
    assert ids.count(IMAGE_TOKEN_ID) == 1


# -- BlueLMV ------------------------------------------------------------------------------
def _batch(model, convs):
    rows = [tokenize_conversation(c, model.tokenizer) for c in convs]
    width = max(len(r["input_ids"]) for r in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return ids, mask, labels


def test_forward_splices_visual_tokens_at_each_placeholder(model):
    from PIL import Image

    a = model.tiler.transform(Image.new("RGB", (500, 102), (255, 0, 0))).pixels    # 2:1 + thumb
    b = model.tiler.transform(Image.new("RGB", (300, 300), (0, 0, 255))).pixels    # 1:1 + thumb
    convs = [[{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "Two."}],
             [{"from": "human", "value": "No image."}, {"from": "gpt", "value": "Fine."}]]
    ids, mask, labels = _batch(model, convs)
    out = model(ids, mask, labels, images=[a, b])
    n_vis = (a.shape[0] + b.shape[0]) * model.tokens_per_crop
    assert a.shape[0] == 3 and b.shape[0] == 2
    assert out.logits.shape[:2] == out.attention_mask.shape == (2, ids.shape[1] - 2 + n_vis)
    assert int(out.attention_mask[1].sum()) == int(mask[1].sum())          # text row: unchanged
    assert (out.labels != IGNORE_INDEX).sum() == (labels != IGNORE_INDEX).sum()
    assert torch.isfinite(out.loss)
    # the first image's tokens sit right after the text before the first placeholder
    s = model.splice(ids, model.image_features([a, b]), mask, labels)
    first = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    torch.testing.assert_close(s.embeds[0, first:first + a.shape[0] * 196], model.encode_images(a))
    out.loss.backward()
    assert model.projector[-1].weight.grad.abs().sum() > 0


def test_forward_rejects_a_placeholder_count_mismatch(model):
    ids, mask, labels = _batch(model, [[{"from": "human", "value": "<image> hi"},
                                        {"from": "gpt", "value": "x"}]])
    with pytest.raises(InputError, match="placeholder"):
        model(ids, mask, labels, images=[])


@pytest.mark.parametrize("tiler", ["qwen2_vl", "minicpm_v"])
def test_a_sizes_only_tiler_is_refused_before_any_part_is_built(tiler):
    """Rules that decide sizes and tokens only (their views are not B x B crops) cannot feed the
    model: one line naming the tiler, raised before the encoder or the LLM is built."""
    from bluelm_v.errors import ConfigError
    from bluelm_v.model import BlueLMV

    cfg = {"tiler": {"name": tiler}, "encoder": {"name": "no_such_encoder"}}   # never reached
    with pytest.raises(ConfigError, match=f"tiler: '{tiler}' decides sizes and visual tokens only"):
        BlueLMV.from_config(cfg, get()[1])
