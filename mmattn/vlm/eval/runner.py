"""Run POPE or CHAIR on a local transformers LVLM and a local COCO folder, optionally with interventions.

    python -m mmattn.vlm.eval pope  --model PATH --coco DIR [--split all] [--preset llava-1.5-7b --intervention var]
    python -m mmattn.vlm.eval chair --model PATH --coco DIR [--max-new-tokens 512] [--intervention fastv]

Each run writes `<output>/<task>[_<split>].jsonl` (one generated answer per line) and `<output>/<task>.json` (metrics
and the settings that produced them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch import nn

from ..._argparse import OneLineParser
from ..handle import apply
from ..interventions.base import Intervention
from ..presets import load_preset
from .chair import CocoObjectVocabulary, chair_scores, ground_truth_objects
from .coco import CocoSplit
from .pope import (
    POPE_SPLITS,
    build_pope_questions,
    load_pope_questions,
    parse_pope_answer,
    pope_scores,
)

__all__ = ["CHAIR_PROMPT", "GenerationSettings", "generate_answers", "load_model", "main", "run_chair", "run_pope"]

CHAIR_PROMPT = "Please describe this image in detail."
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class GenerationSettings:
    """What `generate_answers` passes to `model.generate` (greedy unless `do_sample`), and its batch size."""

    max_new_tokens: int
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")

    def generate_kwargs(self) -> dict:
        sampling = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, **sampling}


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """A local LVLM checkpoint and its processor (never downloads); the tokenizer pads on the left for batching."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not Path(path).is_dir():
        raise ValueError(f"model: expected a local model folder, got {str(path)!r}")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"expected a processor with a chat_template in {path}, got none")
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as error:  # not a transformers LVLM folder
        raise ValueError(f"model: cannot load an image-text-to-text model from {str(path)!r}: {error}") from error
    return model.to(device).eval(), processor


