"""Sequence packing (jobs/train/packing.py, jobs/train/decoder.py, jobs/train/step.py): a packed
micro-batch gives the loss and the gradients of the same samples run one by one (token-weighted,
as one padded batch would), for transformers' Llama and the native one, with and without fused
projections; first-fit packing and the packed batch plan; the training decoder equals the LLM's
own forward on ordinary rows."""
from __future__ import annotations

import pytest

from bluelm_v.chat import IMAGE_TOKEN_ID

TOKENS_PER_CROP = 16          # 112-px tiles: 8x8 ViT tokens -> 16 after the 2x2 merge


def _tiny_model(implementation: str = "transformers"):
    import torch

    from bluelm_v.model import BlueLMV
    from bluelm_v.plugin_manager import get

    torch.manual_seed(0)
    cfg = {"encoder": {"name": "siglip", "preset": "tiny", "pipelined": False, "image_size": 112},
           "downsampler": {"name": "vila_2x2"}, "projector": {"name": "mlp2x_gelu"},
           "llm": {"name": "hf_causal", "preset": "tiny", "implementation": implementation}}
    model = BlueLMV.from_config(cfg, get()[1]).train()
    assert model.tokens_per_crop == TOKENS_PER_CROP
    return model


def _samples(gen, n_text=(9, 23, 14, 30, 6), crops=(1, 2, 0, 1, 0)):
    """Items as the dataset returns them: an image sentinel where there are crops, the loss on the
    last part of each text (the 'answer')."""
    import torch

    items = []
    for n, k in zip(n_text, crops):
        ids = torch.randint(3, 250, (n,), generator=gen).tolist()
        if k:
            ids[1] = IMAGE_TOKEN_ID
        answer = max(1, n // 3)
        labels = [-100] * (n - answer) + ids[n - answer:]
        images = [torch.randn(k, 3, 112, 112, generator=gen)] if k else []
        items.append({"input_ids": ids, "labels": labels, "images": images,
                      "length": n - (1 if k else 0) + k * TOKENS_PER_CROP})
    return items


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _one_by_one(model, items):
    """Token-weighted loss and gradients of each sample run alone through BlueLMV.forward."""
    import torch

    from bluelm_v.jobs.train.data import collate

    counts = [sum(1 for y in it["labels"][1:] if y != -100) for it in items]
    total = sum(counts)
    loss_sum, grads = 0.0, {}
    for it, n in zip(items, counts):
        model.zero_grad(set_to_none=True)
        b = collate([it], pad_id=0)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                     images=b["images"]).loss
        (loss * n / total).backward()
        loss_sum += float(loss.detach()) * n / total
        for name, g in _grads(model).items():
            grads[name] = grads.get(name, torch.zeros_like(g)) + g
    return loss_sum, grads


@pytest.mark.parametrize("implementation, fused, chunk", [("transformers", True, 0), ("transformers", False, 7),
                                                          ("native", True, 7)])
