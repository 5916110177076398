"""The launcher as a user runs it: every user error is one line with exit code 2 (Hydra's too),
unknown keys and options a job does not use are refused, summary.json is written whatever stops
a job, jobs may end partial or failed, any registered component is selectable as FAMILY=NAME,
and images above images.max_pixels are refused before decoding."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import pytest

LAUNCH = [sys.executable, "-m", "bluelm_v.launch"]
CLI_RUN = [sys.executable, "-m", "bluelm_v.cli", "run"]


def launch(*args, cmd=LAUNCH, timeout=300, **kw):
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, **kw)


def one_error_line(out) -> str:
    """The single `bluelm-v: error:` line of a failed run (no traceback, no Hydra block)."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Set the environment variable" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("bluelm-v: error:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture
def main(capsys):
    """main(*args) -> (exit code, stdout, stderr) of `python -m bluelm_v.launch ARGS` run in this
    process (for runs that stop with an error: no job work happens)."""
    from types import SimpleNamespace

    from bluelm_v import launch

    def _main(*args):
        with pytest.raises(SystemExit) as stop:
            launch.main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=stop.value.code, stdout=out.out, stderr=out.err)

    return _main


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "sizes.csv"
    path.write_text("width,height\n394,390\n380,76\n380,393\n500,102\n")
    return path


