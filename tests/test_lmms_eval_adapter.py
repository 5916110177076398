"""lmms-eval runs a bluelm-v checkpoint: the `bluelm_v` model is found through lmms-eval's
`lmms_eval.models` entry points, and a real `lmms-eval --model bluelm_v --model_args
checkpoint=DIR --tasks ...` run on a local task (YAML + utils.py + a JSONL of local images, no
hub access) scores it and answers exactly what the evaluate job's answering code answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from evaluation_helpers import write_checkpoint

lmms_eval = pytest.importorskip("lmms_eval", reason='lmms-eval is not installed (make install, or pip install "bluelm-v[eval]")')


def test_lmms_eval_finds_the_model_by_entry_point():
    from lmms_eval.models import get_model

    from bluelm_v.plugins.lmms_eval_model import BlueLMV

    assert get_model("bluelm_v") is BlueLMV


def local_task(folder: Path, questions: Path, image_root: Path) -> Path:
    folder.mkdir()
    (folder / "bluelm_local.yaml").write_text(textwrap.dedent(f"""\
        task: bluelm_local
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {questions}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 6
          until: ["\\n"]
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    (folder / "utils.py").write_text(textwrap.dedent(f"""\
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open({str(image_root)!r} + "/" + doc["image"]).convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["text"]

        def process_results(doc, results):
            return {{"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}}
        """))
    return folder


@pytest.mark.slow
def test_lmms_eval_cli_runs_a_local_task_offline(compose, tmp_path):
    from bluelm_v.checkpoint import load_checkpoint
    from bluelm_v.data.fine_print import generate
    from bluelm_v.data.vqa import read_questions
    from bluelm_v.jobs.evaluate.answer import answer_questions
    from bluelm_v.plugin_manager import get
    from bluelm_v.runtime import Generator

    ckpt, _ = write_checkpoint(compose, tmp_path / "train")
    paths = generate(tmp_path / "bench", n=4, seed=2, view=112, val_fraction=0.25, test_fraction=0.25)
    task = local_task(tmp_path / "task", Path(paths["test"]["jsonl"]), tmp_path / "bench")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               WANDB_MODE="disabled")
    lmms = Path(sys.executable).with_name("lmms-eval")
    done = subprocess.run([str(lmms), "--model", "bluelm_v", "--model_args", f"checkpoint={ckpt},device=cpu",
                           "--tasks", "bluelm_local", "--include_path", str(task), "--output_path", str(tmp_path / "out"),
                           "--log_samples", "--batch_size", "3"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0 and "Error during evaluation" not in done.stdout + done.stderr, log
    (results,) = (tmp_path / "out").rglob("*_results.json")
    scores = json.loads(results.read_text())["results"]["bluelm_local"]
    (samples,) = (tmp_path / "out").rglob("*_samples_bluelm_local.jsonl")
    answered = sorted((json.loads(x) for x in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(answered) == 6                                     # every question of the local test split

    questions = read_questions(paths["test"]["jsonl"])
    model, _ = load_checkpoint(ckpt, get()[1])
    gen = Generator(model, engine="auto", registry=get()[1])
    ours = [r["prediction"].split("\n")[0].strip() for r in answer_questions(gen, questions, batch_size=3, max_new_tokens=6)]
    theirs = [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0] for s in answered]
    assert any(ours) and ours == theirs                           # the same answers, through lmms-eval
    expected = sum(a.lower() == q["answers"][0].lower() for a, q in zip(ours, questions)) / 6
    assert scores["exact_match,none"] == pytest.approx(expected)
