"""Question files for evaluation, in the two formats users already have, and their prompts.

    questions = read_questions("mmbench.tsv")               # VLMEvalKit TSV
    questions = read_questions("textvqa.jsonl", "images/")  # LLaVA / lmms-eval style JSONL
    prompt = build_prompt(questions[0])                      # "<image>\\nQuestion: ...\\nOptions: ..."

VLMEvalKit TSV (tab-separated, one question a row; the format of its MMBench/SEED/... files):
``index``, ``question``, ``answer`` and ``image`` (base64) or ``image_path`` (relative to
``image_root``, default the file's folder) are required; optional ``hint``, ``category``,
``l2-category`` and the options as one-letter columns ``A``, ``B``, ... (empty cells: no such
option in that row). An ``image`` cell of at most 64 characters names the ``index`` of the row
holding the picture (VLMEvalKit stores repeated images once); a cell starting with ``[`` is a
list (several images; for ``answer``: several reference answers). A missing column fails
naming it.

JSONL (one JSON object a line; LLaVA's eval files and lmms-eval's local tasks): ``question_id``,
``text`` and ``answer`` (one reference) or ``answers`` (several, VQA style) are required;
``image`` (a path or a list of paths; absent: a text-only question), ``category``,
``l2-category``, ``options`` ({"A": "..."} or a list) and ``metric`` are optional.

Each question becomes a plain dict (it travels to Ray actors as is):

    id, line, question, hint, options {letter: text}, answers [str], metric, category,
    l2_category, images [{"path": ...} | {"base64": ...}]

``metric``: ``choice`` when there are options (the answer is a letter), else the record's own
``metric`` (exact | vqa | anls), else ``vqa`` for several references and ``exact`` for one.
Prompts follow VLMEvalKit's multiple-choice layout (hint, question, lettered options, the
instruction to pick one) and LLaVA's short-answer layout (the question as written, image first).
"""
from __future__ import annotations

import ast
import json
import string
from pathlib import Path

from ..chat import IMAGE_PLACEHOLDER
from ..errors import InputError

METRICS = ("choice", "exact", "vqa", "anls")
TSV_REQUIRED = ("index", "question", "answer")
JSONL_REQUIRED = ("question_id", "text")
CHOICE_INSTRUCTION = "Please select the correct answer from the options above."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


