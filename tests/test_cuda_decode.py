"""bluelm_v.cuda_decode: the pure-torch pieces always; the Triton decode step only where Triton
can run (a CUDA device, or TRITON_INTERPRET=1 set before pytest starts: slow, tiny model)."""
from __future__ import annotations

import os

import pytest
import torch

from bluelm_v.cuda_decode import AttnConfig, GemvConfig, gemv_candidates, split_attention_reference


def test_split_attention_reference_equals_full_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 16), torch.randn(3, 37, 16), torch.randn(3, 37, 16)
    full = torch.softmax(torch.einsum("hd,hld->hl", q, k) * 0.25, -1)
    expected = torch.einsum("hl,hld->hd", full, v)                        # [H,d]
    for n_split in (1, 3, 8):
        got = split_attention_reference(q, k, v, n_split, 0.25)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gemv_split_k_candidates_cover_k_in_whole_pieces():
    for n, k in ((2304, 2304), (2304, 5760)):
        for cfg in gemv_candidates(n, k, (1, 2, 3, 5)):
            per = cfg.k_per_split(k)
            assert per % cfg.block_k == 0
            assert per * cfg.split_k >= k > per * (cfg.split_k - 1)     # every split has columns
    assert GemvConfig(8, 128, 3).k_per_split(5760) == 1920


def test_attention_splits_cover_the_cache():
    for max_len in (64, 2240, 4096):
        for cfg in (AttnConfig(32), AttnConfig(64), AttnConfig(128)):
            n = cfg.n_split(max_len)
            assert (n - 1) * cfg.block < max_len <= n * cfg.block


def _triton_runnable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not _triton_runnable(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_triton_step_matches_torch_path():
    from bluelm_v.cuda_decode import TritonDecodeEngine
    from bluelm_v.fast_llama import FastLlamaEngine
    from bluelm_v.plugins import llms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = llms.hf_causal(preset="tiny", dtype="float32", device=device, tokenizer="byte").model.eval()
    emb = model.get_input_embeddings()(torch.randint(3, 300, (1, 21), device=device))   # [1,21,64]
    ref = FastLlamaEngine(model, cuda_graph=False, static_step=False)
    eng = TritonDecodeEngine(model, cuda_graph=False, debug_logits=True, tune=False, prefetch=False,
                             configs={"attn": AttnConfig(8), "down": GemvConfig(8, 64, 2)})
    assert eng.triton_ok
    ref.begin(40)
    eng.begin(40)
    tok = int(ref.prefill(emb, 8).argmax())
    assert int(eng.prefill(emb, 8).argmax()) == tok
    for _ in range(3):          # positions 21..23: splits 0-2 of 8 keys each, row pos substituted
        a, b = ref.step(tok), eng.step(tok)
        torch.testing.assert_close(eng.last_step_logits, ref.last_logits, rtol=1e-4, atol=1e-4)
        assert a == b
        tok = a
    # the new k/v rows were written where the torch path writes them
    torch.testing.assert_close(eng.cache.k[:, :, :24], ref.cache.k[:, :, :24], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eng.cache.v[:, :, :24], ref.cache.v[:, :, :24], rtol=1e-4, atol=1e-4)
