"""Backends: the simulated NPU's cost model (paper figures, optima from structure), adb command
construction and parsing on recorded outputs, ONNX Runtime vs torch, local torch runs."""
from __future__ import annotations

import stat
import subprocess
import time
from pathlib import Path

import pytest

from bluelm_v import plugin_manager
from bluelm_v.errors import ConfigError
from bluelm_v.plugins.backends import adb as adb_mod
from bluelm_v.plugins.backends.npu_cost import CostModel, NpuProfile
from bluelm_v.plugins.backends.precision import precision_plan
from bluelm_v.plugins.backends.simulated_npu import SimulatedNpu, load_profile

DATA = Path(__file__).parent / "data" / "adb"
PAPER_CASE = {"image": [768, 1536], "tiles_per_batch": 4, "prefill_chunk": 128, "prompt_tokens": 2048,
              "decode_tokens": 0, "kv_cache_tokens": 2048, "quantizer": {"name": "bluelm_mixed"}}
TINY_CFG = {"tiler": {"name": "relaxed", "max_grid": 4}, "encoder": {"name": "siglip", "preset": "tiny"},
            "downsampler": {"name": "vila_2x2"}, "projector": {"name": "mlp2x_gelu"},
            "llm": {"name": "hf_causal", "preset": "tiny"}, "plugins": {}}
REGISTRY = plugin_manager.get()[1]


@pytest.fixture(scope="module")
def sim():
    s = SimulatedNpu(profile="dimensity9300")
    s.load(TINY_CFG, REGISTRY)
    return s


def with_profile(sim, **changes) -> SimulatedNpu:
    """The same loaded workload under a modified profile."""
    other = SimulatedNpu.__new__(SimulatedNpu)
    other.__dict__.update(sim.__dict__)
    _, other.profile = load_profile({"base": "dimensity9300", **changes})
    other.cost = CostModel(other.profile)
    return other


def fastest(sim, key, values, metric):
    times = {v: sim.run_case({**PAPER_CASE, key: v})[metric] for v in values}
    return min(times, key=times.get), times


# -- simulated_npu --------------------------------------------------------------------------
def test_workload_is_read_from_the_real_full_size_modules(sim):
    enc, llm = sim.shapes["encoder"], sim.shapes["llm"]
    assert (enc.layers, enc.hidden, enc.heads, enc.tokens_per_item) == (26, 1152, 16, 729)   # penultimate of 27
    assert enc.patch.kernel == 14 and enc.patch.out_channels == 1152
    assert (llm.layers, llm.hidden, llm.heads, llm.kv_heads, llm.head_dim) == (40, 2304, 36, 36, 64)
    assert abs(llm.total_params - 2.72e9) / 2.72e9 < 0.01 and abs(enc.total_params - 397.7e6) / 397.7e6 < 0.01
    # a ViT call's FLOPs: every linear of the 26 blocks per token + QK^T and AV per tile
    per_token = 2 * (4 * 1152 * 1152 + 2 * 1152 * 4304)
    ops = sim.cost.vit_call(enc, 3, precision_plan({"name": "bluelm_mixed"})["encoder"])
    expected = 26 * 3 * (729 * per_token + 4 * 729 * 729 * 1152)
    assert abs(sum(o.flops for o in ops) - expected) / expected < 1e-9


def test_regression_guard_fitted_figures_of_dimensity9300(sim):
    """REGRESSION GUARD, not evidence: the profile was fitted to these four figures
    (bench/calibrate_simulated_npu.py); this only catches a change of the model or the profile."""
    from bluelm_v.plugins.backends.precision import precision_plan

    vit = precision_plan({"name": "bluelm_mixed"})["encoder"]
    enc = sim.shapes["encoder"]
    assert sim.cost.call_time(sim.cost.vit_call(enc, 1, vit)) == pytest.approx(0.3, rel=0.01)
    assert sim.cost.call_time(sim.cost.vit_call(enc, 4, vit)) == pytest.approx(0.8, rel=0.01)
    assert sim.cost.conv_time(enc, 1) == pytest.approx(0.040, rel=0.01)
    assert sim.run_case(PAPER_CASE)["decode_tokens_per_s"] == pytest.approx(24.4, rel=0.01)


