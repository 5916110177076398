"""Training step speed options (jobs/train/speed.py, loss.py): the chunked LM-head + cross-entropy
gives transformers' loss and the same gradients on the tiny model (padded batch, mask dropped),
its compile-ready formulation computes the same function, and the config keys are validated."""
from __future__ import annotations

from pathlib import Path

import pytest

from bluelm_v.chat import IMAGE_TOKEN_ID

REPO = Path(__file__).resolve().parents[1]


def _tiny_model():
    import torch

    from bluelm_v.model import BlueLMV
    from bluelm_v.plugin_manager import get

    torch.manual_seed(0)
    cfg = {"encoder": {"name": "siglip", "preset": "tiny", "pipelined": False, "image_size": 112},
           "downsampler": {"name": "vila_2x2"}, "projector": {"name": "mlp2x_gelu"},
           "llm": {"name": "hf_causal", "preset": "tiny"}}
    return BlueLMV.from_config(cfg, get()[1]).train()


def _padded_batch(gen):
    """Two right-padded rows of different lengths, one image each, labels on the text only."""
    import torch

    from bluelm_v.jobs.train.data import collate

    items = []
    for n, crops in ((23, 1), (11, 2)):
        ids = torch.randint(3, 250, (n,), generator=gen).tolist()
        ids[2] = IMAGE_TOKEN_ID
        labels = [-100] * 4 + ids[4:]
        items.append({"input_ids": ids, "labels": labels, "length": n,
                      "images": [torch.randn(crops, 3, 112, 112, generator=gen)]})
    return collate(items, pad_id=0)


def _loss_and_grads(step, batch):
    step.zero_grad(set_to_none=True)
    loss = step(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"], images=batch["images"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}


def test_chunked_loss_matches_transformers_loss_and_grads_on_padded_batch():
    import torch

    from bluelm_v.jobs.train.step import train_step_module

    model = _tiny_model()
    batch = _padded_batch(torch.Generator().manual_seed(1))
    assert batch["attention_mask"].min() == 0                          # real padding in the batch
    ref_loss, ref_grads = _loss_and_grads(train_step_module(model, 0), batch)
    loss, grads = _loss_and_grads(train_step_module(model, 7), batch)   # 7-token chunks: several + a remainder
    assert torch.isfinite(ref_loss) and loss == pytest.approx(ref_loss.item(), rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for part in ("encoder", "projector", "llm"):
        assert any(n.startswith(f"model.{part}.") for n in grads), part   # gradients reach every part
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, g in grads.items():   # relative, with an absolute floor (k_proj.bias grads are ~0 by symmetry)
        ref = ref_grads[name]
        assert (g - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6 * scale, name


def test_fused_chunk_formulation_equals_eager_one():
    import torch

    from bluelm_v.jobs.train.loss import ce_chunk_eager, ce_chunk_fused

    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(9, 16, generator=gen), torch.randn(50, 16, generator=gen)
    y = torch.randint(0, 50, (9,), generator=gen)
    y[[0, 5]] = -100
    inv = torch.tensor(1.0 / 7)
    l1, g1 = ce_chunk_eager(h, w, y, inv, True)
    l2, g2 = ce_chunk_fused(h, w, y, inv, True)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    assert torch.allclose(g1, g2, atol=1e-6) and g1[[0, 5]].abs().max() == 0
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    assert float(l1) == pytest.approx(float(ref), rel=1e-5)


def test_compiled_loss_path_pads_chunks_and_keeps_loss_and_grads(monkeypatch):
    # The compiled path pads each chunk to PAD_ROWS rows of ignored targets; the fused function
    # stands in for its torch.compile'd form (same maths, no compiler needed here).
    import torch

    from bluelm_v.jobs.train import loss

    monkeypatch.setitem(loss._COMPILED_CHUNK, "fn", loss.ce_chunk_fused)
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(300, 16, generator=gen, requires_grad=True)                 # [N, D]
    w = torch.randn(50, 16, generator=gen, requires_grad=True)                  # [V, D]
    y = torch.randint(0, 50, (300,), generator=gen)
    y[::7] = -100
    out = loss.chunked_linear_ce(h, w, y, chunk=100, compiled=True)           # chunks of 100 -> padded to 128
    out.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h2 @ w2.t(), y, ignore_index=-100)
    ref.backward()
    assert float(out.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_splice_plan_puts_each_image_at_its_placeholder():
    import torch

    from bluelm_v.splice import SplicePlan

    model = _tiny_model()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 250, (3, 12), generator=gen)
    ids[0, [2, 7]] = IMAGE_TOKEN_ID                                     # two images in row 0
    ids[2, 0] = IMAGE_TOKEN_ID                                          # row 1: text only
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 6:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    feats = [torch.randn(n, model.hidden_size, generator=gen) for n in (5, 3, 4)]
    text = model.llm.embed(ids.clamp(min=0))                            # [3, 12, D]
    plan = SplicePlan.build(ids, mask, labels, [f.shape[0] for f in feats])
    got = plan.embeds(text, torch.cat(feats))
    # by hand: row 0 = t[:2] f0 t[3:7] f1 t[8:] (8 + 10 = 18 rows), row 1 = t (12), row 2 = f2 t[1:] (15)
    rows = [torch.cat([text[0, :2], feats[0], text[0, 3:7], feats[1], text[0, 8:]]), text[1],
            torch.cat([feats[2], text[2, 1:]])]
    assert got.shape == (3, 18, model.hidden_size)
    for b, row in enumerate(rows):
        assert torch.equal(got[b, :row.shape[0]], row) and got[b, row.shape[0]:].abs().sum() == 0
    vis = [(0, 2, 5), (0, 11, 3), (2, 0, 4)]                            # (row, first index, length)
    for b, first, n in vis:
        assert (plan.labels[b, first:first + n] == -100).all() and (plan.attention_mask[b, first:first + n] == 1).all()
    assert plan.attention_mask.sum(1).tolist() == [18, 9, 6 - 1 + 4]
    assert torch.equal(plan.labels[1, :12], labels[1]) and (plan.labels[1, 12:] == -100).all()
    assert plan.right_padded
    ref = model.splice(ids, feats, mask, labels)                        # the model's splice is the plan's
    assert torch.equal(ref.embeds, got) and torch.equal(ref.labels, plan.labels)
    with pytest.raises(Exception, match="placeholder"):
        SplicePlan.build(ids, mask, labels, [5, 3])


def test_right_padded_detects_left_padding():
    import torch

    from bluelm_v.splice import right_padded

    assert right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))


