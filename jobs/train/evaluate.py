"""Held-out question answering: greedy answers from the model, exact match against the record;
where records list ``choices``, also the candidate the model finds most likely (choice accuracy).

Every rank answers an equal shard of the eval records (the last record repeated where a shard
is short; repeats are not scored) and always decodes ``max_new_tokens`` steps, so ranks stay in
lockstep even under ZeRO-3 (whose forwards are collective). Counts are summed over ranks.
"""
from __future__ import annotations

import string
from pathlib import Path


def normalise(text: str) -> str:
    """lower-case, surrounding whitespace and punctuation removed."""
    return text.strip().lower().strip(string.punctuation + string.whitespace)


def reference_answer(record: dict) -> str:
    """The record's ``answer`` field, else its last assistant turn."""
    if "answer" in record:
        return str(record["answer"])
    turns = [t for t in record["conversations"] if t.get("from", t.get("role")) in ("gpt", "assistant")]
    return turns[-1]["value"] if turns else ""


def prompt_turns(record: dict) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    turns = list(record["conversations"])
    while turns and turns[-1].get("from", turns[-1].get("role")) in ("gpt", "assistant"):
        turns.pop()
    return turns


def greedy_decode(module, prompt: list[int], pixels, max_new_tokens: int, device) -> list[int]:
    """Greedy tokens after ``prompt`` (no KV cache: eval prompts are short). ``pixels`` [K,3,B,B]
    or None for a text-only prompt."""
    import torch

    feats = module.image_features([pixels.to(device)]) if pixels is not None else []
    out: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.tensor([prompt + out], dtype=torch.long, device=device)    # [1, L]
        s = module.splice(ids, feats)
        logits = module.llm.model(inputs_embeds=s.embeds, attention_mask=s.attention_mask,
                                  use_cache=False).logits                     # [1, L', V]
        out.append(int(logits[0, -1].float().argmax()))
    return out


def choice_scores(module, prompt: list[int], pixels, choices: list[list[int]], device) -> list[float]:
    """Summed log-probability of each candidate continuation after ``prompt``, one batched
    forward (rows right-padded; only each candidate's own tokens are scored)."""
    import torch

    feats = module.image_features([pixels.to(device)]) * len(choices) if pixels is not None else []
    longest = max(len(c) for c in choices)
    ids = torch.zeros((len(choices), len(prompt) + longest), dtype=torch.long, device=device)   # [C, L]
    mask = torch.zeros_like(ids)
    for r, c in enumerate(choices):
        ids[r, :len(prompt) + len(c)] = torch.tensor(prompt + c, device=device)
        mask[r, :len(prompt) + len(c)] = 1
    s = module.splice(ids, feats, attention_mask=mask)
    logp = module.llm.model(inputs_embeds=s.embeds, attention_mask=s.attention_mask,
                            use_cache=False).logits.float().log_softmax(-1)             # [C, L', V]
    shift = s.embeds.shape[1] - ids.shape[1]          # visual tokens added before the text
    scores = []
    for r, c in enumerate(choices):
        start = shift + len(prompt)                   # position of the first candidate token
        pos = torch.arange(start - 1, start - 1 + len(c), device=device)
        scores.append(float(logp[r, pos, torch.tensor(c, device=device)].sum()))
    return scores


def evaluate(module, records: list[dict], image_root: str | Path, tiler, tokenizer, rank: int, world: int,
             max_new_tokens: int, device, system: str | None = None, examples: int = 5) -> dict:
    """Accuracy over ``records`` (overall, per ``kind`` and per ``seen_pair`` when present)."""
    import torch
    import torch.distributed as dist
    from bluelm_v.data.image_sizes import open_image

    from bluelm_v.chat import prompt_ids

    with_choices = any("choices" in r for r in records)
    keys = sorted({"all"} | {f"kind/{r['kind']}" for r in records if "kind" in r}
                  | {f"pair/{'seen' if r['seen_pair'] else 'unseen'}" for r in records if "seen_pair" in r})
    per_rank = -(-len(records) // world)
    shard = records[rank::world]
    real = len(shard)
    shard = shard + [records[-1]] * (per_rank - real)
    eos = {tokenizer.eos_token_id, tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")} - {None}
    end = [tokenizer.token_id("<|im_end|>") or tokenizer.eos_token_id]
    choice_hits = torch.zeros(2, dtype=torch.float64)   # [correct, scored]
    correct = torch.zeros(len(keys), dtype=torch.float64)
    total = torch.zeros(len(keys), dtype=torch.float64)
    shown = []
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for i, rec in enumerate(shard):
            pixels = None
            if rec.get("image"):
                with open_image(Path(image_root) / rec["image"], f"eval record {rec.get('id', i)}") as im:
                    pixels = tiler.transform(im.convert("RGB")).pixels        # [K, 3, B, B]
            prompt = prompt_ids(tokenizer, prompt_turns(rec), system)
            gen = greedy_decode(module, prompt, pixels, max_new_tokens, device)
            cut = next((j for j, t in enumerate(gen) if t in eos), len(gen))
            pred, ref = tokenizer.decode(gen[:cut]), reference_answer(rec)
            if with_choices:   # every rank scores every record (lockstep), even unscored repeats
                options = list(rec.get("choices") or [ref])
                scores = choice_scores(module, prompt, pixels, [tokenizer.encode(o) + end for o in options], device)
                picked = options[max(range(len(options)), key=scores.__getitem__)]
                if i < real and "choices" in rec:
                    choice_hits += torch.tensor([float(normalise(picked) == normalise(ref)), 1.0], dtype=torch.float64)
            if i >= real:
                continue
            hit = float(normalise(pred) == normalise(ref))
            for k in ("all", f"kind/{rec.get('kind')}",
                      f"pair/{'seen' if rec.get('seen_pair') else 'unseen'}" if "seen_pair" in rec else None):
                if k in keys:
                    correct[keys.index(k)] += hit
                    total[keys.index(k)] += 1
            if len(shown) < examples:
                shown.append({"id": rec.get("id"), "answer": ref, "predicted": pred})
    module.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
        dist.all_reduce(choice_hits)
    acc = {k: (correct[i] / total[i]).item() if total[i] else None for i, k in enumerate(keys)}
    return {"accuracy": acc.pop("all"), "n": int(total[keys.index("all")].item()), "by": acc,
            "choice_accuracy": (choice_hits[0] / choice_hits[1]).item() if choice_hits[1] else None,
            "examples": shown}
