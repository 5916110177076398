"""The registries and the plugin manager: register/create/names/describe, errors that help,
family contracts checked at registration / creation, name clashes, unknown hooks."""
from __future__ import annotations

import pytest

from bluelm_v import hookimpl
from bluelm_v.errors import (ConfigError, ContractError, DuplicateComponentError, PluginLoadError,
                             UnknownComponentError)
from bluelm_v.plugin_manager import load_plugins
from bluelm_v.registry import Registries


class Widget:
    """a widget with a bounded knob"""

    def __init__(self, size: int = 384, alpha: float = 0.1, mode: str = "first", tag: str | None = None):
        self.size, self.alpha, self.mode, self.tag = size, alpha, mode, tag
        self.tile_size = size

    # the tiler contract (bluelm_v.types.Tiler), just enough to register
    def select(self, width, height):
        return 1, 1

    def select_many(self, widths, heights):
        return [1] * len(widths), [1] * len(heights)

    def num_crops(self, m, n):
        return m * n

    def transform(self, image):
        raise NotImplementedError


def make_registry():
    reg = Registries()
    reg.tiler.register("relaxed_test", Widget, ranges={"alpha": (0.0, 1.0)}, choices={"mode": ("first", "last")})
    reg.tiler.register("llava_test", Widget, description="other")
    return reg


def test_eight_families_by_attribute():
    reg = Registries()
    assert reg.families() == ["tiler", "encoder", "downsampler", "projector", "llm", "engine", "quantizer", "backend"]
    assert reg.tiler is reg["tiler"]
    with pytest.raises(AttributeError, match="families"):
        reg.tokenizer  # noqa: B018


def test_register_create_names_describe():
    reg = make_registry()
    w = reg.tiler.create("relaxed_test", alpha=0.25)
    assert isinstance(w, Widget) and w.alpha == 0.25 and w.size == 384
    assert reg.tiler.names() == ["llava_test", "relaxed_test"]
    assert reg.tiler.names("rel*") == ["relaxed_test"]
    d = reg.tiler.describe("relaxed_test")
    assert d["parameters"] == {"size": 384, "alpha": 0.1, "mode": "first", "tag": None}
    assert d["description"] == "a widget with a bounded knob"  # docstring when none is given
    assert reg.tiler.describe("llava_test")["description"] == "other"


def test_unknown_name_names_family_closest_and_provider():
    reg = make_registry()
    with pytest.raises(UnknownComponentError) as err:
        reg.tiler.create("relaxd_test")
    msg = str(err.value)
    assert "tiler" in msg and "'relaxd_test'" in msg and "'relaxed_test'" in msg and "unknown" in msg


@pytest.mark.parametrize("params, needle", [
    ({"alpah": 0.2}, "tiler.alpah: unknown parameter"),
    ({"alpha": "high"}, "tiler.alpha: expected float, got str"),
    ({"alpha": 1.5}, "tiler.alpha: 1.5 is out of range [0.0, 1.0]"),
    ({"mode": "middle"}, "tiler.mode: 'middle' is not one of ['first', 'last']"),
    ({"size": 3.5}, "tiler.size: expected int"),
])
def test_bad_parameters_fail_with_key_path(params, needle):
    reg = make_registry()
    with pytest.raises(ConfigError) as err:
        reg.tiler.create("relaxed_test", **params)
    assert needle in str(err.value)


def test_create_from_config_node_and_path():
    reg = make_registry()
    w = reg.create_from_config("tiler", {"name": "relaxed_test", "alpha": 0.5}, path="ablation.tilers[0]")
    assert w.alpha == 0.5
    with pytest.raises(ConfigError, match=r"ablation.tilers\[0\].alpha: 2 is out of range"):
        reg.create_from_config("tiler", {"name": "relaxed_test", "alpha": 2}, path="ablation.tilers[0]")
    with pytest.raises(ConfigError, match="expected a mapping with a 'name' key"):
        reg.create_from_config("tiler", {"alpha": 2})


class PluginA:
    __name__ = "plugin_a"

    @hookimpl
    def bluelm_v_register(self, registry):
        registry.tiler.register("same", Widget)


class PluginB:
    __name__ = "plugin_b"

    @hookimpl
    def bluelm_v_register(self, registry):
        registry.tiler.register("same", Widget)


def test_clashing_name_loads_lists_both_and_fails_where_used():
    _, reg, report = load_plugins(autoload=False, extra=[PluginA(), PluginB()])
    rows = [r for r in reg.rows() if r["name"] == "same"]
    assert sorted(r["plugin"] for r in rows) == ["plugin_a", "plugin_b"]       # both listed ...
    assert all(len(r["clash"]) == 1 for r in rows)                            # ... each naming the other
    assert len(report.clashes) == 1 and "plugin_a" in report.clashes[0] and "plugin_b" in report.clashes[0]
    for use in (lambda: reg.tiler.create("same"), lambda: reg.validate_node("tiler", {"name": "same"}, "tiler")):
        with pytest.raises(DuplicateComponentError) as err:
            use()
        msg = str(err.value)
        assert msg.startswith("tiler: tiler 'same' is registered 2 times") and "plugin_a" in msg and "plugin_b" in msg
    assert reg.tiler.create("relaxed").tile_size == 384                        # other names still work


