"""Evaluation scoring on fixtures with hand-computed values: option-letter extraction (VLMEvalKit's
rule), unique option text, circular evaluation, VQA normalisation and soft accuracy, ANLS at its
0.5 threshold, bootstrap intervals; and the question-file readers (TSV / JSONL)."""
from __future__ import annotations

import base64
import io
import json

import pytest

from bluelm_v.jobs.evaluate import scoring

OPTIONS = {"A": "red circle", "B": "blue square", "C": "green triangle", "D": "none of these"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"),
    ("B.", "B"),
    ("(C) green triangle", "C"),
    ("The answer is [D].", "D"),
    ("Answer: A", "A"),
    ("a", None),                       # lower case is not a letter
    ("A or B", None),                  # two letters: not letter-extractable, no option text either
    ("it is the blue square", "B"),    # no letter, one option's text
    ("Blue Square", "B"),              # option text, case-insensitive
    ("red circle or blue square", None),   # two option texts
    ("I cannot tell", None),
])
def test_option_letter_extraction(prediction, letter):
    assert scoring.extract_choice(prediction, OPTIONS) == letter


def test_choice_scores_follow_extraction():
    q = {"id": "1", "metric": "choice", "options": OPTIONS, "answers": ["C"]}
    assert scoring.score_prediction(q, "C")["score"] == 1.0
    assert scoring.score_prediction(q, "green triangle")["score"] == 1.0
    assert scoring.score_prediction(q, "B") == {"score": 0.0, "extracted": "B"}
    assert scoring.score_prediction(q, "A or C") == {"score": 0.0, "extracted": None}


def test_circular_rotations_and_all_or_nothing():
    q = {"id": "7", "metric": "choice", "options": {"A": "x", "B": "y", "C": "z"}, "answers": ["B"]}
    rots = scoring.rotations(q)
    assert [r["options"] for r in rots] == [{"A": "x", "B": "y", "C": "z"}, {"A": "y", "B": "z", "C": "x"},
                                           {"A": "z", "B": "x", "C": "y"}]
    assert [r["answers"] for r in rots] == [["B"], ["A"], ["C"]]      # "y" wherever it moved
    assert [r["id"] for r in rots] == ["7", "7@1", "7@2"] and {r["circular_group"] for r in rots} == {"7"}
    right = [dict(r, score=1.0) for r in rots]
    assert scoring.circular_scores(right)[0]["score"] == 1.0
    one_wrong = right[:2] + [dict(rots[2], score=0.0)]
    collapsed = scoring.circular_scores(one_wrong)
    assert len(collapsed) == 1 and collapsed[0]["score"] == 0.0 and collapsed[0]["rotations"] == 3


@pytest.mark.parametrize("raw, normal", [
    ("Two.", "2"),
    ("The Dog", "dog"),
    ("  a red-car ", "red car"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("dont know", "don't know"),
    ("yes!", "yes"),
])
def test_vqa_normalisation(raw, normal):
    assert scoring.normalize_answer(raw) == normal


def test_vqa_soft_accuracy_leave_one_out():
    # 10 references, 2 say "2": each of the 8 others sees 2 matches (2/3), each of the 2 sees 1 (1/3)
    refs = ["2", "2"] + ["3"] * 8
    assert scoring.vqa_accuracy("two", refs) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # 4 matches: every leave-one-out subset keeps >= 3 -> 1.0
    assert scoring.vqa_accuracy("3", ["3"] * 4 + ["4"] * 6) == pytest.approx(1.0)
    # 3 matches: the 7 others see 3 (1.0), the 3 matching see 2 (2/3)
    assert scoring.vqa_accuracy("3", ["3"] * 3 + ["4"] * 7) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)
    assert scoring.vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert scoring.vqa_accuracy("The cat.", ["cat"]) == 1.0           # one reference: exact match


def test_anls_values_and_threshold():
    assert scoring.anls("4712", ["4713"]) == pytest.approx(0.75)                 # 1 edit / 4
    assert scoring.anls("  Hello   World ", ["hello world"]) == 1.0
    assert scoring.anls("abcd", ["wxyz", "abce"]) == pytest.approx(0.75)         # best reference
    assert scoring.anls("ab", ["cd"]) == 0.0
    assert scoring.anls("abcdef", ["abcxyz"]) == pytest.approx(0.5)              # exactly 0.5 is kept
    assert scoring.anls("abcdefg", ["abxxxxx"]) == 0.0                           # 2/7 < 0.5 -> 0
    assert scoring.levenshtein("kitten", "sitting") == 3


def test_exact_match_after_normalisation():
    assert scoring.exact_match("Green.", ["green"]) == 1.0
    assert scoring.exact_match("greenish", ["green"]) == 0.0


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    values = [1.0] * 60 + [0.0] * 40
    lo, hi = scoring.bootstrap_interval(values, resamples=2000, seed=3)
    assert lo < 0.6 < hi and 0.08 < hi - lo < 0.25                    # ~ +-1.96 * sqrt(.24/100)
    assert scoring.bootstrap_interval(values, resamples=2000, seed=3) == (lo, hi)
    assert scoring.bootstrap_interval([1.0] * 5) == (1.0, 1.0)
    assert scoring.bootstrap_interval([]) is None


