"""Scoring as VLMEvalKit and lmms-eval do it (no LLM judge), and 95% bootstrap intervals.

    extract_choice("The answer is (B).", {"A": "cat", "B": "dog"})   -> "B"
    score_prediction(question, "B") -> {"score": 1.0, "extracted": "B"}
    vqa_accuracy("two", ["2"] * 3 + ["3"] * 7)                      -> 0.9  (leave-one-out)
    anls("4712", ["4713"])                                            -> 0.75
    bootstrap_interval([1, 0, 1, 1], seed=0)                          -> (lo, hi)

Multiple choice (VLMEvalKit's ``can_infer``): the characters ``.()[],:;!*#{}`` become spaces,
the answer is split on whitespace, and when exactly one of the row's option letters is a whole
word that letter is the answer; otherwise, when exactly one option's text occurs (case-
insensitively) in the answer, that option; otherwise extraction failed and scores 0.
Circular evaluation (MMBench) asks every rotation of the options; a question counts only
when all its rotations are answered correctly.

Short answers: ``exact`` compares after the VQA answer normalisation below; ``vqa`` is VQAv2's
soft accuracy, for each reference min(1, matches among the OTHER references / 3), averaged over
the references (with fewer than two references it is the exact match); ``anls`` is
1 - Levenshtein / max length over whitespace-collapsed lower-case strings, best reference,
set to 0 below the threshold 0.5 (lmms-eval's rule: exactly 0.5 is kept).
Normalisation (the EvalAI answer processor of VQAv2): lower case, newlines/tabs to spaces,
punctuation removed (or turned into a space where it glues two words), periods not inside
numbers removed, commas inside numbers removed, number words zero..ten to digits, articles
a/an/the dropped, common contractions written with their apostrophe.
"""
from __future__ import annotations

import re

CHOICE_SPLIT_CHARS = ".()[],:;!*#{}"
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                "hes": "he's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
                "lets": "let's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
                "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
                "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "youve": "you've"}
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(?<=\d)(,)+(?=\d)")
ANLS_THRESHOLD = 0.5


# -- normalisation ---------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """VQAv2's answer normalisation (see the module docstring)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    glued = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, references: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2 soft accuracy (leave-one-out over the references)."""
    if len(references) < 2:
        return exact_match(prediction, references)
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    per_ref = []
    for i in range(len(refs)):
        matches = sum(1 for j, r in enumerate(refs) if j != i and r == pred)
        per_ref.append(min(1.0, matches / 3.0))
    return sum(per_ref) / len(per_ref)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one answer: best reference, 0 below threshold."""
    pred = " ".join(str(prediction).strip().lower().split())
    best = 0.0
    for ref in references:
        gt = " ".join(str(ref).strip().lower().split())
        longest = max(len(gt), len(pred))
        similarity = 1.0 if longest == 0 else 1.0 - levenshtein(gt, pred) / longest
        best = max(best, similarity)
    return best if best >= threshold else 0.0


# -- multiple choice -----------------------------------------------------------------------------
def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names (see the module docstring), or None."""
    text = str(prediction)
    for ch in CHOICE_SPLIT_CHARS:
        text = text.replace(ch, " ")
    words = set(text.split())
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    lowered = str(prediction).lower()
    by_text = [letter for letter, option in options.items() if str(option).lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


def rotations(question: dict) -> list[dict]:
    """Circular evaluation: the question once per rotation of its options (rotation k puts the
    option at letter (i + k) mod N under letter i); each carries ``circular_group`` and
    ``rotation``. Open questions come back unchanged, as one item."""
    options = question.get("options") or {}
    if len(options) < 2:
        return [dict(question, circular_group=question["id"], rotation=0)]
    letters, texts = list(options), list(options.values())
    n = len(letters)
    answer_pos = letters.index(question["answers"][0])
    out = []
    for k in range(n):
        rotated = {letters[i]: texts[(i + k) % n] for i in range(n)}
        out.append(dict(question, id=question["id"] if k == 0 else f"{question['id']}@{k}", options=rotated,
                        answers=[letters[(answer_pos - k) % n]], circular_group=question["id"], rotation=k))
    return out


def score_prediction(question: dict, prediction: str) -> dict:
    """{"score": float in [0, 1], "extracted": the option letter or None (choices only)}."""
    metric = question["metric"]
    if metric == "choice":
        letter = extract_choice(prediction, question["options"])
        return {"score": float(letter is not None and letter == question["answers"][0]), "extracted": letter}
    refs = question["answers"]
    value = {"exact": exact_match, "vqa": vqa_accuracy, "anls": anls}[metric](prediction, refs)
    return {"score": float(value), "extracted": None}


def circular_scores(records: list[dict]) -> list[dict]:
    """Collapse rotated records into one record per question: score = 1 only when every rotation
    scored 1 (the first rotation's record carries the result)."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec.get("circular_group", rec["id"]), []).append(rec)
    out = []
    for key, recs in groups.items():
        first = dict(min(recs, key=lambda r: r.get("rotation", 0)))
        first["score"] = float(all(r["score"] == 1.0 for r in recs))
        first["rotations"] = len(recs)
        out.append(first)
    return out


# -- intervals -----------------------------------------------------------------------------------
def bootstrap_interval(values, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (None when empty)."""
    import numpy as np

    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for a in range(0, resamples, 256):                 # bounded memory for large sets
        b = min(resamples, a + 256)
        means[a:b] = x[rng.integers(0, x.size, size=(b - a, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def summarise_scores(records: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """{"score", "ci95", "n"} for records holding a ``score``."""
    scores = [r["score"] for r in records]
    if not scores:
        return {"score": None, "ci95": None, "n": 0}
    ci = bootstrap_interval(scores, resamples, seed)
    return {"score": sum(scores) / len(scores), "ci95": list(ci), "n": len(scores)}