def test_dimensity9300_predictions_within_stated_tolerances(sim):
    """Figures the profile was NOT fitted to, against the paper, with the tolerance stated here:
    encode of the 2:4 image 5% (it follows closely from the fitted calls), load 15% (UFS 4.0 data
    sheet), peak memory 10% (a 150 MB runtime prior). The prefill is not within any useful
    tolerance (+120%, docs/results.md): asserted below only as a regression guard."""
    r = sim.run_case(PAPER_CASE)
    assert r["grid"] == "2:4" and r["crops"] == 9
    assert r["encode_s"] == pytest.approx(2.06, rel=0.05)
    assert r["load_s"] == pytest.approx(0.47, rel=0.15)
    assert r["peak_memory_mb"] == pytest.approx(2200, rel=0.10)
    # the physical decode limit of docs/design.md §3 (~57 tok/s from weights alone) is above what is reached
    assert r["decode_tokens_per_s"] < r["decode_bandwidth_limit_tokens_per_s"] < 57.5
    # REGRESSION GUARD of the reported prediction errors (docs/results.md, Devices): prefill +120%
    assert r["prefill_s"] / 2.7 - 1 == pytest.approx(1.20, abs=0.05)


def test_regression_guard_predicted_optima_on_the_published_cache(sim):
    """REGRESSION GUARD of a prediction (not the paper's optima, which are 4 tiles and t128): with
    the 10 MB system cache every call but t32 spills its scores, so the biggest calls win."""
    best_tiles, _ = fastest(sim, "tiles_per_batch", (1, 2, 4, 6), "encode_s")
    best_chunk, _ = fastest(sim, "prefill_chunk", (32, 128, 512, 2048), "prefill_s")
    assert (best_tiles, best_chunk) == (6, 2048)


def test_optima_move_with_on_chip_memory_no_special_case(sim):
    """The optimum is where batching gains meet the on-chip capacity: a call whose attention
    scores fit wins over its spilling neighbours; nothing in the model names 4 tiles or 128 tokens."""
    tiles, chunks = (1, 2, 4, 6), (32, 128, 512, 2048)
    big = with_profile(sim, on_chip_mb=400)            # nothing spills: the biggest calls win
    assert fastest(big, "tiles_per_batch", tiles, "encode_s")[0] == 6
    assert fastest(big, "prefill_chunk", chunks, "prefill_s")[0] == 2048
    # a 512-token chunk's scores (36 x 512 x 2048 x 2 B = 75.5 MB) fit in 80 MB, t2048's do not: t512 wins
    assert fastest(with_profile(sim, on_chip_mb=80), "prefill_chunk", chunks, "prefill_s")[0] == 512
    # t128's (18.9 MB) fit in 20 MB, t512's do not: t128 wins
    assert fastest(with_profile(sim, on_chip_mb=20), "prefill_chunk", chunks, "prefill_s")[0] == 128
    # a 4-tile call's scores (4 x 16 x 729^2 x 2 B = 68.0 MB) fit in 70 MB, a 6-tile call's do not: 4 wins
    assert fastest(with_profile(sim, on_chip_mb=70), "tiles_per_batch", tiles, "encode_s")[0] == 4


def test_pipelining_hides_the_measured_fraction_of_the_patch_convs(sim):
    on = sim.run_case(PAPER_CASE)
    off = sim.run_case({**PAPER_CASE, "pipelined": False})
    per_tile_conv = on["encode_conv_s"] / 9
    assert off["encode_s"] - on["encode_s"] == pytest.approx(5 * per_tile_conv, rel=1e-6)   # groups 2, 3 (4 + 1 tiles)
    shared = with_profile(sim, pipeline_overlap=0.0)   # one shared unit: nothing overlaps
    assert shared.run_case(PAPER_CASE)["encode_s"] == pytest.approx(off["encode_s"], rel=1e-9)
    half = with_profile(sim, pipeline_overlap=0.5).run_case(PAPER_CASE)
    assert half["encode_hidden_by_pipeline_s"] == pytest.approx(2.5 * per_tile_conv, rel=1e-6)


