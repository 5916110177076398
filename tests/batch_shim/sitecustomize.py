"""Test-only stand-in for ``Generator.generate_batch`` while the batched runtime is not on this
branch: one ``generate`` call per prompt behind the batched signature. It is installed only
when ``bluelm_v.runtime.Generator`` has no ``generate_batch`` of its own, in this process
(``install()``) and, through PYTHONPATH (this file is a ``sitecustomize``), in Ray workers
started by a test (an import hook patches ``bluelm_v.runtime`` when it is first imported)."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _generate_batch(self, prompts, images, max_new_tokens=64, stream=None, prefill_chunk=None,
                    tiles_per_batch=None, batch_size=None):
    return [self.generate(p, list(ims), max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk,
                          tiles_per_batch=tiles_per_batch) for p, ims in zip(prompts, images)]


def install(module=None) -> bool:
    """Add the stand-in when the runtime lacks generate_batch; True when it was added."""
    if module is None:
        import bluelm_v.runtime as module
    if hasattr(module.Generator, "generate_batch"):
        return False
    module.Generator.generate_batch = _generate_batch
    return True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bluelm_v.runtime":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            install(module)

        spec.loader.exec_module = exec_module
        return spec


if "bluelm_v.runtime" in sys.modules:
    install(sys.modules["bluelm_v.runtime"])
else:
    sys.meta_path.insert(0, _PatchOnImport())