def summary_of(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# -- item 2: Hydra's own errors, one line, exit 2, with the valid choices ----------------------------
@pytest.mark.parametrize("cmd", [LAUNCH, CLI_RUN], ids=["launch", "bluelm-v run"])
def test_unknown_experiment_lists_the_experiments(cmd, tmp_path):
    line = one_error_line(launch("+experiment=ablate_tilling", f"hydra.run.dir={tmp_path}", cmd=cmd))
    assert "+experiment=ablate_tilling: no experiment 'ablate_tilling'" in line
    assert "Did you mean ablate_tiling" in line and "benchmark" in line and "train_tiny" in line


@pytest.mark.parametrize("args, expected", [
    (["tiler=qwen_smart"], ["tiler=qwen_smart: no tiler named 'qwen_smart'", "relaxed", "internvl"]),
    (["ray=nope"], ["ray=nope: no option 'nope' in the config group ray", "cluster, local"]),
    (["dataset.manifest=[1,2"], ["dataset.manifest=[1,2: bad override syntax"]),
    (["experiment=ablate_tiling"], ["add it with +experiment=ablate_tiling"]),
    (["deepspeed=zero3"], ["deepspeed=zero3: the ablate_tiling job selects no `deepspeed`"]),
    (["datset.manifest=x.csv"], ["datset.manifest: unknown key", "did you mean dataset.manifest?"]),
], ids=["group-option", "ray-option", "syntax", "missing-plus", "unused-group", "unknown-key"])
def test_hydra_errors_are_one_line(args, expected, main, tmp_path):
    experiment = [] if args[0].startswith("experiment=") else ["+experiment=ablate_tiling"]
    out = main(*experiment, f"hydra.run.dir={tmp_path / 'run'}", *args)
    line = one_error_line(out)
    for text in expected:
        assert text in line
    assert "no run directory" in out.stderr and not (tmp_path / "run").exists()


def test_hydra_full_error_keeps_the_traceback_for_debugging(tmp_path, monkeypatch):
    from hydra.errors import MissingConfigException

    from bluelm_v import launch

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(MissingConfigException, match="experiment/nope"):
        launch.main(["+experiment=nope", f"hydra.run.dir={tmp_path}"])


# -- item 1: unknown keys (with + or not) and options the job does not use ---------------------------
@pytest.mark.parametrize("key, hint", [
    ("+datset.manifest=x.csv", "did you mean dataset.manifest?"),
    ("+ablation.tillers=[relaxed,internvl]", "did you mean ablation.tilers?"),
    ("+manifest=x.csv", "did you mean dataset.manifest?"),
])
def test_added_unknown_key_fails_before_work(key, hint, manifest, main, tmp_path):
    run_dir = tmp_path / "run"
    out = main("+experiment=ablate_tiling", f"hydra.run.dir={run_dir}", f"dataset.manifest={manifest}",
                 "ray.num_cpus=1", key)
    line = one_error_line(out)
    assert ": unknown key" in line and hint in line
    summary = summary_of(run_dir)
    assert summary["status"] == "failed" and hint in summary["reason"] and summary["exit_code"] == 2
    assert not (run_dir / "decisions.parquet").exists()


@pytest.mark.parametrize("option, node", [("encoder=so400m", "encoder"), ("quantizer=w4", "quantizer"),
                                          ("llm.dtype=bfloat16", "llm")])
def test_option_the_job_does_not_read_names_option_and_job(option, node, manifest, main, tmp_path):
    out = main("+experiment=ablate_tiling", f"hydra.run.dir={tmp_path}", f"dataset.manifest={manifest}",
                 "ray.num_cpus=1", option)
    line = one_error_line(out)
    assert f"{option}: the ablate_tiling job does not use the top-level `{node}` node" in line


def test_every_job_declares_what_it_reads():
    from importlib import import_module

    from bluelm_v.compose import SHARED_NODES
    from bluelm_v.job import list_jobs

    for job in {j["job"] for j in list_jobs()}:
        mod = import_module(f"bluelm_v.jobs.{job}")
        assert hasattr(mod, "USES"), f"jobs/{job} does not say which top-level nodes it reads (USES)"
        assert set(mod.USES) <= set(SHARED_NODES), (job, mod.USES)


def test_ray_options_are_refused_for_jobs_without_ray():
    from bluelm_v import compose
    from bluelm_v.jobs import generate

    line = compose.not_applicable_error(["ray.num_cpus=2"], "generate", generate, uses_ray=False)
    assert line == "ray.num_cpus=2: the generate job does not use Ray, so this option would change nothing"
    assert compose.not_applicable_error(["max_new_tokens=3", "engine=hf"], "generate", generate, False) is None


def test_open_nodes_and_nested_component_nodes_take_new_keys():
    from bluelm_v.compose import unknown_key_error

    schema = {"job": {"cases": {"base": {"image": [1, 1]}}, "devices": []}, "ablation": {"overrides": None},
              "train": {"stage1": {"tiler": {"name": "single", "tile_size": 384}}}, "tiler": {"name": "relaxed"}}
    fine = {"job": {"cases": {"base": {"image": [1, 1], "seed": 3}}, "devices": [{"name": "x", "any": 1}]},
            "ablation": {"overrides": {"relaxed": {"alpha": 0.2}}},
            "train": {"stage1": {"tiler": {"name": "single", "mode": "pad"}}}, "tiler": {"name": "relaxed", "x": 1}}
    assert unknown_key_error(fine, schema, open_paths=["job.cases"], components=["single", "relaxed"]) is None
    line = unknown_key_error({"job": {"cases": {"bse": {}}}}, schema, components=["single"])
    assert line.startswith("job.cases.bse: unknown key; did you mean job.cases.base?")


# -- item 1: partial and failed outcomes ------------------------------------------------------------
OUTCOME_JOB = """
import sys, types
from omegaconf import OmegaConf
from bluelm_v import launch
from bluelm_v.job import outcome
job = types.ModuleType("bluelm_v.jobs.outcome_probe")
job.USES = ()
job.run = lambda ctx: {**outcome(int(sys.argv[1]), int(sys.argv[2]), "cases", "device lost"), "figure": 1.5}
sys.modules[job.__name__] = job
cfg = OmegaConf.create({"job": {"name": "outcome_probe", "uses_ray": False}})
summary = launch.run(cfg, sys.argv[3])
sys.exit(launch._report("outcome_probe", summary, launch.Path(sys.argv[3])))
"""


@pytest.mark.parametrize("ok, failed, status, code", [(3, 0, "ok", 0), (2, 1, "partial", 0), (0, 3, "failed", 1)])
def test_job_outcome_sets_status_exit_code_and_reason(ok, failed, status, code, tmp_path):
    out = subprocess.run([sys.executable, "-c", OUTCOME_JOB, str(ok), str(failed), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == code, out.stderr
    summary = summary_of(tmp_path)
    assert summary["status"] == status and summary["counts"] == {"ok": ok, "failed": failed}
    assert summary["figure"] == 1.5 and f"status={status}" in out.stdout
    if status != "ok":
        reason = ("all 3 cases failed" if status == "failed" else "1 of 3 cases failed") + " (first error: device lost)"
        assert summary["reason"] == reason and reason in out.stderr


# -- item 2: summary.json whatever stops the job -----------------------------------------------------
def test_user_error_after_composition_writes_summary(manifest, main, tmp_path):
    out = main("+experiment=ablate_tiling", f"hydra.run.dir={tmp_path}", f"dataset.manifest={manifest}",
                 "ablation.reference=square")
    line = one_error_line(out)
    summary = summary_of(tmp_path)
    assert summary["status"] == "failed" and summary["reason"] == line.split("bluelm-v: error: ")[1]
    assert summary["stage"] == "checking the config" and summary["job"] == "ablate_tiling"


def test_launch_writes_summary_in_run_dir(manifest, tmp_path):
    run_dir = tmp_path / "run"
    out = launch("+experiment=ablate_tiling", f"hydra.run.dir={run_dir}", f"dataset.manifest={manifest}",
                 "ray.num_cpus=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"summary: {run_dir / 'summary.json'}" in out.stdout and "status=ok" in out.stdout
    summary = summary_of(run_dir)
    assert summary["status"] == "ok" and summary["job"] == "ablate_tiling" and summary["n_images"] == 4
    assert (run_dir / "config.yaml").exists()


def test_unknown_component_is_one_line_error(main, tmp_path):
    out = main("+experiment=ablate_tiling", f"hydra.run.dir={tmp_path}", "tiler.name=relaxd")
    line = one_error_line(out)
    assert "tiler: no tiler named 'relaxd'" in line and "Did you mean 'relaxed'" in line
    assert summary_of(tmp_path)["status"] == "failed"


def test_unknown_job_lists_jobs(main, tmp_path):
    line = one_error_line(main(f"hydra.run.dir={tmp_path}", "job.name=nope"))
    assert "job.name: no job 'nope'" in line and "ablate_tiling" in line


# -- item 3: any registered component as FAMILY=NAME -------------------------------------------------
def test_component_without_yaml_is_a_config_option_with_its_signature_defaults(compose):
    from bluelm_v.plugin_manager import get

    params = get()[1].encoder.describe("siglip")["parameters"]
    cfg = compose(["+experiment=generate", "encoder=siglip"])
    assert dict(cfg.encoder) == {"name": "siglip", **params}       # nothing left from conf/encoder/tiny.yaml
    cfg = compose(["llm=hf_causal"])
    assert cfg.llm.name == "hf_causal" and "gguf_file" in cfg.llm and cfg.llm.preset == "tiny"


def test_required_parameter_of_a_config_store_node_must_be_set():
    from bluelm_v import compose
    from bluelm_v.registry import Registries

    def needs_width(width: int, depth: int = 2, layers=(1, 2), fn=print):
        return (width, depth)

    reg = Registries()
    reg.tiler.register("needs_width", needs_width)
    assert compose.component_node(reg, "tiler", "needs_width") == {"name": "needs_width", "width": "???",
                                                                    "depth": 2, "layers": [1, 2]}


def test_experiment_settings_for_the_replaced_component_are_dropped_with_a_note(compose, tmp_path, capsys):
    from bluelm_v import compose as composition
    from bluelm_v.launch import _drop
    from bluelm_v.plugin_manager import get

    overrides = ["+experiment=generate", "tiler=single", "tiler.tile_size=112"]
    cfg = compose(overrides)
    assert dict(cfg.tiler) == {"name": "single", "tile_size": 112, "mode": "squash",
                               "max_grid": 3, "thumbnail": "first"}     # the experiment's, for relaxed
    leftovers = composition.experiment_leftovers(cfg, overrides, get()[1])
    assert _drop(cfg, leftovers) == ["tiler.max_grid", "tiler.thumbnail"]
    assert dict(cfg.tiler) == {"name": "single", "tile_size": 112, "mode": "squash"}
    note = "tiler.max_grid, tiler.thumbnail (set by the experiment for its own tiler) not applied"
    assert note in capsys.readouterr().err
    # a value the user gives is never dropped: the registry reports it
    cfg = compose([*overrides, "tiler.max_grid=2"])
    assert composition.experiment_leftovers(cfg, [*overrides, "tiler.max_grid=2"], get()[1]) == ["tiler.thumbnail"]


# -- item 2: decompression bombs --------------------------------------------------------------------
def bomb_png(path, side=20000):
    """A real 1-bit PNG of side x side pixels (~50 KB on disk, 400 M pixels decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    raw = zlib.compress(row * side, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_in_one_line(main, tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    out = main("+experiment=generate", f"hydra.run.dir={tmp_path / 'run'}", f"image={bomb}", "llm=tiny")
    line = one_error_line(out)
    assert f"image: '{bomb}' is 20000x20000 = 400,000,000 pixels, above the limit of 89,478,485" in line
    assert "images.max_pixels" in line and summary_of(tmp_path / "run")["status"] == "failed"


def test_pixel_limit_is_a_setting(tmp_path, monkeypatch):
    from PIL import Image

    from bluelm_v.errors import InputError
    from bluelm_v.runtime import load_image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (640, 480), (1, 2, 3)).save(photo)
    monkeypatch.setenv("BLUELM_V_MAX_IMAGE_PIXELS", "300000")
    with pytest.raises(InputError, match=r"is 640x480 = 307,200 pixels, above the limit of 300,000"):
        load_image(photo, "image")
    monkeypatch.setenv("BLUELM_V_MAX_IMAGE_PIXELS", "none")          # images.max_pixels=null
    assert load_image(bomb_png(tmp_path / "big.png", side=9000)).size == (9000, 9000)


def test_launcher_exports_the_pixel_limit(compose, monkeypatch):
    import os

    from bluelm_v.cluster import FORWARDED_ENV
    from bluelm_v.errors import ConfigError
    from bluelm_v.launch import _image_limit

    monkeypatch.delenv("BLUELM_V_MAX_IMAGE_PIXELS", raising=False)
    _image_limit(compose(["images.max_pixels=1000"]))
    assert os.environ["BLUELM_V_MAX_IMAGE_PIXELS"] == "1000" and "BLUELM_V_MAX_IMAGE_PIXELS" in FORWARDED_ENV
    _image_limit(compose(["images.max_pixels=null"]))
    assert os.environ["BLUELM_V_MAX_IMAGE_PIXELS"] == "none"
    with pytest.raises(ConfigError, match="images.max_pixels: a positive integer"):
        _image_limit(compose(["images.max_pixels=-3"]))


def test_training_data_counts_too_large_images(tmp_path, monkeypatch):
    from PIL import Image

    from bluelm_v.data.llava import LlavaDataset
    from bluelm_v.plugin_manager import get
    from bluelm_v.tokenizer import ByteTokenizer

    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    bomb_png(tmp_path / "bomb.png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
    (tmp_path / "data.json").write_text(json.dumps([{"id": i, "image": f, "conversations": turns}
                                                    for i, f in enumerate(["ok.png", "bomb.png"])]))
    tiler = get()[1].tiler.create("single", tile_size=112)
    ds = LlavaDataset(tmp_path / "data.json", tmp_path, tiler, ByteTokenizer(), tokens_per_crop=16, max_length=512)
    assert len(ds) == 1 and ds.skipped["too_large"] == 1
