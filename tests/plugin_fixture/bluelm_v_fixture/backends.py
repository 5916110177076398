"""backend ``wallclock``: the configured model (tiler/encoder/downsampler/projector/llm of the
config the benchmark gives each device) on this host's CPU, timed through bluelm-v's runtime;
plus a device inventory: the ``bluelm_v_devices`` hook adds one wallclock device per name in
BLUELM_V_FIXTURE_DEVICES (comma-separated)."""
import os
import time

from bluelm_v import hookimpl


class WallClock:
    kind = "real"                                        # "simulated" for cost models

    def __init__(self, engine: str = "recompute"):
        self.engine, self.gen, self.quantizer = engine, None, "unset"

    def load(self, cfg, registry) -> dict:
        """Once per device, in its Ray actor: ``cfg`` is the composed config (with the device's
        overrides), ``registry`` the one the worker built. Returns load figures."""
        self.cfg, self.registry = cfg, registry
        t0 = time.perf_counter()
        self._build(None)
        return {"load_s": time.perf_counter() - t0}

    def _build(self, quantizer) -> None:
        from bluelm_v.model import BlueLMV
        from bluelm_v.runtime import Generator

        self.close()
        model = BlueLMV.from_config(self.cfg, self.registry).eval()
        for node in ([] if quantizer is None else quantizer if isinstance(quantizer, list) else [quantizer]):
            model = self.registry.create_from_config("quantizer", node, "case.quantizer").apply(model) or model
        self.gen, self.quantizer = Generator(model, engine=self.engine, registry=self.registry), quantizer

    def run_case(self, case: dict) -> dict:
        """One trial of ``case`` (the job repeats it: warm-up, trials, medians)."""
        from PIL import Image

        from bluelm_v.chat import IMAGE_TOKEN_ID
        from bluelm_v.runtime import peak_rss_mb

        if case.get("quantizer") != self.quantizer:
            self._build(case.get("quantizer"))
        gen, n_new = self.gen, int(case["decode_tokens"])
        image = Image.new("RGB", tuple(case["image"]), (90, 140, 200))
        t0 = time.perf_counter()
        enc = gen.encode_image(image, tiles_per_batch=int(case["tiles_per_batch"]),
                               pipelined=bool(case.get("pipelined", True))).result()
        visual = int(enc["features"].shape[0])
        ids = [IMAGE_TOKEN_ID] + [ord("a")] * max(1, int(case["prompt_tokens"]) - visual)
        embeds = gen.embed_prompt(ids, [enc["features"]])                 # [1, L, D]
        t_pre = time.perf_counter()
        first = int(gen.prefill(embeds, n_new, chunk=int(case["prefill_chunk"])).argmax())
        t_first = time.perf_counter()
        tokens = gen.engine.steps(first, max(0, n_new - 1))
        t_end = time.perf_counter()
        return {"grid": "{}:{}".format(*enc["grid"]), "crops": enc["crops"], "visual_tokens": visual,
                "prompt_tokens": int(embeds.shape[1]), "encode_s": enc["encode_s"],
                "prefill_s": t_first - t_pre, "ttft_s": t_first - t0,
                "decode_tokens_per_s": len(tokens) / (t_end - t_first) if tokens else None,
                "peak_memory_mb": peak_rss_mb(), "engine": gen.engine.name}

    def describe(self) -> dict:
        import platform

        return {"backend": "wallclock", "engine": self.engine, "cpu": platform.machine()}

    def cool_down(self, seconds: float) -> dict:
        time.sleep(seconds)
        return {"slept_s": seconds}

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None


@hookimpl
def bluelm_v_register(registry):
    registry.backend.register("wallclock", WallClock, description="this host's CPU, timed through the runtime")


@hookimpl
def bluelm_v_devices(config):
    """Extra benchmark devices: {name, backend, num_cpus?, cases?, overrides?} per device."""
    names = [n.strip() for n in os.environ.get("BLUELM_V_FIXTURE_DEVICES", "").split(",") if n.strip()]
    return [{"name": n, "backend": {"name": "wallclock"}, "num_cpus": 0} for n in names]
