"""A bluelm-v model for lmms-eval (a plugin of lmms-eval, not of bluelm-v):

    lmms-eval --model bluelm_v --model_args checkpoint=RUN/checkpoint --tasks TASK [--include_path DIR]
    lmms-eval --model bluelm_v --model_args checkpoint=DIR,batch_size=16,device=cuda,engine=fast --tasks ...

lmms-eval finds it through the entry-point group ``lmms_eval.models`` (pyproject.toml:
``bluelm_v = "bluelm_v.plugins.lmms_eval_model:manifest"``), which returns a ``ModelManifest``
naming :class:`BlueLMV` below. This module imports lmms_eval and is loaded only by lmms-eval
(bluelm-v's own plugin manager reads the ``bluelm_v`` group, where it is not listed).

The model is a train run's checkpoint (bluelm_v/checkpoint.py): its tiler, parts and weights.
``generate_until`` answers ``batch_size`` requests per ``Generator.generate_batch`` call
(greedy; lmms-eval's ``until`` strings cut the answer; ``max_new_tokens`` from the task's
generation kwargs); an ``<image>`` placeholder is put first for each image the context does
not place itself. ``loglikelihood`` scores a continuation after the chat-formatted context
with one forward pass (sum of log-probabilities, and whether greedy decoding would produce it).
"""
from __future__ import annotations

from typing import List, Tuple

from lmms_eval.api.model import lmms

from bluelm_v.chat import IMAGE_PLACEHOLDER, prompt_ids


def manifest():
    """The entry point lmms-eval loads: model id ``bluelm_v`` -> :class:`BlueLMV`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="bluelm_v", simple_class_path=f"{__name__}.BlueLMV")


def _flatten(visuals) -> list:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        elif v is not None:
            out.append(v.convert("RGB") if hasattr(v, "convert") else v)
    return out


class BlueLMV(lmms):
    """lmms-eval's simple-model interface over a bluelm-v checkpoint."""

    is_simple = True

    def __init__(self, checkpoint: str, device: str = "auto", engine: str = "auto", batch_size: int | str = 8,
                 dtype: str = "auto", prefill_chunk: int | str = 128, max_new_tokens: int | str = 32,
                 system: str | None = None, **kwargs) -> None:
        super().__init__()
        import torch

        from bluelm_v.checkpoint import load_checkpoint
        from bluelm_v.plugin_manager import get
        from bluelm_v.runtime import Generator

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cast = {"auto": torch.bfloat16 if str(device).startswith("cuda") else None,
                "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        _, registry, _ = get()
        model, self.info = load_checkpoint(checkpoint, registry, device=device, dtype=cast)
        self.gen = Generator(model, engine=engine, registry=registry, prefill_chunk=int(prefill_chunk), system=system)
        self.batch_size_per_gpu = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)
        self.system = system
        self._device = torch.device(device)

    @property
    def model(self):
        return self.gen.model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def _prompt(self, context: str, n_images: int) -> str:
        missing = n_images - context.count(IMAGE_PLACEHOLDER)
        return (IMAGE_PLACEHOLDER + "\n") * max(0, missing) + context

    def generate_until(self, requests) -> List[str]:
        from tqdm import tqdm

        answers: list[str] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="bluelm_v answering")
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start:start + self.batch_size]]
            groups: dict[tuple, list[int]] = {}
            for i, (_, kwargs, *_rest) in enumerate(chunk):   # one call per distinct max_new_tokens
                groups.setdefault((int(kwargs.get("max_new_tokens", self.default_max_new_tokens)),), []).append(i)
            texts: dict[int, str] = {}
            for (max_new,), members in groups.items():
                prompts, images = [], []
                for i in members:
                    context, _, doc_to_visual, doc_id, task, split = chunk[i]
                    visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
                    prompts.append(self._prompt(context, len(visuals)))
                    images.append(visuals)
                results = self.gen.generate_batch(prompts, images, max_new, batch_size=self.batch_size)
                for i, res in zip(members, results):
                    texts[i] = res.text
            for i, (_, kwargs, *_rest) in enumerate(chunk):
                text = texts[i]
                until = kwargs.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop:
                        text = text.split(stop)[0]
                answers.append(text.strip())
            bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        import torch

        model, tok = self.gen.model, self.gen.tokenizer
        out = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = _flatten(doc_to_visual(doc)) if doc_to_visual else []
            prompt = prompt_ids(tok, self._prompt(context, len(visuals)), system=self.system)
            target = tok.encode(continuation)
            with torch.no_grad():
                pixels = [model.tiler.transform(v).pixels for v in visuals]
                feats = model.image_features(pixels) if pixels else []
                device = next(model.llm.model.parameters()).device
                ids = torch.tensor([prompt + target], device=device)                    # [1, L]
                s = model.splice(ids, feats)
                logits = model.llm.model(inputs_embeds=s.embeds, attention_mask=s.attention_mask,
                                         use_cache=False).logits[0].float()           # [L', V]
            start = s.embeds.shape[1] - len(target)           # first continuation position
            logp = logits[start - 1:-1].log_softmax(-1)                                 # [T, V]
            want = torch.tensor(target, device=logp.device)
            out.append((float(logp.gather(1, want[:, None]).sum()), bool((logp.argmax(-1) == want).all())))
        return out

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("bluelm_v: multi-round generation is not supported; use generate_until tasks")