def test_minicpm_v25_on_the_dimensity9300_cpu_from_its_shapes():
    """The CPU profile predicts the paper's MiniCPM-V 2.5 llama.cpp row from that model's shapes
    and slicing rule. Stated tolerances: the slicing and the shapes exactly; the three timings are
    far off (+260%, +111%, +108%: docs/results.md), asserted only as a REGRESSION GUARD of the
    reported errors."""
    from bluelm_v.plugins.backends.cpu_cost import (DIMENSITY_9300_CPU, CpuProfile, llama_cpp_row,
                                                    minicpm_slices, minicpm_v25_workload)

    assert minicpm_slices(768, 1536) == (2, 3) and minicpm_slices(448, 448) == (1, 1)
    assert minicpm_slices(1344, 448) == (3, 1)
    work = minicpm_v25_workload(REGISTRY)
    assert (work.vision.tokens_per_item, work.vision.layers) == (1024, 26)
    assert abs(work.llm.total_params - 8.03e9) / 8.03e9 < 0.01 and work.llm.kv_heads == 8
    bw = load_profile("dimensity9300")[1].bandwidth_efficiency        # the same DRAM as the NPU's
    row = llama_cpp_row(CpuProfile.from_dict({**DIMENSITY_9300_CPU, "bandwidth_efficiency": bw}), work,
                        image=(768, 1536), prompt_tokens=2048)
    assert row["slices"] == 7 and row["visual_tokens"] == 672
    assert row["image_processing_s"] / 4.0 - 1 == pytest.approx(2.60, abs=0.05)
    assert row["prefill_s"] / 13.9 - 1 == pytest.approx(1.11, abs=0.05)
    assert row["decode_tokens_per_s"] / 4.9 - 1 == pytest.approx(1.08, abs=0.05)


def test_bandwidth_and_quantizer_change_decode_as_a_roofline_should(sim):
    fast = with_profile(sim, memory_bandwidth_gbps=153.6)
    base = sim.run_case(PAPER_CASE)["decode_tokens_per_s"]
    # decode ops are each the slower of memory and compute: twice the bandwidth helps, never past 2x
    assert 1.2 * base < fast.run_case(PAPER_CASE)["decode_tokens_per_s"] < 2.0 * base
    fp16 = sim.run_case({**PAPER_CASE, "quantizer": {"name": "none"}})
    assert fp16["decode_tokens_per_s"] < 0.4 * base                         # 4x the weight bytes


def test_profiles_in_config(tmp_path):
    label, p = load_profile({"base": "dimensity9300", "on_chip_mb": 10})
    assert p.on_chip_mb == 10 and p.memory_bandwidth_gbps == 76.8 and label == "dimensity9300+custom"
    assert load_profile({"memory_bandwidth_gbps": 51.2})[1].memory_bandwidth_gbps == 51.2
    with pytest.raises(ConfigError, match="unknown NPU profile parameter"):
        load_profile({"base": "dimensity9300", "membw": 1})
    with pytest.raises(ConfigError, match="no NPU profile 'snapdragon'"):
        load_profile("snapdragon")


def test_precision_plans_follow_the_quantizers():
    mixed = precision_plan({"name": "bluelm_mixed"})
    assert (mixed["encoder"].weight_bits, mixed["encoder"].path) == (8, "fp16")
    assert (mixed["llm"].weight_bits, mixed["llm"].act_bits, mixed["llm"].path, mixed["kv_bits"]) == (4, 16, "int4", 8)
    w8 = precision_plan({"name": "w8"})
    assert w8["encoder"].weight_bits == 8 and w8["llm"].weight_bits == 16
    assert precision_plan({"name": "w8", "targets": ["all"]})["llm"].weight_bits == 8
    assert precision_plan([{"name": "w4"}, {"name": "kv8"}])["kv_bits"] == 8
    with pytest.raises(ConfigError, match="does not know quantizer 'fancy'"):
        precision_plan({"name": "fancy"})


def test_config_model_costs_the_configured_model():
    tiny = SimulatedNpu(profile="dimensity9300", model="config")
    tiny.load(TINY_CFG, REGISTRY)
    assert tiny.shapes["llm"].hidden == 64 and tiny.shapes["encoder"].layers == 1
    assert tiny.run_case(PAPER_CASE)["encode_s"] < 0.1


# -- adb: parsing and command construction on recorded outputs ------------------------------
def read(name):
    return (DATA / name).read_text()


def test_parse_devices():
    one = adb_mod.parse_devices(read("devices_one.txt"))
    assert [(e.serial, e.state, e.properties["model"]) for e in one] == [("R5CT1234ABC", "device", "V2309A")]
    many = adb_mod.parse_devices(read("devices_many.txt"))
    assert [e.state for e in many] == ["device", "device", "unauthorized", "offline"]
    assert adb_mod.parse_devices(read("devices_none.txt")) == []


