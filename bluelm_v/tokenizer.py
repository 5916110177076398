"""The small tokenizer interface the model, chat template and runtime use, and two implementations:

    tok.encode("text")          -> list[int]   (no BOS added; special-token strings recognised)
    tok.decode([ids])           -> str         (special tokens dropped unless keep_special=True)
    tok.token_id("<|im_end|>")  -> int | None
    tok.eos_token_id, tok.pad_token_id, tok.vocab_size, tok.hf (the wrapped HF tokenizer or None)

``ByteTokenizer`` (256 byte ids + ChatML specials) needs no files: the tiny test presets use it.
``HFTokenizer`` wraps any transformers tokenizer (e.g. the one transformers reads from a GGUF).
"""
from __future__ import annotations

import re
from typing import Iterable

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the ChatML specials. EOS is <|im_end|>."""

    def __init__(self, specials: Iterable[str] = CHATML_SPECIALS):
        self.specials = list(specials)
        self._special_ids = {s: 256 + i for i, s in enumerate(self.specials)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")
        self.vocab_size = 256 + len(self.specials)
        self.eos_token_id = self._special_ids["<|im_end|>"]
        self.pad_token_id = self._special_ids["<pad>"]
        self.bos_token_id = None
        self.hf = None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._special_ids:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 0:   # an image sentinel (chat.IMAGE_TOKEN_ID)
                out.append(buf.decode("utf-8", errors="replace") + ("<image>" if keep_special else ""))
                buf = bytearray()
                continue
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if keep_special and i - 256 < len(self.specials):
                out.append(self.specials[i - 256])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_id(self, token: str) -> int | None:
        return self._special_ids.get(token)

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer:
    """Adapter over a transformers tokenizer (fast or slow)."""

    def __init__(self, hf):
        self.hf = hf
        self.vocab_size = len(hf)
        self.bos_token_id = hf.bos_token_id
        im_end = self.token_id("<|im_end|>")
        self.eos_token_id = im_end if im_end is not None else hf.eos_token_id
        pad = hf.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):   # image sentinels (chat.IMAGE_TOKEN_ID)
            parts, cur = [], []
            for i in ids:
                if i < 0:
                    parts.append(self.hf.decode(cur, skip_special_tokens=not keep_special))
                    parts.append("<image>" if keep_special else "")
                    cur = []
                else:
                    cur.append(i)
            parts.append(self.hf.decode(cur, skip_special_tokens=not keep_special))
            return "".join(parts)
        return self.hf.decode(ids, skip_special_tokens=not keep_special)

    def token_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or tid == self.hf.unk_token_id:
            return None
        return int(tid)

    def __len__(self) -> int:
        return self.vocab_size
