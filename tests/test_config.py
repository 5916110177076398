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


def user_inputs(experiment, tmp_path):
    """Experiments that need the user's own data files: (overrides naming them, key that
    must be reported when they are missing)."""
    if experiment == "train":
        data = tmp_path / "llava.json"
        data.write_text("[]")
        return [f"train.data.stage{n}.{k}={data if k == 'json' else tmp_path}"
                for n in (1, 2) for k in ("json", "image_root")], "train.data.stage1.json"
    if experiment == "evaluate":
        questions = tmp_path / "questions.jsonl"
        questions.write_text('{"question_id": 1, "image": "a.png", "text": "What?", "answer": "x"}\n')
        return [f"dataset.path={questions}"], "dataset.path"
    return [], None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(compose, experiment, tmp_path):
    from bluelm_v.errors import ConfigError

    overrides, required_key = user_inputs(experiment, tmp_path)
    _, registry, _ = get()
    if required_key:  # without the user's data it fails before work, naming the key
        with pytest.raises(ConfigError, match=required_key):
            validate(compose([f"+experiment={experiment}"]), registry)
    cfg = compose([f"+experiment={experiment}", *overrides])
    assert cfg.job.name and cfg.description
    validate(cfg, registry)


@pytest.mark.parametrize("family, option", GROUP_OPTIONS)
def test_group_option_composes_and_instantiates(compose, family, option):
    from bluelm_v.errors import ConfigError
    from bluelm_v.plugins.engines import triton_unavailable

    cfg = compose([f"{family}={option}"])
    _, registry, _ = get()
    if (family, option) == ("engine", "triton") and triton_unavailable():
        with pytest.raises(ConfigError, match="engine: engine 'triton' cannot run on this machine"):
            registry.validate_node(family, cfg[family], family, WIRING.get(family, ()))
        return
    registry.validate_node(family, cfg[family], family, WIRING.get(family, ()))
    if (family, option) in NOT_BUILT:
        return
    wiring = {"downsampler": {"in_dim": 64}, "projector": {"in_dim": 256, "out_dim": 64},
              "engine": {"model": registry.llm.create("hf_causal", preset="tiny").model}}.get(family, {})
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
