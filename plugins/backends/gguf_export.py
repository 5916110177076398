"""The LLM as a GGUF file for llama.cpp (what most people run small VLMs with on Android), written
with the ``gguf`` package from a transformers Llama-family model.

    export_llm_gguf(hf_model, tokenizer, "llm.gguf")    # architecture "llama", F32 tensors
    read_llm_gguf("llm.gguf") -> (metadata dict, {hf tensor name: numpy array})   # the round trip

Tensor names follow llama.cpp's llama architecture (token_embd, blk.N.attn_q, ..., output_norm,
output); q and k rows are reordered from the transformers rotate-half RoPE layout to llama.cpp's
interleaved one (and back on reading). The vocabulary is written as a byte-level BPE list
(``gpt2``) so llama.cpp loads it; prompts are given as token ids (our tokenizer stays the source).

The vision side is NOT exported as an mtmd projector: llama.cpp's ``lfm2`` projector type has our
2x2 merge exactly (zero padding of the 27x27 grid at the right and bottom, channels of each 2x2
block in the order top-left, top-right, bottom-left, bottom-right, tokens row-major, LayerNorm
eps 1e-5, Linear-GELU-Linear), but its image preprocessing is not ours: mtmd's LFM2
preprocessor tiles into 512 px tiles (2 to 10 of them, closest aspect ratio, thumbnail last, with
<|img_row_R_col_C|> marker tokens) and resizes the learned position embeddings to each image's
patch grid, where our relaxed tiler cuts 384 px tiles with the thumbnail first and no markers; and
its GELU is the tanh approximation where our projector's is exact. The LLM would see other visual
tokens than it was trained on, so only the LLM is exported (docs/design.md §7).
"""
from __future__ import annotations

from pathlib import Path

LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _rope_rows(w, heads: int, to_llama_cpp: bool):
    """Reorder the rows of a q/k projection between rotate-half pairs (i, i + d/2) and
    interleaved pairs (2i, 2i + 1), head by head."""
    rows = w.shape[0]
    d = rows // heads
    if to_llama_cpp:
        return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tokenizer, size: int) -> list[str]:
    """Token strings in the byte-level BPE alphabet (what llama.cpp's gpt2 vocabulary expects)."""
    from .export import byte_alphabet, token_bytes

    enc = byte_alphabet()
    pieces = token_bytes(tokenizer)
    out, seen = [], set()
    for i in range(size):
        text = "".join(enc[b] for b in pieces[i]) if i < len(pieces) and pieces[i] else f"<unused_{i}>"
        if text in seen:                                     # llama.cpp needs unique strings
            text = f"<dup_{i}>"
        seen.add(text)
        out.append(text)
    return out


def export_llm_gguf(hf_model, tokenizer, path) -> str:
    import gguf
    import numpy as np

    cfg = hf_model.config
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("bluelm_v llm")
    w.add_context_length(int(getattr(cfg, "max_position_embeddings", 4096)))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(getattr(cfg, "rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = _vocab(tokenizer, cfg.vocab_size)
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    # llama.cpp refuses a gpt2 vocabulary without merges, and the writer drops an empty list. Prompts
    # go in as ids, so one merge of two single-character tokens is enough to load.
    chars = [t for t in vocab if len(t) == 1][:2]
    w.add_token_merges([" ".join(chars)] if len(chars) == 2 else ["a b"])
    if tokenizer.eos_token_id is not None:
        w.add_eos_token_id(int(tokenizer.eos_token_id))
    state = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, name in LAYER_TENSORS.items():
            t = state[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name in ("self_attn.q_proj", "self_attn.k_proj"):
                t = np.ascontiguousarray(_rope_rows(t, heads if "q_" in hf_name else kv_heads, True))
            w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not getattr(cfg, "tie_word_embeddings", False):
        w.add_tensor("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def read_llm_gguf(path) -> tuple[dict, dict]:
    """(metadata {key: value}, {transformers tensor name: array}) of a file export_llm_gguf wrote."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(Path(path)))
    meta = {}
    for key, field in r.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
            continue
        value = field.contents()
        meta[key] = value
    heads, kv_heads = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    back = {v: k for k, v in LAYER_TENSORS.items()}
    tensors = {}
    for t in r.tensors:
        data = np.array(t.data).reshape([int(x) for x in reversed(t.shape)])
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, i, short, _ = t.name.split(".")
            name = f"model.layers.{i}.{back[short]}.weight"
            if short in ("attn_q", "attn_k"):
                data = _rope_rows(data, heads if short == "attn_q" else kv_heads, False)
        tensors[name] = data
    return meta, tensors