def test_packed_batch_equals_samples_run_one_by_one(implementation, fused, chunk):
    # fp32 on CPU; tolerance: loss rel 1e-5, each gradient within 1e-4 of its largest entry
    # (+ 1e-6 of the largest gradient anywhere: k_proj biases are ~0 by symmetry).
    import torch

    from bluelm_v.jobs.train.packing import collate_packed
    from bluelm_v.jobs.train.step import train_step_module

    model = _tiny_model(implementation)
    items = _samples(torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _one_by_one(model, items)
    rows = [[items[0], items[1], items[4]], [items[2], items[3]]]         # 2 rows, 5 samples
    max_seq = 96
    batch = collate_packed(rows, pad_id=0, max_seq=max_seq, tokens_per_crop=TOKENS_PER_CROP)
    assert [sum(r) for r in batch["doc_lens"]] == [max_seq, max_seq]       # padding is a document of its own
    step = train_step_module(model, chunk, fused=fused, attention="sdpa", max_seq=max_seq, packing=True)
    step.zero_grad(set_to_none=True)
    loss = step(input_ids=batch["input_ids"], labels=batch["labels"], images=batch["images"],
                attention_mask=batch["attention_mask"], doc_lens=batch["doc_lens"]).loss
    loss.backward()
    grads = {n[len("model."):]: g for n, g in _grads(step).items()}
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for part in ("encoder", "projector", "llm"):
        assert any(n.startswith(part + ".") for n in grads), part
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, g in grads.items():
        ref = ref_grads[name]
        assert (g - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6 * scale, name


def test_packing_without_document_mask_would_differ():
    # The equality above is not vacuous: the same rows read as one document each (every sample
    # seeing the samples before it, positions running on) give another loss.
    import torch

    from bluelm_v.jobs.train.packing import collate_packed
    from bluelm_v.jobs.train.step import train_step_module

    model = _tiny_model()
    items = _samples(torch.Generator().manual_seed(1))
    batch = collate_packed([[items[0], items[1], items[4]], [items[2], items[3]]], 0, 96, TOKENS_PER_CROP)
    step = train_step_module(model, 0, fused=True, attention="sdpa", max_seq=96, packing=True)
    args = dict(input_ids=batch["input_ids"], labels=batch["labels"], images=batch["images"],
                attention_mask=batch["attention_mask"])
    with torch.no_grad():
        masked = float(step(**args, doc_lens=batch["doc_lens"]).loss)
        whole_rows = float(step(**args, doc_lens=[[96], [96]]).loss)
    assert abs(masked - whole_rows) > 1e-3


def test_training_decoder_equals_the_llms_own_forward_on_padded_rows():
    import torch

    from bluelm_v.jobs.train.data import collate
    from bluelm_v.jobs.train.step import train_step_module

    model = _tiny_model()
    batch = collate(_samples(torch.Generator().manual_seed(2))[:3], pad_id=0)
    assert batch["attention_mask"].min() == 0
    args = dict(input_ids=batch["input_ids"], labels=batch["labels"], images=batch["images"],
                attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref = float(train_step_module(model, 0)(**args).loss)               # BlueLMV.forward
        own = float(train_step_module(model, 0, fused=True)(**args).loss)   # decoder.py, causal
    assert own == pytest.approx(ref, rel=1e-5)


def test_first_fit_fills_rows_and_keeps_every_sample_once():
    import random

    from bluelm_v.jobs.train.packing import first_fit

    rng = random.Random(0)
    lengths = [rng.randint(20, 900) for _ in range(500)]
    lower_bound = -(-sum(lengths) // 1024)
    for longest_first, slack in ((True, 1.05), (False, 1.2)):
        bins = first_fit(lengths, 1024, longest_first=longest_first)
        assert sorted(i for b in bins for i in b) == list(range(500))
        assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
        assert len(bins) <= slack * lower_bound + 1                         # near the fewest rows possible
    assert first_fit([5, 5, 5], 10) == [[0, 1], [2]]                        # first fit, not a new row each
    assert first_fit([2, 9, 8], 10, longest_first=False) == [[0, 2], [1]]    # arrival order kept
    assert first_fit([2, 9, 8], 10) == [[1], [2, 0]]
    with pytest.raises(ValueError, match="sample 1: 11 tokens"):
        first_fit([3, 11], 10)


def test_packed_plan_deals_rows_to_ranks_and_covers_every_sample_each_epoch():
    import random

    from bluelm_v.jobs.train.packing import PackedPlan

    rng = random.Random(3)
    lengths = [rng.randint(50, 2000) for _ in range(400)]
    plans = [PackedPlan(lengths, 4096, micro_batch=2, world_size=2, rank=r, seed=5, window=128) for r in range(2)]
    spe = plans[0].steps_per_epoch
    assert spe == len(plans[0].bins) // 4 and plans[0].fill > 0.9
    seen = [i for k in range(spe) for p in plans for i in p.indices(k)]
    assert len(seen) == len(set(seen))                                      # no sample twice in an epoch
    leftover = {i for b in plans[0].bins for i in b} - set(seen)            # only the last partial batch's rows
    assert len(leftover) <= sum(len(b) for b in sorted(plans[0].bins, key=len)[-3:])
    for k in range(spe):
        rows = plans[0].rows(k)
        assert len(rows) == 2 and all(sum(lengths[i] for i in r) <= 4096 for r in rows)
    again = PackedPlan(lengths, 4096, micro_batch=2, world_size=2, rank=1, seed=5, window=128)
    assert [again.rows(k) for k in range(spe, 2 * spe)] == [plans[1].rows(k) for k in range(spe, 2 * spe)]
    assert plans[1].rows(0) != plans[1].rows(spe)                          # a new epoch reshuffles the rows


def test_collate_packed_masks_sample_boundaries_and_refuses_overflow():
    import torch

    from bluelm_v.jobs.train.packing import collate_packed

    a = {"input_ids": [1, IMAGE_TOKEN_ID, 2], "labels": [7, -100, 2], "images": [torch.zeros(2, 3, 4, 4)], "length": 34}
    b = {"input_ids": [5, 6], "labels": [5, 6], "images": [], "length": 2}
    out = collate_packed([[a, b]], pad_id=0, max_seq=40, tokens_per_crop=16)
    assert out["input_ids"].tolist() == [[1, IMAGE_TOKEN_ID, 2, 5, 6]]
    assert out["labels"].tolist() == [[-100, -100, 2, -100, 6]]            # each sample's first label dropped
    assert out["doc_lens"] == [[34, 2, 4]] and out["lengths"] == [34, 2] and out["crops"] == 2
    with pytest.raises(ValueError, match="exceed max_seq 30"):
        collate_packed([[a, b]], pad_id=0, max_seq=30, tokens_per_crop=16)