def test_parse_memory_and_thermal():
    mem = adb_mod.parse_meminfo_process(read("meminfo_process.txt"))
    assert mem == {"pid": 12877, "process": "bluelm_runner", "pss_mb": 2206728 / 1024, "rss_mb": 2217564 / 1024}
    dev = adb_mod.parse_meminfo_device(read("meminfo_device.txt"))
    assert dev["total_ram_mb"] == 15728640 / 1024 and dev["used_ram_mb"] == 8201332 / 1024
    th = adb_mod.parse_thermal(read("thermalservice.txt"))
    assert th["status"] == 1 and th["max_c"] == 47.5                  # the HAL block, not the cached one
    assert th["by_type"]["npu"] == 47.5 and th["by_type"]["cpu"] == 46.2 and th["by_type"]["skin"] == 38.7


def test_parse_runner_outputs():
    kv = adb_mod.parse_runner_kv(read("runner_kv.txt"))                # captured from bluelm_v/runner.py
    assert kv["export_version"] == 1 and kv["crops"] == 9 and kv["prompt_tokens"] == 1900
    assert kv["encode_s"] + kv["prefill_s"] == pytest.approx(kv["ttft_s"], rel=1e-6)
    assert kv["tokens"] == [10, 10, 10, 10] and kv["text"] == "\n\n\n\n"
    ll = adb_mod.parse_llama_cpp(read("llama_cpp.txt"))
    assert ll["prefill_s"] == 13.9 and ll["prompt_tokens"] == 2048 and ll["encode_s"] == 2.87
    assert ll["decode_tokens_per_s"] == pytest.approx(4.9, rel=1e-3) and ll["load_s"] == pytest.approx(1.12044)


class FakeAdb:
    """Answers adb command lines with recorded outputs and records every argv."""

    def __init__(self, devices="devices_one.txt", runner="runner_kv.txt", runner_s=0.0):
        self.calls, self.devices, self.runner, self.runner_s = [], devices, runner, runner_s
        self.thermal = iter([])

    def __call__(self, argv, timeout):
        self.calls.append(argv)
        cmd = " ".join(argv)
        if argv[1:] == ["devices", "-l"]:
            out = read(self.devices)
        elif "dumpsys thermalservice" in cmd:
            out = read(next(self.thermal, "thermalservice.txt"))
        elif "dumpsys meminfo bluelm_runner" in cmd:
            out = read("meminfo_process.txt")
        elif "dumpsys meminfo" in cmd:
            out = read("meminfo_device.txt")
        elif "getprop ro.product.model" in cmd:
            out = "V2309A\n"
        elif "push" in argv or "getprop" in cmd or "mkdir" in cmd or "chmod" in cmd:
            out = ""
        else:                                     # the runner's command line
            time.sleep(self.runner_s)
            out = read(self.runner)
        return subprocess.CompletedProcess(argv, 0, out, "")


def make_backend(tmp_path, fake, **kw):
    runner = tmp_path / "bluelm_runner"
    runner.write_text("#!/bin/sh\n")
    (tmp_path / "model").mkdir(exist_ok=True)
    b = adb_mod.AdbBackend(runner=str(runner), model_dir=str(tmp_path / "model"), memory_poll_s=0.05, **kw)
    b.adb.execute = fake
    return b


def test_adb_load_pushes_model_and_runner_then_runs_a_case(tmp_path):
    fake = FakeAdb()
    b = make_backend(tmp_path, fake)
    info = b.load()
    assert info["serial"] == "R5CT1234ABC" and info["model"] == "V2309A"
    pushes = [c for c in fake.calls if "push" in c]
    assert pushes[0] == ["adb", "-s", "R5CT1234ABC", "push", str(tmp_path / "model"), "/data/local/tmp/bluelm_v/model"]
    assert pushes[1][-1] == "/data/local/tmp/bluelm_v/bluelm_runner"
    assert ["adb", "-s", "R5CT1234ABC", "shell", "chmod 755 /data/local/tmp/bluelm_v/bluelm_runner"] in fake.calls
    case = {"image": [768, 1536], "tiles_per_batch": 4, "prefill_chunk": 128, "prompt_tokens": 2048,
            "decode_tokens": 64, "quantizer": {"name": "w4", "group_size": 64}}
    assert b.command_for(case) == ("cd /data/local/tmp/bluelm_v && ./bluelm_runner --model-dir /data/local/tmp/bluelm_v/model "
                                   "--image 768x1536 --tiles-per-batch 4 --prefill-chunk 128 --prompt-tokens 2048 "
                                   "--decode-tokens 64 --quantizer 'w4(group_size=64)' --pipelined 1")
    m = b.run_case(case)
    assert ["adb", "-s", "R5CT1234ABC", "shell", b.command_for(case)] in fake.calls
    kv = adb_mod.parse_runner_kv(read("runner_kv.txt"))
    assert m["encode_s"] == kv["encode_s"] and m["thermal_after_c"] == 47.5
    assert m["peak_memory_mb"] == kv["peak_rss_mb"]                   # what the runner measured
    assert m["thermal_status"] == 1


