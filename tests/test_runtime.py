"""The generation runtime: chunked prefill, KV cache, engines, streaming, decoupled encoding, errors."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from bluelm_v.errors import InputError
from bluelm_v.plugin_manager import get
from bluelm_v.runtime import Generator

TINY = {"tiler": {"name": "relaxed", "max_grid": 3}, "encoder": {"name": "siglip", "preset": "tiny"},
        "downsampler": {"name": "vila_2x2"}, "projector": {"name": "mlp2x_gelu"},
        "llm": {"name": "hf_causal", "preset": "tiny", "config": {"num_hidden_layers": 3}}}


def _build(llm=None, seed=0):
    from bluelm_v.model import BlueLMV

    cfg = dict(TINY)
    if llm:
        cfg["llm"] = llm
    torch.manual_seed(seed)
    model = BlueLMV.from_config(cfg, get()[1])
    with torch.no_grad():   # larger random weights than the 0.02 init, so logits really differ
        for p in model.llm.model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return _build()


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (500, 102), (30, 120, 200))     # relaxed: 2:1 -> 3 crops, 588 tokens


def _last_logits(model, engine, chunk, image, prompt="<image>\nWhat is it?"):
    gen = Generator(model, prefill_chunk=chunk, engine=engine)
    ids = gen.prompt_ids(prompt, 1)
    feats = gen.encode_image(image).result()["features"]
    return gen.prefill(gen.embed_prompt(ids, [feats]), 8), gen


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_chunked_prefill_gives_the_same_logits_for_any_chunk_size(model, image, engine):
    ref, _ = _last_logits(model, engine, 100000, image)
    for chunk in (1, 7, 128):
        got, _ = _last_logits(model, engine, chunk, image)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert ref.std() > 0.1        # a real distribution, not a constant


def test_fast_engine_matches_the_transformers_forward(model, image):
    fast, gen = _last_logits(model, "fast", 128, image)
    ids = gen.prompt_ids("<image>\nWhat is it?", 1)
    emb = gen.embed_prompt(ids, [gen.encode_image(image).result()["features"]])
    with torch.no_grad():
        full = model.llm.model(inputs_embeds=emb).logits[0, -1]
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-4)


def test_static_shape_decode_step_matches_the_dynamic_one(model, image):
    """The fixed-shape step a CUDA graph replays (full static cache + position mask) decodes the
    same tokens as the exact-length step."""
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    gen = Generator(model)
    emb = gen.embed_prompt(gen.prompt_ids("<image>\nWhat is it?", 1),
                           [gen.encode_image(image).result()["features"]])
    runs = []
    for static in (False, True):
        eng = FastLlamaEngine(model.llm.model, static_step=static)
        eng.begin(emb.shape[1] + 10)
        tok, out = int(eng.prefill(emb, 128).argmax()), []
        for _ in range(8):
            tok = eng.step(tok)
            out.append(tok)
        runs.append(out)
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_kv_cache_decode_equals_recomputing_the_whole_sequence(model, image, engine):
    gen = Generator(model, prefill_chunk=64, engine=engine)
    res = gen.generate("<image>\nWhat is it?", [image], max_new_tokens=12)
    ids = gen.prompt_ids("<image>\nWhat is it?", 1)
    emb = gen.embed_prompt(ids, [gen.encode_image(image).result()["features"]])
    tokens = []
    with torch.no_grad():   # greedy without any cache: the full sequence every step
        for _ in range(len(res.token_ids)):
            nxt = int(model.llm.model(inputs_embeds=emb).logits[0, -1].argmax())
            tokens.append(nxt)
            emb = torch.cat([emb, model.llm.embed(torch.tensor([[nxt]]))], 1)
    assert res.token_ids == tokens and len(tokens) >= 2


def test_streamed_pieces_add_up_to_the_text_and_timings_are_reported(model, image):
    pieces = []
    gen = Generator(model)
    res = gen.generate("<image>\nSay something.", [image], max_new_tokens=10, stream=pieces.append)
    assert "".join(pieces) == res.text
    t = res.timings
    for key in ("image_encode_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_rss_mb"):
        assert t[key] >= 0
    assert t["ttft_s"] >= t["prefill_s"] > 0 and t["peak_rss_mb"] > 50
    assert res.visual_tokens == 3 * 196 and res.grids == [(2, 1)] and res.crops == [3]
    assert res.prompt_tokens == len(gen.prompt_ids("<image>\nSay something.", 1)) - 1 + 588


def test_two_images_in_one_prompt(model, image):
    square = Image.new("RGB", (300, 300), (200, 10, 10))                  # 1:1 -> 2 crops
    res = Generator(model).generate("<image> vs <image>?", [image, square], max_new_tokens=3)
    assert res.crops == [3, 2] and res.visual_tokens == 5 * 196 and res.grids == [(2, 1), (1, 1)]


def test_decoupled_encoding_handle_and_encoder_release(image):
    import time

    model = _build(seed=1)
    ref = Generator(model).generate("<image>\nHi", [image], max_new_tokens=6)
    encode = model.encode_images
    model.encode_images = lambda px, *options: (time.sleep(0.3), encode(px, *options))[1]   # a slow ViT
    gen = Generator(model, release_encoder=True)
    t0 = time.perf_counter()
    handle = gen.encode_image(image)           # returns at once; encoding runs in the background
    assert time.perf_counter() - t0 < 0.2 and not handle.done()
    res = gen.generate("<image>\nHi", [handle], max_new_tokens=6)
    assert res.token_ids == ref.token_ids and res.timings["image_encode_s"] >= 0.3
    assert gen.encoder_released and sum(p.numel() for p in model.encoder.parameters()) == 0
    with pytest.raises(InputError, match="released"):
        gen.encode_image(image)


def test_bad_inputs_name_the_input(model, image, tmp_path):
    gen = Generator(model)
    with pytest.raises(InputError, match="does not exist"):
        gen.generate("<image>\nx", [str(tmp_path / "missing.png")])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        gen.generate("<image>\nx", [str(empty)])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    with pytest.raises(InputError, match="corrupt.jpg"):
        gen.generate("<image>\nx", [str(corrupt)])
    with pytest.raises(InputError, match="prompt: has 0"):
        gen.generate("no placeholder", [image])
    with pytest.raises(InputError, match="prompt: has 2"):
        gen.generate("<image><image>", [image])
    short = _build(llm={**TINY["llm"], "max_context": 64})
    with pytest.raises(InputError, match="context"):
        Generator(short).generate("x" * 100, [])


@pytest.mark.slow
def test_smollm2_answers_and_matches_transformers_generate():
    from bluelm_v.model import BlueLMV

    m = BlueLMV.from_config({**TINY, "llm": {"name": "hf_causal", "preset": "smollm2_135m"}}, get()[1])
    gen = Generator(m, prefill_chunk=5)
    res = gen.generate("What is the capital of France?", [], max_new_tokens=16)
    assert "Paris" in res.text and res.finish_reason == "eos"
    ids = torch.tensor([gen.prompt_ids("What is the capital of France?", 0)])
    with torch.no_grad():
        ref = m.llm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                   do_sample=False, eos_token_id=sorted(m.llm.eos_token_ids),
                                   pad_token_id=m.tokenizer.pad_token_id)
    want = [t for t in ref[0, ids.shape[1]:].tolist() if t not in m.llm.eos_token_ids]
    assert res.token_ids == want


def test_decode_in_chunks_gives_the_tokens_of_one_at_a_time(model, image, monkeypatch):
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    def run(chunk, stop_at=None):
        monkeypatch.setattr(FastLlamaEngine, "decode_chunk", property(lambda self: chunk))
        logits, gen = _last_logits(model, "fast", 16, image)
        if stop_at is not None:
            gen.eos = {stop_at}
        return gen.decode(int(logits.argmax()), 7), gen.engine.length

    (ids1, text1, why1), _ = run(1)
    (ids4, text4, why4), length4 = run(4)
    assert (ids4, text4, why4) == (ids1, text1, why1) and len(ids1) == 7 and why1 == "length"
    assert length4 >= len(ids4)                   # asked in chunks of at most 4: 4 + 3, no more
    # an end token inside a chunk ends the answer there; the chunk's later tokens are dropped
    (ids_e, _, why_e), _ = run(4, stop_at=ids1[2])
    assert why_e == "eos" and ids_e == ids1[:ids1.index(ids1[2])]


# -- batched generation ---------------------------------------------------------------------
def _batch_inputs(image):
    """Prompts of different lengths, each with its own images (PIL, crops tensors, none)."""
    square = Image.new("RGB", (300, 300), (200, 10, 10))                  # 2 crops
    crops = torch.randn(1, 3, 384, 384)                                   # 1 crop as a tensor
    prompts = ["<image>\nWhat is it?", "Tell me a story about a cat", "<image> vs <image>?",
               "<image>\nDescribe the picture in a few words.", "<image> and"]
    return prompts, [[image], [], [image, square], [crops], [square]]


def _one_by_one(gen, prompts, images, n):
    return [gen.generate(p, ims, max_new_tokens=n) for p, ims in zip(prompts, images)]


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_generate_batch_gives_the_tokens_of_one_by_one_generate(model, image, engine):
    prompts, images = _batch_inputs(image)
    gen = Generator(model, engine=engine, prefill_chunk=64)
    ref = _one_by_one(gen, prompts, images, 9)
    # 2 batches (sorted by length), prefill forwards of 300 tokens: long rows cut in pieces
    got = gen.generate_batch(prompts, images, max_new_tokens=9, batch_size=3, prefill_chunk=300)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert [(r.text, r.prompt_tokens, r.crops, r.grids, r.finish_reason) for r in got] == \
        [(r.text, r.prompt_tokens, r.crops, r.grids, r.finish_reason) for r in ref]
    assert len({tuple(r.token_ids) for r in got}) == len(prompts)        # really different rows
    assert sorted({r.timings["batch_index"] for r in got}) == [0, 1]
    assert {r.timings["batch_size"] for r in got} == {2, 3}


def test_rows_that_end_early_leave_the_batch(model, image, monkeypatch):
    """An end token mid-batch ends that row there (as one by one) and the rows left decode
    without it: the fast engine's step runs on a smaller bucket of cache slots."""
    from bluelm_v.plugins.engines.batched import BatchedLlama

    prompts, images = _batch_inputs(image)
    gen = Generator(model, engine="fast")
    free = _one_by_one(gen, prompts, images, 10)
    gen.eos = {free[0].token_ids[2], free[2].token_ids[1], free[4].token_ids[3]}
    ref = _one_by_one(gen, prompts, images, 10)
    stops = [r.finish_reason for r in ref]
    assert stops.count("eos") >= 3 and "length" in stops
    widths = []
    step = BatchedLlama._step
    monkeypatch.setattr(BatchedLlama, "_step", lambda self, b, kv: (widths.append(b), step(self, b, kv))[1])
    got = gen.generate_batch(prompts, images, max_new_tokens=10)
    assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in ref]
    assert widths[0] == 5 and widths[-1] <= 2                            # 5 slots, then 2 or 1
    assert gen.engine.batch_cache_bytes > 0
    gen.engine.end_batch()                                               # the batched cache is freed
    assert gen.engine.batch_cache_bytes == 0