def test_clashing_name_is_fatal_at_load_under_strict():
    with pytest.raises(DuplicateComponentError, match="'same' is registered 2 times: by .*plugin_[ab].* and by .*plugin_[ab]"):
        load_plugins(autoload=False, strict=True, extra=[PluginA(), PluginB()])


class NoCrops:
    """a tiler without num_crops or transform"""

    tile_size = 384

    def select(self, width, height):
        return 1, 1

    def select_many(self, widths, heights):
        return [1] * len(widths), [1] * len(heights)


class PluginBadShape:
    __name__ = "plugin_bad_shape"

    @hookimpl
    def bluelm_v_register(self, registry):
        registry.tiler.register("nocrops", NoCrops)


def test_class_without_contract_methods_fails_at_registration_naming_plugin_and_methods():
    with pytest.raises(ContractError) as err:
        load_plugins(autoload=False, extra=[PluginBadShape()])
    msg = str(err.value)
    assert "tiler 'nocrops' (NoCrops, plugin 'plugin_bad_shape'" in msg and "bluelm_v.types.Tiler" in msg
    assert "missing num_crops()" in msg and "missing transform()" in msg and "select" not in msg.split(":")[-1]
    assert "plugins.block=[plugin_bad_shape]" in msg
    assert "\n" not in msg


def test_function_factory_is_checked_on_the_object_it_creates():
    reg = Registries()
    reg.tiler.register("made_by_function", lambda tile_size=384: NoCrops())
    reg.tiler.validate("made_by_function", {})            # the signature is all validation can see
    with pytest.raises(ContractError, match="tiler 'made_by_function' .*missing num_crops\\(\\), missing transform"):
        reg.tiler.create("made_by_function")


def test_optional_members_may_be_left_out_but_call_shapes_are_checked():
    reg = Registries()
    reg.tiler.register("widget", Widget)                  # no degenerate_many / tokens: optional

    class Encoder:
        hidden_size, num_tokens, image_size = 8, 4, 28

        def forward(self, pixels):                        # the model passes tiles_per_batch=, pipelined=
            return pixels

    reg.encoder.register("narrow", lambda: Encoder())
    with pytest.raises(ContractError, match="forward\\(\\) does not accept keyword tiles_per_batch="):
        reg.encoder.create("narrow")

    class Backend:
        def load(self, cfg):                              # the worker calls load(cfg, registry)
            return {}

        def run_case(self, case):
            return {}

    with pytest.raises(ContractError, match="load\\(\\) takes fewer than the 2 positional arguments"):
        reg.backend.register("old_backend", Backend)


class PluginMisspelledHook:
    __name__ = "plugin_typo"

    @hookimpl
    def bluelm_v_regster(self, registry):                 # sic
        registry.tiler.register("never", Widget)


class PluginOptionalHook:
    __name__ = "plugin_future"

    @hookimpl(optionalhook=True)
    def bluelm_v_from_the_future(self):
        pass


def test_unknown_hook_fails_naming_plugin_and_hook_unless_optional():
    with pytest.raises(PluginLoadError) as err:
        load_plugins(autoload=False, extra=[PluginMisspelledHook()])
    msg = str(err.value)
    assert "plugin 'plugin_typo'" in msg and "unknown hook 'bluelm_v_regster'" in msg
    assert "did you mean 'bluelm_v_register'?" in msg
    _, reg, _ = load_plugins(autoload=False, extra=[PluginOptionalHook()])
    assert "relaxed" in reg.tiler


def test_block_skips_a_plugin():
    _, reg, report = load_plugins(autoload=False, extra=[PluginA(), PluginB()], block=["plugin_b"])
    assert "same" in reg.tiler and reg.tiler.describe("same")["plugin"] == "plugin_a"


def test_builtins_registered_with_provenance():
    _, reg, report = load_plugins(autoload=False)
    for family in reg.families():
        assert len(reg[family]) >= 1, f"no built-in {family}"
    d = reg.tiler.describe(reg.tiler.names()[0])
    assert d["provider"] == "bluelm-v" and d["module"].startswith("bluelm_v.plugins.")
    assert not report.failed, report.failed


def test_strict_mode_makes_import_failure_fatal(monkeypatch):
    from bluelm_v import plugin_manager

    class BadEP:
        name, value, dist = "badplug", "nonexistent_module_xyz", None

        def load(self):
            import nonexistent_module_xyz  # noqa: F401

    real = plugin_manager._entry_points
    monkeypatch.setattr(plugin_manager, "_entry_points", lambda: real() + [BadEP()])
    _, reg, report = load_plugins(autoload=True)  # reported, the rest still load
    assert report.failed and report.failed[0][0] == "badplug" and "nonexistent_module_xyz" in report.failed[0][2]
    assert len(reg.tiler) >= 1
    with pytest.raises(PluginLoadError, match="badplug"):
        load_plugins(autoload=True, strict=True)


def test_engine_factories_survive_their_modules_being_imported():
    import bluelm_v.plugins.engines.fast  # noqa: F401 -- makes `fast` a package attribute
    import bluelm_v.plugins.engines.hf  # noqa: F401

    _, reg, _ = load_plugins(autoload=False)
    for name in reg.engine.names():
        assert callable(reg.engine.entry(name).factory) and reg.engine.describe(name)["parameters"]["model"]