def test_adb_llama_cpp_format_and_sampled_memory(tmp_path):
    fake = FakeAdb(runner="llama_cpp.txt", runner_s=0.3)
    b = make_backend(tmp_path, fake, output_format="llama_cpp",
                     command="{remote_dir}/llama-mtmd-cli -m {model_dir}/m.gguf -c {prompt_tokens} -n {decode_tokens}")
    b.load()
    case = {"image": [768, 1536], "tiles_per_batch": 4, "prefill_chunk": 128, "prompt_tokens": 2048, "decode_tokens": 64}
    m = b.run_case(case)
    assert ["adb", "-s", "R5CT1234ABC", "shell", "/data/local/tmp/bluelm_v/llama-mtmd-cli -m "
            "/data/local/tmp/bluelm_v/model/m.gguf -c 2048 -n 64"] in fake.calls
    assert m["decode_tokens_per_s"] == pytest.approx(4.9, rel=1e-3) and m["prefill_s"] == 13.9
    # sampled with dumpsys meminfo while the runner ran (llama.cpp prints no memory figure)
    assert m["sampled_peak_pss_mb"] == pytest.approx(2206728 / 1024) == m["peak_memory_mb"]
    with pytest.raises(ConfigError, match="unknown placeholder 'chunk'"):
        make_backend(tmp_path, fake, command="run {chunk}").command_for(case)


def test_adb_cool_down_waits_for_the_thermal_limit(tmp_path, monkeypatch):
    fake = FakeAdb()
    fake.thermal = iter(["thermalservice.txt", "thermalservice.txt", "thermalservice_cool.txt"])
    b = make_backend(tmp_path, fake, thermal_limit_c=40.0)
    monkeypatch.setattr(adb_mod.time, "sleep", lambda s: None)
    out = b.cool_down(0.0)
    assert out["thermal_c"] == 34.0 and sum("thermalservice" in " ".join(c) for c in fake.calls) == 3


@pytest.mark.parametrize("devices, serial, message", [
    ("devices_none.txt", None, "no usable Android device attached"),
    ("devices_unauthorized.txt", None, r"0123456789ABCDEF \(unauthorized\)"),
    ("devices_unauthorized.txt", "0123456789ABCDEF", "accept the USB debugging prompt"),
    ("devices_many.txt", None, "several devices attached"),
    ("devices_one.txt", "NOPE", "device 'NOPE' is not attached"),
])
def test_adb_device_errors_are_clear(tmp_path, devices, serial, message):
    b = make_backend(tmp_path, FakeAdb(devices=devices), serial=serial)
    with pytest.raises(adb_mod.AdbError, match=message):
        b.load()


def test_adb_missing_binary_and_runner(tmp_path):
    b = adb_mod.AdbBackend(adb_path=str(tmp_path / "no-adb"), runner="x")
    with pytest.raises(adb_mod.AdbError, match="adb not found"):
        b.load()
    fake = FakeAdb()
    b = adb_mod.AdbBackend()
    b.adb.execute = fake
    with pytest.raises(ConfigError, match="backend.runner"):      # the device runner needs the model config
        b.load()


def test_devices_hook_runs_adb_devices(tmp_path):
    from bluelm_v.plugins.backends import bluelm_v_devices

    fake_adb = tmp_path / "adb"
    fake_adb.write_text(f"#!/bin/sh\ncat {DATA / 'devices_many.txt'}\n")
    fake_adb.chmod(fake_adb.stat().st_mode | stat.S_IEXEC)
    config = {"job": {"discover_adb": True, "adb_defaults": {"adb_path": str(fake_adb), "runner": "r"}}}
    found = bluelm_v_devices(config)
    assert [d["name"] for d in found] == ["adb-R5CT1234ABC", "adb-10AC9F0E3B001Z"]
    assert found[0]["backend"] == {"name": "adb", "adb_path": str(fake_adb), "runner": "r", "serial": "R5CT1234ABC"}
    assert bluelm_v_devices({"job": {"discover_adb": False}}) == []
    assert bluelm_v_devices({"job": {"discover_adb": True, "adb_defaults": {"adb_path": str(tmp_path / "none")}}}) == []