def test_generate_batch_streams_each_row_and_falls_back_one_by_one(model, image):
    prompts, images = _batch_inputs(image)
    pieces: dict[int, str] = {}
    gen = Generator(model)
    got = gen.generate_batch(prompts, images, max_new_tokens=6,
                             stream=lambda i, p: pieces.__setitem__(i, pieces.get(i, "") + p))
    assert [pieces.get(i, "") for i in range(len(prompts))] == [r.text for r in got]

    class NoBatchAPI:                      # an engine with only the batch-1 API
        def __init__(self, eng):
            self._eng = eng

        def __getattr__(self, name):
            if "batch" in name:
                raise AttributeError(name)
            return getattr(self._eng, name)
    one = Generator(model, engine=NoBatchAPI(gen.engine))
    assert [r.token_ids for r in one.generate_batch(prompts, images, max_new_tokens=6)] == \
        [r.token_ids for r in got]


def test_generate_batch_checks_every_input_before_any_work(model, image, tmp_path, monkeypatch):
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    gen = Generator(model)
    monkeypatch.setattr(FastLlamaEngine, "begin_batch", lambda *a: pytest.fail("work started"))
    with pytest.raises(InputError, match="one list of images per prompt"):
        gen.generate_batch(["<image>", "x"], [[image]])
    with pytest.raises(InputError, match="prompts: a list of prompts"):
        gen.generate_batch("<image>", [[image]])
    with pytest.raises(InputError, match=r"images\[1\]\[0\]: .*missing.png' does not exist"):
        gen.generate_batch(["<image>", "<image>"], [[image], [str(tmp_path / "missing.png")]])
    with pytest.raises(InputError, match=r"prompts\[1\]: has 0 <image>"):
        gen.generate_batch(["<image>", "no placeholder"], [[image], [image]])
    short = Generator(_build(llm={**TINY["llm"], "max_context": 700}))
    monkeypatch.setattr(FastLlamaEngine, "begin_batch", lambda *a: pytest.fail("work started"))
    with pytest.raises(InputError, match=r"prompts\[1\]: 1\d\d\d tokens .* context of 700"):
        short.generate_batch(["<image>", "<image><image>"], [[image], [image, image]])
    with pytest.raises(InputError, match="batch_size"):
        gen.generate_batch(["x"], [[]], batch_size=0)


