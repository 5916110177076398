"""Every experiment composes and validates; every config-group option composes, validates and
(where it is cheap) is instantiated; the conf works from an installed copy too."""
from __future__ import annotations

from importlib import resources

import pytest

from bluelm_v import FAMILIES
from bluelm_v.launch import WIRING, validate
from bluelm_v.plugin_manager import get

CONF = resources.files("bluelm_v.conf")
EXPERIMENTS = sorted(p.name[:-5] for p in (CONF / "experiment").iterdir() if p.name.endswith(".yaml"))
GROUP_OPTIONS = sorted((f, p.name[:-5]) for f in FAMILIES for p in (CONF / f).iterdir() if p.name.endswith(".yaml"))
# Options whose construction is heavy (full-size weights) or needs hardware: validated, not built.
NOT_BUILT = {("encoder", "so400m"), ("llm", "bluelm_3b_proxy"), ("llm", "smollm2_135m"), ("backend", "adb")}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(compose, experiment):
    cfg = compose([f"+experiment={experiment}"])
    assert cfg.job.name and cfg.description
    _, registry, _ = get()
    validate(cfg, registry)


@pytest.mark.parametrize("family, option", GROUP_OPTIONS)
def test_group_option_composes_and_instantiates(compose, family, option):
    cfg = compose([f"{family}={option}"])
    _, registry, _ = get()
    registry.validate_node(family, cfg[family], family, WIRING.get(family, ()))
    if (family, option) in NOT_BUILT:
        return
    wiring = {"downsampler": {"in_dim": 64}, "projector": {"in_dim": 256, "out_dim": 64}}.get(family, {})
    component = registry.create_from_config(family, cfg[family], family, **wiring)
    assert component is not None


def test_every_family_has_a_config_group():
    for family in FAMILIES:
        assert any(o[0] == family for o in GROUP_OPTIONS), f"conf/{family}/ has no option"


def test_unknown_component_in_config_fails_before_work(compose):
    from bluelm_v.errors import ConfigError

    cfg = compose(["+experiment=ablate_tiling", "tiler.name=relaxd"])
    _, registry, _ = get()
    with pytest.raises(ConfigError, match="tiler: no tiler named 'relaxd'"):
        validate(cfg, registry)
