"""CHAIR, Caption Hallucination Assessment with Image Relevance (Rohrbach et al., EMNLP 2018), and its object recall
(spec vlm.md section 6).

A caption's object mentions are the COCO-80 categories its words name (through the synonym lists in
`coco_synonyms.json`, longest phrase first, plurals resolved); a mention is hallucinated when its category is not in
the image's ground truth (instance annotations plus the objects the reference captions mention).

    CHAIR_s = |captions with >= 1 hallucinated mention| / |captions|
    CHAIR_i = |hallucinated mentions| / |mentions|                    (per occurrence)
    Recall  = |ground-truth objects a caption covers| / |ground-truth objects|
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

__all__ = ["SYNONYMS_FILE", "CaptionObjects", "ChairScores", "CocoObjectVocabulary", "chair_scores", "ground_truth_objects"]

SYNONYMS_FILE = Path(__file__).with_name("coco_synonyms.json")
Key = TypeVar("Key", bound=Hashable)
_IRREGULAR_PLURALS = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
                      "knives": "knife", "geese": "goose", "oxen": "ox", "calves": "calf", "teeth": "tooth"}
_WORD = re.compile(r"[a-z]+")


class CocoObjectVocabulary:
    """Maps caption text to COCO-80 category mentions.

    `synonyms`: category name -> lowercase singular words or phrases naming it; `non_object_phrases`: phrases that are
    consumed without a mention (a "tennis court" mentions neither racket nor ball).
    """

    def __init__(self, synonyms: Mapping[str, Sequence[str]], non_object_phrases: Iterable[str] = ()) -> None:
        self.categories = tuple(synonyms)
        self._phrases: dict[tuple[str, ...], str | None] = {}
        for phrase in non_object_phrases:
            self._phrases[tuple(phrase.split())] = None
        for category, words in synonyms.items():
            for phrase in words:
                key = tuple(phrase.split())
                if self._phrases.get(key, category) != category:
                    raise ValueError(f"synonyms: expected {phrase!r} under one category, got it under several")
                self._phrases[key] = category
        self._words = {word for phrase in self._phrases for word in phrase}
        self._longest = max(map(len, self._phrases))

    @classmethod
    def coco(cls) -> CocoObjectVocabulary:
        """The COCO-80 vocabulary shipped with mmattn."""
        data = json.loads(SYNONYMS_FILE.read_text())
        return cls(data["categories"], data["non_object_phrases"])

    def _singular(self, word: str) -> str:
        """The vocabulary word a caption word is a plural of (itself when none is)."""
        candidates = (word, _IRREGULAR_PLURALS.get(word, ""), word[:-3] + "y" if word.endswith("ies") else "",
                      word[:-2] if word.endswith("es") else "", word[:-1] if word.endswith("s") else "")
        return next((c for c in candidates if c in self._words), word)

    def mentions(self, text: str) -> list[str]:
        """The category of every object mention in `text`, in order, one entry per occurrence."""
        words = [self._singular(w) for w in _WORD.findall(text.lower())]
        found, start = [], 0
        while start < len(words):
            for size in range(min(self._longest, len(words) - start), 0, -1):
                phrase = tuple(words[start : start + size])
                if phrase in self._phrases:
                    if self._phrases[phrase] is not None:
                        found.append(self._phrases[phrase])
                    start += size
                    break
            else:
                start += 1
        return found


@dataclass(frozen=True)
class CaptionObjects:
    """One scored caption: its mentions (per occurrence), the hallucinated ones and the image's ground truth."""

    caption: str
    mentioned: list[str]
    hallucinated: list[str]
    ground_truth: set[str]


@dataclass(frozen=True)
class ChairScores:
    """CHAIR_s, CHAIR_i, object recall and the mean caption length in words (Len)."""

    chair_s: float
    chair_i: float
    recall: float
    length: float
    count: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def ground_truth_objects(
    instance_objects: Mapping[Key, Iterable[str]],
    reference_captions: Mapping[Key, Sequence[str]],
    vocabulary: CocoObjectVocabulary,
) -> dict[Key, set[str]]:
    """CHAIR's ground truth per image: its instance-annotation categories plus every category its reference captions
    mention."""
    truth: dict[Key, set[str]] = {}
    for key in set(instance_objects) | set(reference_captions):
        names = set(instance_objects.get(key, ()))
        unknown = names - set(vocabulary.categories)
        if unknown:
            raise ValueError(f"instance_objects: expected COCO category names, got {sorted(unknown)} for {key!r}")
        for caption in reference_captions.get(key, ()):
            names.update(vocabulary.mentions(caption))
        truth[key] = names
    return truth


def chair_scores(
    captions: Mapping[Key, str], ground_truth: Mapping[Key, set[str]], vocabulary: CocoObjectVocabulary
) -> tuple[ChairScores, dict[Key, CaptionObjects]]:
    """CHAIR_s, CHAIR_i, recall and Len of generated `captions` (image key -> caption) against `ground_truth`
    (image key -> category names), with the per-caption mentions."""
    if not captions:
        raise ValueError("captions: expected at least one caption, got none")
    missing = [key for key in captions if key not in ground_truth]
    if missing:
        raise ValueError(f"ground_truth: expected an entry for every captioned image, got none for {missing[:5]}")
    details: dict[Key, CaptionObjects] = {}
    for key, caption in captions.items():
        mentioned = vocabulary.mentions(caption)
        hallucinated = [name for name in mentioned if name not in ground_truth[key]]
        details[key] = CaptionObjects(caption, mentioned, hallucinated, set(ground_truth[key]))
    rows = details.values()
    mentions = sum(len(row.mentioned) for row in rows)
    truth_total = sum(len(row.ground_truth) for row in rows)
    covered = sum(len(set(row.mentioned) & row.ground_truth) for row in rows)
    scores = ChairScores(
        chair_s=sum(bool(row.hallucinated) for row in rows) / len(details),
        chair_i=sum(len(row.hallucinated) for row in rows) / mentions if mentions else 0.0,
        recall=covered / truth_total if truth_total else 0.0,
        length=sum(len(row.caption.split()) for row in rows) / len(details),
        count=len(details),
    )
    return scores, details