def test_pack_rows_fills_forwards_with_whole_rows_and_cuts_long_ones():
    from bluelm_v.plugins.engines.batched import bucket_size, pack_rows

    assert pack_rows([3, 4, 2], 8) == [[(0, 0, 3), (1, 0, 4)], [(2, 0, 2)]]
    assert pack_rows([10, 2], 4) == [[(0, 0, 4)], [(0, 4, 4)], [(0, 8, 2), (1, 0, 2)]]
    assert [bucket_size(n, 6) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_batched_cuda_graph_steps_give_the_tokens_of_eager_steps(image):
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    model = _build().to("cuda")
    prompts, images = _batch_inputs(image)
    runs = []
    for graph in (False, True):
        gen = Generator(model, engine=FastLlamaEngine(model.llm.model, cuda_graph=graph))
        gen.eos = {999}                                  # never made: every row decodes 9 tokens
        runs.append([r.token_ids for r in gen.generate_batch(prompts, images, max_new_tokens=9)])
        assert (gen.engine._batched._graphs != {}) == graph
    assert runs[0] == runs[1]


def test_generate_batch_releases_the_encoder_after_the_last_batch(image):
    prompts, images = _batch_inputs(image)
    model = _build(seed=2)
    want = [r.token_ids for r in Generator(model).generate_batch(prompts, images, max_new_tokens=4)]
    gen = Generator(model, release_encoder=True)
    got = gen.generate_batch(prompts, images, max_new_tokens=4, batch_size=2)    # 3 batches
    assert [r.token_ids for r in got] == want and gen.encoder_released
    assert sum(p.numel() for p in model.encoder.parameters()) == 0