def read_questions(path: str | Path, image_root: str | Path | None = None) -> list[dict]:
    """The questions of a .tsv or .jsonl file (format from the extension)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: question file not found")
    root = Path(image_root) if image_root else path.parent
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _read_tsv(path, root)
    if suffix == ".jsonl":
        return _read_jsonl(path, root)
    raise InputError(f"{path}: unknown question format {suffix!r}; use a VLMEvalKit .tsv or a .jsonl file")


# -- prompts ---------------------------------------------------------------------------------
def build_prompt(question: dict) -> str:
    """The user turn: one <image> per image first, then the text (VLMEvalKit's multiple-choice
    layout when there are options)."""
    images = IMAGE_PLACEHOLDER + "\n"
    head = images * len(question.get("images") or [])
    options = question.get("options") or {}
    if not options:
        return head + question["question"]
    text = f"Hint: {question['hint']}\n" if question.get("hint") else ""
    text += f"Question: {question['question']}\nOptions:\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in options.items())
    return head + text + CHOICE_INSTRUCTION


def reference_text(question: dict) -> str:
    """The answer as a person would write it (a letter with its option for choices)."""
    if question.get("options"):
        letter = question["answers"][0]
        return f"{letter}. {question['options'][letter]}"
    return question["answers"][0]


# -- TSV ---------------------------------------------------------------------------------------
def _read_tsv(path: Path, root: Path) -> list[dict]:
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: not a readable TSV file ({exc})") from None
    columns = list(table.columns)
    for col in TSV_REQUIRED:
        if col not in columns:
            raise InputError(f"{path}: missing required column '{col}' (columns: {', '.join(columns)})")
    if "image" not in columns and "image_path" not in columns:
        raise InputError(f"{path}: missing required column 'image' (base64) or 'image_path' "
                         f"(columns: {', '.join(columns)})")
    letters = [c for c in columns if len(c) == 1 and c in string.ascii_uppercase]
    images_by_index = dict(zip(table["index"], table["image"])) if "image" in columns else {}
    out = []
    for row_no, row in enumerate(table.to_dict("records")):
        line = row_no + 2                                  # the header is line 1
        options = {c: row[c] for c in letters if row[c].strip()}
        q = {"id": row["index"], "line": line, "question": row["question"],
             "hint": row.get("hint") or None, "options": options,
             "category": row.get("category") or None, "l2_category": row.get("l2-category") or None,
             "images": _tsv_images(row, images_by_index, root, path, line)}
        q["answers"] = _tsv_answers(row["answer"], options, path, line)
        q["metric"] = "choice" if options else ("vqa" if len(q["answers"]) > 1 else "exact")
        out.append(q)
    return out


def _listed(cell: str) -> list[str]:
    text = cell.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [cell]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
    return [cell]


def _tsv_images(row: dict, by_index: dict, root: Path, path: Path, line: int) -> list[dict]:
    cell = row.get("image", "")
    if cell.strip():
        images = []
        for item in _listed(cell):
            if len(item) <= 64:                          # a reference to another row's image
                target = by_index.get(item)
                if target is None or len(target) <= 64:
                    raise InputError(f"{path}, line {line}: image {item!r} names no row holding an image")
                item = target
            images.append({"base64": item})
        return images
    cell = row.get("image_path", "")
    if not cell.strip():
        raise InputError(f"{path}, line {line}: neither 'image' nor 'image_path' is set")
    return [{"path": str(root / p)} for p in _listed(cell)]


def _tsv_answers(cell: str, options: dict, path: Path, line: int) -> list[str]:
    if not options:
        answers = [a for a in _listed(cell) if a.strip()]
        if not answers:
            raise InputError(f"{path}, line {line}: empty 'answer'")
        return answers
    answer = cell.strip()
    if answer in options:
        return [answer]
    by_text = [k for k, v in options.items() if v.strip().lower() == answer.lower()]
    if len(by_text) == 1:
        return by_text
    raise InputError(f"{path}, line {line}: answer {cell!r} is not one of the row's option letters "
                     f"{list(options)} nor one option's text")


# -- JSONL -------------------------------------------------------------------------------------
def _read_jsonl(path: Path, root: Path) -> list[dict]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {line}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}, line {line}: expected a JSON object")
            out.append(_jsonl_question(rec, root, path, line))
    if not out:
        raise InputError(f"{path}: no questions")
    return out


def _jsonl_question(rec: dict, root: Path, path: Path, line: int) -> dict:
    for key in JSONL_REQUIRED:
        if key not in rec:
            raise InputError(f"{path}, line {line}: missing required field '{key}'")
    if "answers" in rec:
        answers = rec["answers"]
        answers = [a["answer"] if isinstance(a, dict) else a for a in answers] if isinstance(answers, list) else [answers]
    elif "answer" in rec:
        answers = [rec["answer"]]
    else:
        raise InputError(f"{path}, line {line}: missing required field 'answer' (or 'answers')")
    answers = [str(a) for a in answers if str(a).strip()]
    if not answers:
        raise InputError(f"{path}, line {line}: no reference answer")
    options = rec.get("options") or {}
    if isinstance(options, list):
        options = dict(zip(string.ascii_uppercase, options))
    options = {str(k): str(v) for k, v in options.items()}
    if options and answers[0] not in options:
        raise InputError(f"{path}, line {line}: answer {answers[0]!r} is not one of the option letters {list(options)}")
    metric = "choice" if options else rec.get("metric") or ("vqa" if len(answers) > 1 else "exact")
    if metric not in METRICS:
        raise InputError(f"{path}, line {line}: metric {metric!r} is not one of {METRICS}")
    image = rec.get("image")
    images = [] if not image else [image] if isinstance(image, str) else list(image)
    text = str(rec["text"])
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if placeholders:                                     # the text places its own images
        if placeholders != len(images):
            raise InputError(f"{path}, line {line}: {placeholders} {IMAGE_PLACEHOLDER} in 'text' for {len(images)} image(s)")
        text = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return {"id": str(rec["question_id"]), "line": line, "question": text, "hint": rec.get("hint"),
            "options": options, "answers": answers, "metric": metric, "category": rec.get("category"),
            "l2_category": rec.get("l2-category"), "images": [{"path": str(root / p)} for p in images]}