# -- real backends on the tiny presets ------------------------------------------------------
SMALL_CASE = {"image": [768, 1536], "tiles_per_batch": 4, "prefill_chunk": 64, "prompt_tokens": 1900,
              "decode_tokens": 4, "quantizer": None}


def test_onnxruntime_matches_torch_and_the_runner_file_matches_it(tmp_path):
    import json
    import sys

    from bluelm_v import runner
    from bluelm_v.plugins.backends.onnx_runtime import OnnxRuntimeBackend

    b = OnnxRuntimeBackend(export_dir=str(tmp_path))
    b.load(TINY_CFG, REGISTRY)
    m = b.run_case(SMALL_CASE)                               # 9 crops: groups 4 + 4 + (1 padded to 4)
    assert m["grid"] == "2:4" and m["visual_tokens"] == 9 * 196 and m["prompt_tokens"] <= 1900
    assert m["check_ok"] and m["check_features_max_abs_diff"] < 1e-4 and m["check_max_abs_diff"] < 1e-4
    assert m["check_tokens_match"] == 1.0 and m["ort_weights"] == {"vision": "fp32", "llm": "fp32"}
    import onnx
    graph = onnx.load(str(tmp_path / "vision_b4.onnx")).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [4, 3, 384, 384]   # static
    # the runner, as a plain file in a fresh process, on the same export and inputs: the same answer
    from bluelm_v import chat
    from bluelm_v.plugins.backends.inputs import prompt_for, synthetic_image

    synthetic_image(768, 1536).save(tmp_path / "image.png")
    prompt, _ = prompt_for(lambda t: len(chat.prompt_ids(b.model.tokenizer, t)), 9 * 196, 1900)
    (tmp_path / "ids.json").write_text(json.dumps(chat.prompt_ids(b.model.tokenizer, prompt)))
    argv = [sys.executable, runner.__file__, "--export", str(tmp_path), "--image", str(tmp_path / "image.png"),
            "--grid", "2:4", "--prompt-ids", str(tmp_path / "ids.json"), "--tiles-per-batch", "4",
            "--prefill-chunk", "64", "--decode-tokens", "4"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    out = adb_mod.parse_runner_kv(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out["tokens"] == m["tokens"] and out["prompt_tokens"] == m["prompt_tokens"] and out["crops"] == 9
    assert out["text"] == b.model.tokenizer.decode(m["tokens"]) and out["peak_rss_mb"] > 0
    q = b.run_case({**SMALL_CASE, "quantizer": {"name": "w8", "targets": ["encoder", "projector", "llm"]}})
    assert q["ort_weights"] == {"vision": "int8", "llm": "int8"} and (tmp_path / "vision_b4.int8.onnx").exists()
    assert q["check_max_abs_diff"] > 10 * m["check_max_abs_diff"] and q["check_ok"]   # int8 error, within 10%
    b.close()
    # a runner and an export of different versions refuse, in one line
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": runner.EXPORT_VERSION + 1}))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stdout.strip().count("\n") == 0
    assert f"export version {runner.EXPORT_VERSION + 1} but this runner reads version {runner.EXPORT_VERSION}" in done.stdout
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "embeddings.npy").write_bytes(b"truncated")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "embeddings.npy is missing or has the wrong size" in done.stdout


@pytest.mark.parametrize("tiler", [{"name": "relaxed", "max_grid": 4}, {"name": "internvl"},
                                   {"name": "llava_next"}])
def test_runner_preprocessing_is_the_tilers_transform(tiler):
    """The runner (numpy + Pillow only) cuts the same crops as the tiler, thumbnail included."""
    import numpy as np

    from bluelm_v.plugins.backends.export import preprocess_spec
    from bluelm_v.plugins.backends.inputs import synthetic_image
    from bluelm_v.runner import crop_count, preprocess

    t = REGISTRY.create_from_config("tiler", tiler, "tiler")
    spec = preprocess_spec(t)
    for size in ((768, 1536), (1000, 333), (384, 384)):
        image = synthetic_image(*size, seed=3)
        want = t.transform(image)
        got = preprocess(image, tuple(want.grid), spec)
        assert got.shape == tuple(want.pixels.shape) and crop_count(tuple(want.grid), spec) == want.n_crops
        assert float(np.abs(got - want.pixels.numpy()).max()) < 1e-5


def test_local_torch_runs_the_runtime_and_checks_outputs():
    from bluelm_v.plugins.backends.local_torch import LocalTorch

    b = LocalTorch(threads=1)
    info = b.load(TINY_CFG, REGISTRY)
    assert info["engine"] in ("fast", "hf")
    m = b.run_case(SMALL_CASE)
    assert m["grid"] == "2:4" and m["crops"] == 9 and m["visual_tokens"] == 1764
    assert 0 < m["encode_s"] < m["ttft_s"] and m["prefill_s"] > 0 and m["decode_tokens"] == 4
    assert m["check_ok"] and m["check_first_token_match"] and m["peak_memory_mb"] > 0
    w8 = b.run_case({**SMALL_CASE, "quantizer": {"name": "w8"}})     # rebuilds + quantises
    assert w8["check_ok"] and '"w8"' in b._variant
    assert type(b.model.projector[1]).__name__ != "Linear"           # the projector's linear was replaced
    # the check compares real outputs: a perturbed prefill fails it
    real_prefill = b.gen.prefill
    b.gen.prefill = lambda emb, n, chunk=None: real_prefill(emb, n, chunk) + 0.5
    assert not b.run_case({**SMALL_CASE, "quantizer": {"name": "w8"}})["check_ok"]
    b.close()


def test_workload_shapes_are_cached_on_disk_by_config(sim, tmp_path):
    from bluelm_v.plugin_manager import get
    from bluelm_v.plugins.backends.simulated_npu import PAPER_MODEL
    from bluelm_v.plugins.backends.workload import cached_shapes

    registry, calls = get()[1], []

    def compute():
        calls.append(1)
        return sim.shapes

    first = cached_shapes(PAPER_MODEL, registry, compute, tmp_path)
    again = cached_shapes(PAPER_MODEL, registry, compute, tmp_path)
    assert len(calls) == 1 and again == first == sim.shapes          # read back equal
    other = {**PAPER_MODEL, "llm": {"name": "hf_causal", "preset": "tiny"}}
    cached_shapes(other, registry, compute, tmp_path)
    assert len(calls) == 2 and len(list((tmp_path / "npu_workloads").iterdir())) == 2


# -- the ssh transport against a real SSH server on 127.0.0.1 -----------------------------------
def test_ssh_transport_push_run_pull_timeouts_and_host_keys(tmp_path):
    from ssh_board import SshBoard

    from bluelm_v.plugins.backends.ssh import SshTransport
    from bluelm_v.plugins.backends.transport import TransportError

    board = SshBoard(tmp_path).start()
    node = board.backend_node()
    t = SshTransport("127.0.0.1", board.port, board.user, node["key"], node["known_hosts"], connect_timeout_s=5)
    try:
        assert t.run("echo hi; pwd", 30).stdout == f"hi\n{board.root}\n"
        assert t.run("exit 7", 30).returncode == 7
        (tmp_path / "f.txt").write_text("payload")
        t.push(str(tmp_path / "f.txt"), "a/b/f.txt")                   # parents made
        assert (board.root / "a" / "b" / "f.txt").read_text() == "payload"
        t.pull("a/b/f.txt", str(tmp_path / "g.txt"))
        assert (tmp_path / "g.txt").read_text() == "payload"
        facts = t.facts()
        assert facts["cores"] >= 1 and facts["memory_total_mb"] > 0 and facts["os"].startswith("Linux")
        with pytest.raises(TransportError, match="did not finish in 1 s") as hung:
            t.run("sleep 20", 1)
        assert hung.value.retryable
        assert t.run("echo again", 30).stdout == "again\n"               # reconnected
        board.stop()
        with pytest.raises(TransportError, match="connection lost|cannot connect") as lost:
            t.run("echo x", 10)
        assert lost.value.retryable
        board.start()
        assert t.run("echo back", 30).stdout == "back\n"
        # host keys are checked: a known_hosts entry with another key is refused, not retried
        (tmp_path / "other_known_hosts").write_text(f"[127.0.0.1]:{board.port} " + __import__("asyncssh")
                                                    .generate_private_key("ssh-ed25519").export_public_key().decode())
        other = SshTransport("127.0.0.1", board.port, board.user, node["key"], str(tmp_path / "other_known_hosts"),
                             connect_timeout_s=5)
        with pytest.raises(TransportError, match="host key not trusted") as refused:
            other.run("echo x", 10)
        assert not refused.value.retryable
        other.close()
    finally:
        t.close()
        board.close()


def test_inventory_file_and_discovery(tmp_path):
    from bluelm_v.plugins.backends import bluelm_v_devices
    from bluelm_v.plugins.backends.inventory import read_inventory

    (tmp_path / "devices.yaml").write_text(
        "devices:\n"
        "  - {name: jetson, transport: ssh, address: 192.0.2.7, user: ubuntu, key: keys/jetson, python: python3.10}\n"
        "  - {name: x100, transport: adb, serial: R5CT1234ABC, num_cpus: 0}\n"
        "  - {name: model, transport: simulated, profile: dimensity9300}\n")
    found = read_inventory(tmp_path / "devices.yaml")
    assert found[0] == {"name": "jetson", "backend": {"name": "ssh", "host": "192.0.2.7", "user": "ubuntu",
                                                      "key": str(tmp_path / "keys/jetson"), "python": "python3.10"}}
    assert found[1] == {"name": "x100", "num_cpus": 0, "backend": {"name": "adb", "serial": "R5CT1234ABC"}}
    assert found[2]["backend"] == {"name": "simulated_npu", "profile": "dimensity9300"}
    fake_adb = tmp_path / "adb"
    fake_adb.write_text(f"#!/bin/sh\ncat {DATA / 'devices_many.txt'}\n")
    fake_adb.chmod(fake_adb.stat().st_mode | stat.S_IEXEC)
    config = {"job": {"inventory": str(tmp_path / "devices.yaml"), "discover_adb": True,
                      "adb_defaults": {"adb_path": str(fake_adb)}}}
    names = [d["name"] for d in bluelm_v_devices(config)]     # the inventory's phone is not listed twice
    assert names == ["jetson", "x100", "model", "adb-10AC9F0E3B001Z"]
    (tmp_path / "bad.yaml").write_text("devices:\n  - {name: b}\n")
    with pytest.raises(ConfigError, match=r"devices\[0\]: a device needs 'name' and 'transport'"):
        read_inventory(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        read_inventory(tmp_path / "none.yaml")


# -- the LLM as GGUF for llama.cpp ---------------------------------------------------------------
def _tiny_llm():
    return REGISTRY.create_from_config("llm", {"name": "hf_causal", "preset": "tiny"}, "llm")


def test_gguf_export_round_trip(tmp_path):
    """Written with the gguf package, read back: llama.cpp's keys, every tensor bit-exact (q/k rows
    back in transformers' RoPE layout), the tied lm_head not stored twice."""
    from bluelm_v.plugins.backends.gguf_export import export_llm_gguf, read_llm_gguf

    llm = _tiny_llm()
    export_llm_gguf(llm.model, llm.tokenizer, tmp_path / "llm.gguf")
    meta, tensors = read_llm_gguf(tmp_path / "llm.gguf")
    cfg = llm.model.config
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.attention.head_count_kv"],
            meta["llama.vocab_size"]) == (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size)
    state = llm.model.state_dict()
    assert set(state) - set(tensors) == {"lm_head.weight"}              # tied to the embeddings
    for name, array in tensors.items():
        assert (array == state[name].numpy()).all(), name


def test_gguf_llm_in_llama_cpp_gives_our_greedy_tokens(tmp_path):
    """The exported file in llama.cpp (llama-cpp-python, the `bench` extra): the same greedy tokens
    as transformers on the same prompt ids, and close last-position logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    import torch

    from bluelm_v import chat
    from bluelm_v.plugins.backends.gguf_export import export_llm_gguf

    llm = _tiny_llm()
    export_llm_gguf(llm.model, llm.tokenizer, tmp_path / "llm.gguf")
    ids = chat.prompt_ids(llm.tokenizer, "Describe the screenshot in one sentence.")
    with torch.no_grad():
        ours = llm.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        ref_logits = llm.model(torch.tensor([ids])).logits[0, -1].numpy()
    model = llama_cpp.Llama(str(tmp_path / "llm.gguf"), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    model.eval(ids)
    logits = np.asarray(model.scores[len(ids) - 1])
    theirs = []
    for _ in range(8):
        theirs.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([theirs[-1]])
    assert theirs == ours
    assert np.abs(logits - ref_logits).max() < 1e-3 * max(1.0, np.abs(ref_logits).max())
