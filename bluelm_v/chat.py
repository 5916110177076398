"""The chat template (ChatML, as SmolLM2 / Qwen use it) with an ``<image>`` placeholder.

    <|im_start|>system\n{system}<|im_end|>\n          (only when a system prompt is given)
    <|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n
    <|im_start|>assistant\n{answer}<|im_end|>\n

Each ``<image>`` becomes ONE sentinel id, ``IMAGE_TOKEN_ID`` (-200, never a real token), in the
token ids; BlueLMV.forward / the runtime replace it by that image's projected visual tokens.

    ids = prompt_ids(tokenizer, "<image>\nDescribe it.")              # generation prompt
    out = tokenize_conversation(sample["conversations"], tokenizer)  # LLaVA-format training
    out["input_ids"], out["labels"]     # labels: -100 except assistant turns (+ their <|im_end|>)
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .errors import InputError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


def _special(tokenizer, token: str) -> list[int]:
    """The id of a special token, or its plain encoding if the vocabulary lacks it."""
    tid = tokenizer.token_id(token)
    return [tid] if tid is not None else tokenizer.encode(token)


def encode_with_images(tokenizer, text: str) -> list[int]:
    """Text -> ids, each ``<image>`` -> IMAGE_TOKEN_ID."""
    ids: list[int] = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        if part:
            ids.extend(tokenizer.encode(part))
    return ids


def turn_ids(tokenizer, role: str, content: str) -> tuple[list[int], list[int]]:
    """One ChatML turn -> (header ids, body ids incl. <|im_end|> and the newline after it)."""
    header = _special(tokenizer, "<|im_start|>") + tokenizer.encode(f"{role}\n")
    body = encode_with_images(tokenizer, content) + _special(tokenizer, "<|im_end|>")
    return header, body + tokenizer.encode("\n")


def generation_prefix(tokenizer) -> list[int]:
    return _special(tokenizer, "<|im_start|>") + tokenizer.encode("assistant\n")


def prompt_ids(tokenizer, prompt: str | list[Mapping[str, str]], system: str | None = None) -> list[int]:
    """A user prompt (or a list of {role|from, content|value} messages) -> ids ending with the
    assistant header, ready for generation."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids: list[int] = []
    if system:
        h, b = turn_ids(tokenizer, "system", system)
        ids += h + b
    for m in messages:
        role, content = _role_and_text(m)
        h, b = turn_ids(tokenizer, role, content)
        ids += h + b
    return ids + generation_prefix(tokenizer)


def _role_and_text(message: Mapping[str, Any]) -> tuple[str, str]:
    raw = message.get("role", message.get("from"))
    text = message.get("content", message.get("value"))
    if raw not in ROLES or not isinstance(text, str):
        raise InputError(f"conversation turn {dict(message)!r}: needs 'from' (human/gpt/system) "
                         f"or 'role' (user/assistant/system) and a text 'value'/'content'")
    return ROLES[raw], text


def tokenize_conversation(conversations: Iterable[Mapping[str, Any]], tokenizer,
                          system: str | None = None, max_length: int | None = None) -> dict[str, Any]:
    """A LLaVA-format conversation -> {"input_ids", "labels", "n_images", "truncated"}.

    Loss (labels != -100) only on assistant turns: their text, their <|im_end|> and newline;
    headers, user/system turns and image sentinels are -100. ``max_length`` truncates the ids
    (the visual tokens a sentinel expands to are not counted here)."""
    input_ids: list[int] = []
    labels: list[int] = []
    if system:
        h, b = turn_ids(tokenizer, "system", system)
        input_ids += h + b
        labels += [IGNORE_INDEX] * (len(h) + len(b))
    for message in conversations:
        role, text = _role_and_text(message)
        h, b = turn_ids(tokenizer, role, text)
        input_ids += h + b
        labels += [IGNORE_INDEX] * len(h)
        if role == "assistant":
            labels += [IGNORE_INDEX if t == IMAGE_TOKEN_ID else t for t in b]
        else:
            labels += [IGNORE_INDEX] * len(b)
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels,
            "n_images": sum(1 for t in input_ids if t == IMAGE_TOKEN_ID), "truncated": truncated}


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)
