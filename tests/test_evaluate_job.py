"""The evaluate job end to end on a tiny model (Ray actors, real runtime): predictions, summary keys
and report; missing/corrupt images counted by reason; a rerun keeps finished shards; a TSV with
base64 images under circular evaluation; checkpoints written as the train job writes them,
loaded with the same weights, and one of another shape failing with one line naming the tensor;
generate answering with a checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from evaluation_helpers import ray_cluster, write_checkpoint  # noqa: F401 (a fixture)

from bluelm_v import launch
from bluelm_v.errors import ConfigError

TINY = ["+encoder.image_size=112", "encoder.pipelined=false", "tiler.tile_size=112", "ray.num_cpus=2",
        "evaluate.shard_size=10", "evaluate.max_new_tokens=4", "evaluate.bootstrap=200"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from bluelm_v.data.fine_print import generate

    root = tmp_path_factory.mktemp("fp112")
    return root, generate(root, n=8, seed=5, view=112, val_fraction=0.125, test_fraction=0.25)


def questions_with_bad_images(root: Path, tmp: Path) -> Path:
    """The test split + 2 questions whose image is missing and 1 whose image is corrupt."""
    lines = (root / "test.jsonl").read_text().splitlines()
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    extra = [{"question_id": "gone-1", "image": "images/nowhere.png", "text": "What?", "answer": "x"},
             {"question_id": "gone-2", "image": "images/nowhere2.png", "text": "What?", "answer": "x"},
             {"question_id": "broken", "image": "images/corrupt.png", "text": "What?", "answer": "x"}]
    path = tmp / "questions.jsonl"
    path.write_text("\n".join(lines + [json.dumps(e) for e in extra]) + "\n")
    return path


@pytest.mark.slow
def test_evaluate_jsonl_end_to_end_counts_bad_images_and_resumes(compose, ray_cluster, bench, tmp_path):
    root, _ = bench
    qfile = questions_with_bad_images(root, tmp_path)
    cfg = compose(["+experiment=evaluate", f"dataset.path={qfile}", f"dataset.image_root={root}", *TINY])
    run_dir = tmp_path / "run"
    summary = launch.run(cfg, run_dir)
    n = 6 * 2 + 3
    assert summary["status"] == "ok" and summary["n_questions"] == n and summary["n_scored"] == n - 3
    assert summary["skipped"] == {"missing_image": 2, "bad_image": 1}
    assert summary["shards"] == 2 and summary["workers"] == 2 and summary["shards_reused"] == 0
    lo, hi = summary["score_ci95"]
    assert lo <= summary["score"] <= hi
    assert set(summary["by_category"]) == {"reading", "coarse"}
    assert set(summary["by_l2_category"]) == {"read_number", "compare_numbers", "word_by_colour", "colour_of_word",
                                              "background", "large_shape"}
    preds = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [json.loads(x)["question_id"] for x in qfile.read_text().splitlines()]
    scored = [p for p in preds if p["score"] is not None]
    assert all({"prompt", "answer", "prediction", "score"} <= set(p) for p in scored)
    assert all(p["prompt"].startswith("<image>\n") and p["visual_tokens"] > 0 for p in scored)
    assert sum(p["score"] for p in scored) / len(scored) == pytest.approx(summary["score"])
    assert {p["id"]: p.get("skipped") for p in preds if p["score"] is None} == \
        {"gone-1": "missing_image", "gone-2": "missing_image", "broken": "bad_image"}
    report = (run_dir / "report.md").read_text()
    assert "| category reading |" in report and "missing_image" in report and "![scores](scores.png)" in report
    assert (run_dir / "scores.png").stat().st_size > 0 and len(list((run_dir / "examples").glob("*.png"))) == 6

    again = launch.run(cfg, run_dir)                                   # the same run directory: nothing redone
    assert again["shards_reused"] == 2 and again["score"] == summary["score"]
    cfg.evaluate.max_new_tokens = 5
    with pytest.raises(ConfigError, match="holds shards of another evaluation .*settings"):
        launch.run(cfg, run_dir)


@pytest.mark.slow
def test_tsv_base64_circular(compose, ray_cluster, tmp_path):
    import base64
    import io

    import pandas as pd
    from PIL import Image

    def pic(colour):
        buf = io.BytesIO()
        Image.new("RGB", (150, 120), colour).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    rows = [{"index": i, "image": pic(c) if i < 2 else "0", "question": "Which colour?", "A": "red", "B": "green",
             "C": "blue", "answer": a, "category": "colour"} for i, (c, a) in enumerate([("red", "A"), ("green", "B"),
                                                                                           ("red", "A")])]
    pd.DataFrame(rows).to_csv(tmp_path / "mc.tsv", sep="\t", index=False)
    cfg = compose(["+experiment=evaluate", f"dataset.path={tmp_path / 'mc.tsv'}", "evaluate.circular=true", *TINY])
    summary = launch.run(cfg, tmp_path / "run")
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert summary["n_questions"] == 3 and len(preds) == 9 and summary["n_scored"] == 3
    assert [p["answer"] for p in preds[:3]] == ["A. red", "C. red", "B. red"]     # "red" rotated through the letters
    assert "choice_not_extracted" in summary and set(summary["by_category"]) == {"colour"}


def test_tsv_without_required_column_fails_before_work(compose, tmp_path):
    from bluelm_v.errors import InputError
    from bluelm_v.plugin_manager import get

    (tmp_path / "q.tsv").write_text("index\tquestion\timage_path\n0\tWhat?\ta.png\n")
    cfg = compose(["+experiment=evaluate", f"dataset.path={tmp_path / 'q.tsv'}"])
    with pytest.raises(InputError, match="missing required column 'answer'"):
        launch.validate(cfg, get()[1])


# -- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_roundtrip_and_shape_mismatch(compose, tmp_path):
    import torch
    import yaml

    from bluelm_v.checkpoint import load_checkpoint
    from bluelm_v.plugin_manager import get

    ckpt, made = write_checkpoint(compose, tmp_path / "train")
    assert made["info"]["trained_parts"] == ["encoder", "downsampler", "projector", "llm"]
    model, info = load_checkpoint(ckpt, get()[1])
    assert info["config"]["tiler"]["name"] == "relaxed" and model.tiler.tile_size == 112
    for k, v in model.state_dict().items():
        assert torch.equal(v, made["state"][k]), k
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    nodes = yaml.safe_load((bad / "config.yaml").read_text())
    nodes["downsampler"] = {"name": "identity"}                         # the projector now takes 64, not 256
    (bad / "config.yaml").write_text(yaml.safe_dump(nodes))
    with pytest.raises(ConfigError) as err:
        load_checkpoint(bad, get()[1])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"checkpoint {bad}: model.safetensors has projector.")
    assert "[256]" in message and "needs [64]" in message


@pytest.mark.slow
def test_evaluate_and_generate_with_a_checkpoint(compose, ray_cluster, bench, tmp_path):
    import yaml

    root, paths = bench
    ckpt, _ = write_checkpoint(compose, tmp_path / "train")
    cfg = compose(["+experiment=evaluate", f"dataset.path={paths['test']['jsonl']}", f"checkpoint={ckpt}", *TINY,
                   "evaluate.max_questions=6"])
    summary = launch.run(cfg, tmp_path / "eval")
    assert summary["model"]["checkpoint"] == str(ckpt) and summary["n_scored"] == 6
    first = json.loads((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    image = first["images"][0]
    gen = compose(["+experiment=generate", f"checkpoint={ckpt}", f"image={image}", "max_new_tokens=4", "stream=false"])
    gen.prompt = first["prompt"]                                # the evaluation's prompt, newline included
    out = launch.run(gen, tmp_path / "gen")
    assert out["status"] == "ok" and out["text"].strip() == first["prediction"]   # the same trained weights
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    nodes = yaml.safe_load((bad / "config.yaml").read_text())
    nodes["downsampler"] = {"name": "identity"}                         # the projector now takes 64, not 256
    (bad / "config.yaml").write_text(yaml.safe_dump(nodes))
    cfg = compose(["+experiment=evaluate", f"dataset.path={paths['test']['jsonl']}", f"checkpoint={bad}", *TINY])
    with pytest.raises(ConfigError, match="model.safetensors has projector.* needs \\[64\\]"):
        launch.run(cfg, tmp_path / "eval_bad")


def test_stage1_checkpoint_keeps_the_seeded_encoder_and_llm(compose, tmp_path):
    """After stage 1 alone the checkpoint holds the connector; the rest is the seeded initial model."""
    import torch
    from safetensors.torch import save_file

    from bluelm_v.checkpoint import export_train_checkpoint, load_checkpoint
    from bluelm_v.model import BlueLMV
    from bluelm_v.plugin_manager import get

    cfg = compose(["+experiment=train_tiny", "train.stage=1"])
    torch.manual_seed(int(cfg.train.seed))
    init = BlueLMV.from_config(cfg, get()[1])
    connector = {f"{p}.{k}": v + 1.0 for p in ("projector", "downsampler") for k, v in getattr(init, p).state_dict().items()}
    (tmp_path / "s1").mkdir()
    save_file({k: v.contiguous() for k, v in connector.items()}, str(tmp_path / "s1" / "projector.safetensors"))
    info = export_train_checkpoint(cfg, {"stages_run": [1], "stage1": {"projector": str(tmp_path / "s1" / "projector.safetensors")}},
                                   tmp_path / "checkpoint")
    assert info["trained_parts"] == ["downsampler", "projector"] and info["weights"] == "projector.safetensors"
    model, loaded = load_checkpoint(tmp_path / "checkpoint", get()[1])
    assert loaded["config"]["tiler"]["name"] == "single"                 # stage 1's fixed crop
    state, start = model.state_dict(), init.state_dict()
    for k, v in state.items():
        expected = connector[k] if k in connector else start[k]
        assert torch.equal(v, expected), k
