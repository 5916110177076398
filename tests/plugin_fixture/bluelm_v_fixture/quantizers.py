"""quantizer ``fp16_round``: floating-point weights of the target parts rounded through float16
(fake quantisation: they stay float32); checkpoints are a torch state dict + the settings."""
import json
from pathlib import Path

from bluelm_v import hookimpl

PARTS = ("encoder", "downsampler", "projector", "llm")


class Fp16Round:
    name = "fp16_round"

    def __init__(self, targets=("llm",)):
        bad = [t for t in targets if t not in (*PARTS, "all")]
        if bad:
            raise ValueError(f"targets: {bad} are not model parts; use any of {[*PARTS, 'all']}")
        self.targets, self.rounded = list(targets), 0

    def _parts(self, model) -> dict:
        if "all" in self.targets or not any(hasattr(model, p) for p in PARTS):
            return {"all": model}
        return {p: getattr(model, p) for p in self.targets if hasattr(model, p)}

    def apply(self, model, materialize=None):
        """Round in place, layer by layer, and return the model. A model built on the meta device
        comes with ``materialize(name, module)``, which gives a layer real weights first."""
        import torch

        with torch.no_grad():
            for part in self._parts(model).values():
                for name, module in part.named_modules():
                    own = list(module.parameters(recurse=False))
                    if materialize is not None and any(p.is_meta for p in own):
                        materialize(name, module)
                        own = list(module.parameters(recurse=False))
                    for p in own:
                        if p.is_floating_point() and not p.is_meta:
                            p.copy_(p.to(torch.float16).to(p.dtype))
                            self.rounded += 1
        return model

    def prepare(self, model):
        """The structure a checkpoint loads into: unchanged (rounding keeps the layers)."""
        return model

    def save(self, model, directory) -> dict:
        import torch

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.state_dict() for n, p in self._parts(model).items()}, directory / "fp16_round.pt")
        (directory / "settings.json").write_text(json.dumps(self.settings()))
        return {"files": ["fp16_round.pt", "settings.json"]}

    def load(self, model, directory):
        import torch

        directory = Path(directory)
        saved = json.loads((directory / "settings.json").read_text())
        if saved != self.settings():
            raise ValueError(f"{directory}: saved with {saved}, not {self.settings()}")
        states = torch.load(directory / "fp16_round.pt", weights_only=True)
        for name, part in self._parts(model).items():
            part.load_state_dict(states[name])
        return model

    def settings(self) -> dict:
        return {"quantizer": self.name, "targets": self.targets}

    def describe(self) -> dict:
        return {**self.settings(), "rounded_tensors": self.rounded}


@hookimpl
def bluelm_v_register(registry):
    registry.quantizer.register("fp16_round", Fp16Round, description="weights rounded through float16")
