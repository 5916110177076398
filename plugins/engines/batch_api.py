"""The engines' batch API (next to begin/prefill/step), shared by ``fast``/``triton`` (batched.py)
and ``hf`` (hf_batch.py); Generator.generate_batch drives it (bluelm_v/batch_generate.py).

    eng.supports_batch()                              # False: the runtime runs prompts one by one
    eng.begin_batch(rows, max_len)                    # one cache for ``rows`` sequences
    logits = eng.prefill_batch([emb_r [1,L_r,D]], chunk)    # -> [rows, V] last logits per row
    toks = eng.steps_batch(rows, tokens, n)           # n greedy tokens per listed row; rows left
                                                      # out are finished for good (work stops)
    eng.batch_capacity, eng.batch_cache_bytes, eng.end_batch()
"""
from __future__ import annotations


class BatchAPI:
    """Mixin: the batch API over ``self._new_batch()`` (an object with begin / prefill / steps /
    capacity / nbytes), made at the first ``begin_batch`` and kept until ``end_batch``."""

    _batched = None

    def _new_batch(self):
        raise NotImplementedError

    def supports_batch(self) -> bool:
        """Batches keep K/V in the model dtype: not for a model marked for an INT8 (kv8) cache."""
        from bluelm_v.nn.kv_cache import kv_cache_kind

        return kv_cache_kind(self.model) != "int8"

    def begin_batch(self, rows: int, max_len: int) -> None:
        """Start ``rows`` sequences of at most ``max_len`` positions each."""
        if self._batched is None:
            self._batched = self._new_batch()
        self._batched.begin(rows, max_len)

    def prefill_batch(self, embeds: list, chunk: int):
        """embeds[r] [1,L_r,D] -> [rows, V] fp32 logits of each row's last position."""
        return self._batched.prefill(embeds, chunk)

    def steps_batch(self, rows: list[int], tokens: list[int], n: int) -> list[list[int]]:
        """n greedy tokens for each listed row (fed ``tokens``); rows left out are finished."""
        return self._batched.steps(rows, tokens, n)

    def end_batch(self) -> None:
        """Free the batched cache (and its CUDA graphs); the next begin_batch makes new ones."""
        self._batched = None

    @property
    def batch_capacity(self) -> int:
        """Positions each row of the current batch may fill."""
        return self._batched.capacity

    @property
    def batch_cache_bytes(self) -> int:
        return self._batched.nbytes if self._batched is not None else 0
