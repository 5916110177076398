"""The registries and the plugin manager: register/create/names/describe, errors that help."""
from __future__ import annotations

import pytest

from bluelm_v import hookimpl
from bluelm_v.errors import ConfigError, DuplicateComponentError, PluginLoadError, UnknownComponentError
from bluelm_v.plugin_manager import load_plugins
from bluelm_v.registry import Registries


class Widget:
    """a widget with a bounded knob"""

    def __init__(self, size: int = 384, alpha: float = 0.1, mode: str = "first", tag: str | None = None):
        self.size, self.alpha, self.mode, self.tag = size, alpha, mode, tag


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


def test_duplicate_names_fail_naming_both_providers():
    with pytest.raises(DuplicateComponentError) as err:
        load_plugins(autoload=False, extra=[PluginA(), PluginB()])
    msg = str(err.value)
    assert "plugin_a" in msg and "plugin_b" in msg and "'same'" in msg


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