def _prompt(processor: object, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def generate_answers(
    model: nn.Module, processor: object, requests: Sequence[tuple[Path, str]], settings: GenerationSettings
) -> list[str]:
    """The model's answer to each (image file, question) pair, generated in left-padded batches."""
    answers: list[str] = []
    for batch in _batches(requests, settings.batch_size):
        images = [Image.open(path).convert("RGB") for path, _ in batch]
        prompts = [_prompt(processor, question) for _, question in batch]
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        tokens = model.generate(**inputs, **settings.generate_kwargs())
        new_tokens = tokens[:, inputs["input_ids"].shape[1] :]
        answers.extend(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def run_pope(
    model: nn.Module,
    processor: object,
    coco: CocoSplit,
    settings: GenerationSettings,
    output: Path,
    *,
    splits: Sequence[str] = POPE_SPLITS,
    questions_file: Path | None = None,
    images: int = 500,
    seed: int = 0,
) -> dict:
    """POPE per split (questions built from `coco`'s annotations, or read from an official `questions_file`), with
    the mean F1 over the splits when several run."""
    if questions_file is not None and len(splits) != 1:
        raise ValueError(f"splits: expected the one split of questions_file {questions_file}, got {list(splits)}")
    results: dict = {}
    for split in splits:
        if questions_file is not None:
            questions = load_pope_questions(questions_file)
        else:
            questions = build_pope_questions(coco.objects, coco.categories, split, images=images, seed=seed)
        requests = [(coco.image_path(q.image), q.text) for q in questions]
        answers = generate_answers(model, processor, requests, settings)
        predictions = [parse_pope_answer(answer) for answer in answers]
        results[split] = pope_scores(predictions, [q.label for q in questions]).as_dict()
        _write_jsonl(output / f"pope_{split}.jsonl", [
            {"question_id": q.question_id, "image": q.image, "text": q.text, "label": "yes" if q.label else "no",
             "answer": answer, "prediction": "yes" if prediction else "no"}
            for q, answer, prediction in zip(questions, answers, predictions)
        ])
    if len(results) > 1:
        results["mean_f1"] = sum(scores["f1"] for scores in results.values()) / len(results)
    return results


def run_chair(
    model: nn.Module,
    processor: object,
    coco: CocoSplit,
    settings: GenerationSettings,
    output: Path,
    *,
    prompt: str = CHAIR_PROMPT,
    images: int = 500,
    seed: int = 0,
) -> dict:
    """CHAIR_s, CHAIR_i, recall and Len of captions for `images` random images of `coco` (needs its captions file)."""
    if not coco.captions:
        raise ValueError("coco: expected annotations/captions_<split>.json for CHAIR's ground truth, got none")
    vocabulary = CocoObjectVocabulary.coco()
    chosen = coco.sample(images, seed, annotated=False)
    answers = generate_answers(model, processor, [(coco.image_path(name), prompt) for name in chosen], settings)
    captions = dict(zip(chosen, answers))
    truth = ground_truth_objects(coco.objects, coco.captions, vocabulary)
    scores, details = chair_scores(captions, {name: truth.get(name, set()) for name in chosen}, vocabulary)
    _write_jsonl(output / "chair.jsonl", [
        {"image": name, "caption": row.caption, "mentioned": row.mentioned, "hallucinated": row.hallucinated,
         "ground_truth": sorted(row.ground_truth)}
        for name, row in details.items()
    ])
    return scores.as_dict()


def _interventions(names: Sequence[str], overrides: Sequence[str], preset: str | None) -> list[Intervention]:
    """`--intervention METHOD` with `--override METHOD.FIELD=VALUE` (YAML values) on the settings of `--preset`."""
    if names and preset is None:
        raise ValueError(f"preset: expected a preset name or YAML path for interventions {list(names)}, got none")
    fields: dict[str, dict] = {name: {} for name in names}
    for override in overrides:
        target, _, value = override.partition("=")
        method, _, field = target.partition(".")
        if method not in fields or not field or not value:
            raise ValueError(f"override: expected METHOD.FIELD=VALUE for a method in {list(names)}, got {override!r}")
        fields[method][field] = yaml.safe_load(value)
    try:
        return [load_preset(preset, name, **fields[name]) for name in names]
    except ValueError as error:  # load_preset names its own parameter (model, method): here it is the preset
        raise ValueError(f"preset: {str(error).partition(': ')[2] or error}") from error


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m mmattn.vlm.eval", description=__doc__.split("\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    for task, help_line in (("pope", "POPE yes/no object probing"), ("chair", "CHAIR caption hallucination")):
        sub = tasks.add_parser(task, help=help_line)
        sub.add_argument("--model", required=True, help="local transformers LVLM folder (weights + processor)")
        sub.add_argument("--coco", required=True, help="COCO folder: annotations/*_<coco-split>.json + images")
        sub.add_argument("--coco-split", default="val2014", help="COCO split name (default val2014)")
        sub.add_argument("--output", default="results/vlm_eval", help="folder for answers and metrics")
        sub.add_argument("--images", type=int, default=500, help="number of random images (default 500)")
        sub.add_argument("--seed", type=int, default=0, help="image sampling and generation seed")
        sub.add_argument("--batch-size", type=int, default=8)
        sub.add_argument("--max-new-tokens", type=int, default=32 if task == "pope" else 512)
        sub.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
        sub.add_argument("--temperature", type=float, default=1.0)
        sub.add_argument("--top-p", type=float, default=1.0)
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                         help="weights dtype (default bfloat16 on CUDA, float32 on CPU)")
        sub.add_argument("--preset", default=None, help="configs/vlm preset name or YAML path for --intervention")
        sub.add_argument("--intervention", action="append", default=[],
                         choices=["var", "gift", "fastv", "pyramiddrop", "vflowopt"], help="repeatable")
        sub.add_argument("--override", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                         help="change one preset field, e.g. fastv.ratio=0.75 (repeatable)")
        if task == "pope":
            sub.add_argument("--split", choices=[*POPE_SPLITS, "all"], default="all")
            sub.add_argument("--questions", default=None, help="official POPE question file (jsonl) instead of "
                             "questions built from the annotations; needs one --split")
        else:
            sub.add_argument("--prompt", default=CHAIR_PROMPT, help=f"caption prompt (default {CHAIR_PROMPT!r})")
    return parser


def _as_option(message: str) -> str:
    """A setup error `name: ...` (the argument's Python name) as `--name: ...`, the option the user typed."""
    name, colon, rest = message.partition(": ")
    return f"--{name.replace('_', '-')}: {rest}" if colon and name.isidentifier() else message


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m mmattn.vlm.eval` entry: run one task and print and save its metrics."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.task == "pope" and args.questions and args.split == "all":
        parser.error("--questions: expected one --split naming the file's split, got --split all")
    torch.manual_seed(args.seed)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    try:
        interventions = _interventions(args.intervention, args.override, args.preset)
        settings = GenerationSettings(args.max_new_tokens, args.batch_size, args.do_sample, args.temperature, args.top_p)
        coco = CocoSplit.from_folder(args.coco, args.coco_split)  # before the (slow) model load
        model, processor = load_model(args.model, args.device, dtype)
    except (ValueError, OSError) as error:  # a bad --model, --coco, --preset, --override, --batch-size ...
        parser.error(_as_option(str(error)))
    output = Path(args.output)
    with apply(model, *interventions) if interventions else contextlib.nullcontext():
        if args.task == "pope":
            splits = POPE_SPLITS if args.split == "all" else (args.split,)
            metrics = run_pope(model, processor, coco, settings, output, splits=splits,
                               questions_file=args.questions, images=args.images, seed=args.seed)
        else:
            metrics = run_chair(model, processor, coco, settings, output, prompt=args.prompt,
                                images=args.images, seed=args.seed)
    record = {"task": args.task, "metrics": metrics, "model": str(args.model),
              "interventions": [repr(i) for i in interventions], **asdict(settings),
              "images": args.images, "seed": args.seed}
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{args.task}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0