# -- question files ------------------------------------------------------------------------------
def _png_b64(colour=(200, 10, 10)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tsv_reader_options_image_references_and_prompt(tmp_path):
    import pandas as pd

    from bluelm_v.data.vqa import build_prompt, read_questions

    pic = _png_b64()
    rows = [{"index": "0", "image": pic, "question": "Colour?", "hint": "a square", "A": "red", "B": "blue",
             "C": "", "answer": "A", "category": "colour"},
            {"index": "1", "image": "0", "question": "Shape?", "hint": "", "A": "square", "B": "circle",
             "C": "line", "answer": "circle", "category": "shape"}]
    pd.DataFrame(rows).to_csv(tmp_path / "q.tsv", sep="\t", index=False)
    qs = read_questions(tmp_path / "q.tsv")
    assert [q["options"] for q in qs] == [{"A": "red", "B": "blue"}, {"A": "square", "B": "circle", "C": "line"}]
    assert [q["answers"] for q in qs] == [["A"], ["B"]]          # an answer given as option text -> its letter
    assert qs[1]["images"] == [{"base64": pic}]                  # a short cell refers to row "0"'s image
    assert build_prompt(qs[0]) == ("<image>\nHint: a square\nQuestion: Colour?\nOptions:\nA. red\nB. blue\n"
                                   "Please select the correct answer from the options above.")


def test_tsv_without_a_required_column_fails_naming_it(tmp_path):
    from bluelm_v.data.vqa import read_questions
    from bluelm_v.errors import InputError

    (tmp_path / "q.tsv").write_text("index\timage\tanswer\n0\tabc\tA\n")
    with pytest.raises(InputError, match="missing required column 'question'"):
        read_questions(tmp_path / "q.tsv")
    (tmp_path / "r.tsv").write_text("index\tquestion\tanswer\n0\tWhat?\tA\n")
    with pytest.raises(InputError, match="'image' \\(base64\\) or 'image_path'"):
        read_questions(tmp_path / "r.tsv")


def test_jsonl_reader_metrics_and_errors(tmp_path):
    from bluelm_v.data.vqa import read_questions
    from bluelm_v.errors import InputError

    lines = [{"question_id": 1, "image": "a.png", "text": "What is written?", "answer": "47", "metric": "anls"},
             {"question_id": 2, "image": "a.png", "text": "<image>\nHow many?", "answers": ["2", "2", "3"]},
             {"question_id": 3, "text": "Capital of France?", "answer": "Paris"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    qs = read_questions(tmp_path / "q.jsonl", tmp_path / "imgs")
    assert [q["metric"] for q in qs] == ["anls", "vqa", "exact"]
    assert qs[0]["images"] == [{"path": str(tmp_path / "imgs" / "a.png")}] and qs[2]["images"] == []
    assert qs[1]["question"] == "How many?"                       # the placeholder is placed by the prompt
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question_id": 1, "image": "a.png", "answer": "x"}) + "\n")
    with pytest.raises(InputError, match="line 1: missing required field 'text'"):
        read_questions(tmp_path / "bad.jsonl")


def test_summary_of_known_predictions_matches_hand_computation():
    """Six questions with known predictions through score_prediction + the job's summary."""
    from omegaconf import OmegaConf

    from bluelm_v.jobs.evaluate import summarise

    qs = [  # (question, prediction, hand-computed score)
        ({"id": "a", "metric": "choice", "options": OPTIONS, "answers": ["B"], "category": "mc"}, "(B)", 1.0),
        ({"id": "b", "metric": "choice", "options": OPTIONS, "answers": ["A"], "category": "mc"}, "A or C", 0.0),
        ({"id": "c", "metric": "anls", "answers": ["4713"], "category": "ocr"}, "4712", 0.75),
        ({"id": "d", "metric": "anls", "answers": ["hello"], "category": "ocr"}, "help", 0.6),
        ({"id": "e", "metric": "vqa", "answers": ["2", "2"] + ["3"] * 8, "category": "vqa"}, "two", (8 * 2 / 3 + 2 / 3) / 10),
        ({"id": "f", "metric": "exact", "answers": ["Red"], "category": "vqa"}, "red.", 1.0),
    ]
    records = []
    for q, pred, expected in qs:
        out = scoring.score_prediction(q, pred)
        assert out["score"] == pytest.approx(expected), q["id"]
        records.append({**q, **out, "visual_tokens": 10})
    records.append({"id": "g", "metric": "exact", "category": "vqa", "score": None, "skipped": "missing_image"})
    s = summarise(records, OmegaConf.create({"bootstrap": 500, "seed": 1}))
    total = 1.0 + 0.0 + 0.75 + 0.6 + (8 * 2 / 3 + 2 / 3) / 10 + 1.0
    assert s["n_questions"] == 7 and s["n_scored"] == 6 and s["skipped"] == {"missing_image": 1}
    assert s["score"] == pytest.approx(total / 6)
    assert s["by_category"]["ocr"]["score"] == pytest.approx(0.675) and s["by_category"]["mc"]["score"] == 0.5
    assert s["by_category"]["vqa"]["n"] == 2 and s["choice_not_extracted"] == 1
    lo, hi = s["score_ci95"]
    assert lo < total / 6 < hi