@pytest.mark.parametrize("override, key", [("train.loss_chunk_tokens=-1", "train.loss_chunk_tokens"),
                                           ("train.sdpa_backend=fast", "train.sdpa_backend"),
                                           ("train.compile_mode=turbo", "train.compile_mode")])
def test_bad_speed_options_are_config_errors(compose, override, key):
    from bluelm_v.errors import ConfigError
    from bluelm_v.jobs.train import validate
    from bluelm_v.plugin_manager import get

    cfg = compose(["+experiment=train_tiny", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, get()[1])


def test_chunked_loss_with_frozen_llm_trains_only_the_projector_like_the_plain_loss():
    import torch

    from bluelm_v.jobs.train.optim import freeze_except
    from bluelm_v.jobs.train.step import train_step_module

    model = _tiny_model()
    freeze_except(model, ["projector"])                                  # stage 1: the head is frozen
    batch = _padded_batch(torch.Generator().manual_seed(3))
    ref_loss, ref_grads = _loss_and_grads(train_step_module(model, 0), batch)
    loss, grads = _loss_and_grads(train_step_module(model, 5), batch)
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    assert grads.keys() == ref_grads.keys() and all(n.startswith("model.projector.") for n in grads)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-7), name


def test_bench_defaults_are_the_train_jobs_settings(compose):
    # bench/bench_train_gpu.py reads its defaults from the YAML files without Hydra; they must be
    # what the job composes under +experiment=train, key for key.
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import bench_train_gpu

    d = bench_train_gpu.job_defaults()
    t = compose(["+experiment=train"]).train
    cfg = compose(["+experiment=train"])
    expect = {"compile": t.compile, "cmode": t.compile_mode, "ce": t.loss_chunk_tokens, "attn": t.sdpa_backend,
              "fused": t.fused_projections, "doc_attn": t.attention, "ckpt": t.activation_checkpointing,
              "encoder_tiles": t.encoder_tiles_per_batch, "pack": t.stage2.packing if t.packing is None else t.packing,
              "max_seq": t.max_seq, "longest_first": t.pack_longest_first, "group": t.data.group_by_length,
              "max_length": t.data.max_length, "micro_batch": t.stage2.micro_batch, "accum": t.stage2.grad_accum,
              "torch_adam": t.optim.torch_adam}
    assert {k: d[k] for k in expect} == expect
    assert d["tiler"] == {k: v for k, v in cfg.tiler.items()}
    assert bench_train_gpu.ds_config is not None and d["ds"] == "zero2" and cfg.deepspeed.zero_optimization.stage == 2
    args = bench_train_gpu.parse_args([])
    assert (args.compile, args.ce, args.fused, args.pack, args.max_seq, args.micro_batch) == (
        d["compile"], d["ce"], d["fused"], d["pack"], d["max_seq"], d["micro_batch"])


def test_a_workers_config_error_is_found_inside_rays_wrapping():
    from bluelm_v.errors import ConfigError
    from bluelm_v.jobs.train import config_error_in

    class RayLike(Exception):                 # Ray's task error: the original on .cause, a traceback as text
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  ...\nConfigError: " + str(cause))
            self.cause = cause

    original = ConfigError("train.stage2: the training decoder ... cannot run this LLM: no rotary")
    try:
        try:
            raise RayLike(original)
        except RayLike as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as exc:
        wrapped = exc
    assert config_error_in(wrapped) == str(original)
    as_instance = type("RayTaskError(ConfigError)", (RayLike, ConfigError), {})(original)
    try:
        raise RuntimeError("Training failed") from as_instance
    except RuntimeError as exc:
        assert config_error_in(exc) == str(original)
    assert config_error_in(RuntimeError("other")) is None


@pytest.mark.parametrize("override, key", [("train.attention=fast", "train.attention"),
                                           ("train.attention=varlen", "train.attention"),
                                           ("train.max_seq=128", "train.data.max_length")])
def test_bad_packing_options_are_config_errors(compose, override, key):
    from bluelm_v.errors import ConfigError
    from bluelm_v.jobs.train import validate
    from bluelm_v.plugin_manager import get

    cfg = compose(["+experiment=train_tiny", override])     # CPU workers: varlen cannot run
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, get()[1])
