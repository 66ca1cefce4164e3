"""Hallucination benchmarks for LVLMs: POPE (object probing) and CHAIR (caption hallucination), and a runner that
scores a local transformers model on a local COCO folder, with or without interventions (`python -m mmattn.vlm.eval`).
"""

from .chair import (
    CaptionObjects,
    ChairScores,
    CocoObjectVocabulary,
    chair_scores,
    ground_truth_objects,
)
from .coco import CocoSplit
from .pope import (
    POPE_SPLITS,
    POPE_TEMPLATE,
    PopeQuestion,
    PopeScores,
    build_pope_questions,
    load_pope_questions,
    parse_pope_answer,
    pope_scores,
)
from .runner import (
    CHAIR_PROMPT,
    GenerationSettings,
    generate_answers,
    load_model,
    run_chair,
    run_pope,
)

__all__ = [
    "CHAIR_PROMPT",
    "POPE_SPLITS",
    "POPE_TEMPLATE",
    "CaptionObjects",
    "ChairScores",
    "CocoObjectVocabulary",
    "CocoSplit",
    "GenerationSettings",
    "PopeQuestion",
    "PopeScores",
    "build_pope_questions",
    "chair_scores",
    "generate_answers",
    "ground_truth_objects",
    "load_model",
    "load_pope_questions",
    "parse_pope_answer",
    "pope_scores",
    "run_chair",
    "run_pope",
]
