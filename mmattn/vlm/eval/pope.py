"""POPE, Polling-based Object Probing Evaluation (Li et al., EMNLP 2023): yes/no object questions, the LLaVA answer
parser and the metrics (spec vlm.md section 6).

Questions are "Is there a {object} in the image?", half with a ground-truth object ("yes"), half with an absent one
("no"), the absent ones drawn by one of three negative-sampling splits: random, popular (most frequent objects of the
dataset) and adversarial (objects that co-occur most with the image's objects).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

__all__ = [
    "POPE_SPLITS",
    "POPE_TEMPLATE",
    "PopeQuestion",
    "PopeScores",
    "build_pope_questions",
    "load_pope_questions",
    "parse_pope_answer",
    "pope_scores",
]

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_TEMPLATE = "Is there a {} in the image?"
_NEGATIVE_WORDS = frozenset({"No", "no", "not"})


@dataclass(frozen=True)
class PopeQuestion:
    """One probe: the image file name, the question text and the ground truth (True = "yes")."""

    question_id: int
    image: str
    text: str
    label: bool


@dataclass(frozen=True)
class PopeScores:
    """POPE metrics with "yes" as the positive class; `yes_ratio` is the share of "yes" answers."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    count: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def parse_pope_answer(answer: str) -> bool:
    """The LLaVA POPE parser: keep the first sentence, drop commas; "No", "no" or "not" as a word means no (False),
    anything else yes (True)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer: expected str, got {type(answer).__name__}")
    first_sentence = answer.split(".")[0].replace(",", "")
    return _NEGATIVE_WORDS.isdisjoint(first_sentence.split())


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def pope_scores(predictions: Sequence[bool], labels: Sequence[bool]) -> PopeScores:
    """Accuracy, precision, recall, F1 (positive = "yes") and yes-ratio of parsed answers against the labels."""
    if len(predictions) != len(labels):
        raise ValueError(f"predictions: expected {len(labels)} answers (one per label), got {len(predictions)}")
    if not labels:
        raise ValueError("labels: expected at least one question, got none")
    pairs = list(zip(map(bool, predictions), map(bool, labels)))
    true_pos = sum(p and t for p, t in pairs)
    false_pos = sum(p and not t for p, t in pairs)
    false_neg = sum(t and not p for p, t in pairs)
    true_neg = len(pairs) - true_pos - false_pos - false_neg
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    return PopeScores(
        accuracy=(true_pos + true_neg) / len(pairs),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        yes_ratio=(true_pos + false_pos) / len(pairs),
        count=len(pairs),
    )


def _object_frequency(objects: Mapping[str, set[str]]) -> Counter[str]:
    """Popular split: how many images hold each object."""
    return Counter(name for names in objects.values() for name in names)


def _co_occurrence(objects: Mapping[str, set[str]]) -> dict[str, Counter[str]]:
    """Adversarial split: for each object, how many images hold it together with each other object."""
    counts: dict[str, Counter[str]] = {}
    for names in objects.values():
        for a, b in combinations(sorted(names), 2):
            counts.setdefault(a, Counter())[b] += 1
            counts.setdefault(b, Counter())[a] += 1
    return counts


def build_pope_questions(
    objects: Mapping[str, set[str]],
    categories: Sequence[str],
    split: str,
    *,
    images: int = 500,
    per_image: int = 3,
    seed: int = 0,
) -> list[PopeQuestion]:
    """POPE questions from ground-truth annotations: `images` random images (file name -> object names) holding at
    least `per_image` objects, each with `per_image` "yes" probes of its objects and `per_image` "no" probes of
    `categories` absent from it, chosen by the `split`'s negative sampling (3,000 questions at the defaults)."""
    if split not in POPE_SPLITS:
        raise ValueError(f"split: expected one of {POPE_SPLITS}, got {split!r}")
    if per_image < 1:
        raise ValueError(f"per_image: expected a positive count, got {per_image}")
    unknown = {name for names in objects.values() for name in names} - set(categories)
    if unknown:
        raise ValueError(f"objects: expected names among categories, got unknown {sorted(unknown)}")
    eligible = sorted(image for image, names in objects.items() if len(names) >= per_image)
    if len(eligible) < images:
        raise ValueError(f"images: expected at most {len(eligible)} (images with >= {per_image} objects), got {images}")
    rng = random.Random(seed)
    frequency = _object_frequency(objects) if split == "popular" else Counter()
    co_occurrence = _co_occurrence(objects) if split == "adversarial" else {}
    questions: list[PopeQuestion] = []
    for image in rng.sample(eligible, images):
        present = objects[image]
        positives = rng.sample(sorted(present), per_image)
        absent = [name for name in categories if name not in present]
        if split == "random":
            negatives = rng.sample(absent, per_image)
        else:
            scores = frequency if split == "popular" else sum((co_occurrence.get(n, Counter()) for n in present), Counter())
            negatives = sorted(absent, key=lambda name: (-scores[name], name))[:per_image]
        for name, label in [(p, True) for p in positives] + [(n, False) for n in negatives]:
            questions.append(PopeQuestion(len(questions) + 1, image, POPE_TEMPLATE.format(name), label))
    return questions


def load_pope_questions(path: str | Path) -> list[PopeQuestion]:
    """Questions from an official POPE file: one JSON object per line with question_id, image, text and label
    ("yes"/"no")."""
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        label = str(record.get("label", "")).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{path}: line {number}: expected label 'yes' or 'no', got {record.get('label')!r}")
        questions.append(PopeQuestion(int(record["question_id"]), record["image"], record["text"], label == "yes"))
    return questions
