"""POPE and CHAIR scoring against the spec's definitions (vlm.md section 6) on synthetic answers and captions, and the
runner end to end on a tiny random LLaVA with a synthetic COCO folder."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from mmattn.vlm.eval import (
    CocoObjectVocabulary,
    CocoSplit,
    build_pope_questions,
    chair_scores,
    ground_truth_objects,
    load_pope_questions,
    parse_pope_answer,
    pope_scores,
)
from mmattn.vlm.eval.runner import (
    GenerationSettings,
    generate_answers,
    load_model,
    main,
)

from .tiny_models import LLAVA_IMAGE_ID, QWEN_IMAGE_ID, tiny_llava, tiny_qwen2vl

VOCABULARY = CocoObjectVocabulary.coco()


# -- POPE ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("answer", "expected"), [
    ("Yes, there is a dog in the image.", True),
    ("No, there is no dog in the image.", False),
    ("There is not a cat in the image.", False),
    ("no", False),
    ("No, ", False),
    ("Yes. There is no other animal.", True),  # only the first sentence counts
    ("Nothing suggests otherwise", True),  # "No" must be a whole word
    ("Notably, a dog is there", True),
    ("", True),
])
def test_pope_parser_follows_llava_rule(answer, expected):
    assert parse_pope_answer(answer) is expected


def test_pope_scores_match_confusion_matrix_definitions():
    labels = [True, True, True, False, False, False]
    predictions = [True, True, False, True, False, False]  # TP 2, FN 1, FP 1, TN 2
    scores = pope_scores(predictions, labels)
    assert scores.accuracy == pytest.approx(4 / 6)
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.recall == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(2 / 3)
    assert scores.yes_ratio == pytest.approx(3 / 6)
    assert scores.count == 6


def test_pope_scores_all_no_answers_give_zero_precision_without_error():
    scores = pope_scores([False] * 4, [True, True, False, False])
    assert (scores.precision, scores.recall, scores.f1, scores.yes_ratio, scores.accuracy) == (0.0, 0.0, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="predictions"):
        pope_scores([True], [True, False])


CATEGORIES = ["person", "dog", "cat", "car", "bus", "pizza", "cup", "bench", "kite", "bowl"]
OBJECTS = {
    "a.jpg": {"person", "dog", "car", "bench"},
    "b.jpg": {"person", "dog", "cup"},
    "c.jpg": {"person", "car", "bus"},
    "d.jpg": {"pizza", "cup", "bowl"},
    "e.jpg": {"cat"},
}


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_pope_questions_are_half_present_half_absent(split):
    questions = build_pope_questions(OBJECTS, CATEGORIES, split, images=4, per_image=3, seed=1)
    assert len(questions) == 4 * 6 and sum(q.label for q in questions) == 12
    assert len({q.question_id for q in questions}) == len(questions)
    assert "e.jpg" not in {q.image for q in questions}  # fewer than 3 objects
    for question in questions:
        name = question.text.removeprefix("Is there a ").removesuffix(" in the image?")
        assert question.text == f"Is there a {name} in the image?"
        assert (name in OBJECTS[question.image]) is question.label
    assert questions == build_pope_questions(OBJECTS, CATEGORIES, split, images=4, per_image=3, seed=1)


def _negatives(questions):
    found = {}
    for question in questions:
        if not question.label:
            found.setdefault(question.image, []).append(question.text.split()[3])
    return found


def test_pope_popular_negatives_are_the_most_frequent_absent_objects():
    frequency = Counter(name for names in OBJECTS.values() for name in names)
    for image, names in _negatives(build_pope_questions(OBJECTS, CATEGORIES, "popular", images=4, per_image=2)).items():
        ranked = sorted((c for c in CATEGORIES if c not in OBJECTS[image]), key=lambda c: (-frequency[c], c))
        assert names == ranked[:2]


def test_pope_adversarial_negatives_co_occur_most_with_present_objects():
    negatives = _negatives(build_pope_questions(OBJECTS, CATEGORIES, "adversarial", images=4, per_image=1))
    # d.jpg holds pizza, cup, bowl; cup also appears with person and dog (b.jpg): a tie that the name breaks
    assert negatives["d.jpg"] == ["dog"]
    # a.jpg holds person, dog, car, bench: cup (with person, dog) and bus (with person, car) tie at 2
    assert negatives["a.jpg"] == ["bus"]


def test_pope_question_errors_and_official_file(tmp_path):
    with pytest.raises(ValueError, match="split"):
        build_pope_questions(OBJECTS, CATEGORIES, "hard", images=1)
    with pytest.raises(ValueError, match="images"):
        build_pope_questions(OBJECTS, CATEGORIES, "random", images=5)
    with pytest.raises(ValueError, match="objects"):
        build_pope_questions({"x.jpg": {"unicorn", "dog", "cat"}}, CATEGORIES, "random", images=1)
    path = tmp_path / "coco_pope_random.json"
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}\n'
                    '{"question_id": 2, "image": "a.jpg", "text": "Is there a kite in the image?", "label": "no"}\n')
    assert [(q.question_id, q.label) for q in load_pope_questions(path)] == [(1, True), (2, False)]
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}\n')
    with pytest.raises(ValueError, match="label"):
        load_pope_questions(path)


# -- CHAIR ---------------------------------------------------------------------------------------------------------
def test_vocabulary_covers_coco80_by_name():
    assert len(VOCABULARY.categories) == 80
    for category in VOCABULARY.categories:
        assert VOCABULARY.mentions(category) == [category]


@pytest.mark.parametrize(("caption", "expected"), [
    ("A puppy and two kittens.", ["dog", "cat"]),
    ("Three men, a woman and children.", ["person", "person", "person"]),
    ("A teddy bear next to a hot dog.", ["teddy bear", "hot dog"]),  # compounds win over "bear" / "dog"
    ("Horses and buses near wine glasses.", ["horse", "bus", "wine glass"]),
    ("Players on a tennis court.", ["person"]),  # the court mentions no racket or ball
    ("A dog, another dog and a dog.", ["dog", "dog", "dog"]),  # per occurrence
    ("A sunny day in the park.", []),
])
def test_vocabulary_mentions(caption, expected):
    assert VOCABULARY.mentions(caption) == expected


def test_vocabulary_rejects_a_phrase_under_two_categories():
    with pytest.raises(ValueError, match="synonyms"):
        CocoObjectVocabulary({"dog": ["dog", "pet"], "cat": ["cat", "pet"]})


def test_chair_scores_follow_the_definitions():
    truth = ground_truth_objects({"a": {"dog"}, "b": {"car"}}, {"a": ["A man walks a dog."], "c": ["A cat."]},
                                 VOCABULARY)
    assert truth == {"a": {"dog", "person"}, "b": {"car"}, "c": {"cat"}}
    captions = {
        "a": "A man with his dog and a cat and another cat.",  # person, dog, cat, cat: 2 hallucinated of 4
        "b": "A car on the road.",  # car: none hallucinated
        "c": "A table.",  # dining table: 1 hallucinated of 1
    }
    scores, details = chair_scores(captions, truth, VOCABULARY)
    assert details["a"].hallucinated == ["cat", "cat"]
    assert scores.chair_s == pytest.approx(2 / 3)
    assert scores.chair_i == pytest.approx(3 / 6)
    assert scores.recall == pytest.approx(3 / 4)  # covered person, dog, car of person, dog, car, cat
    assert scores.length == pytest.approx(np.mean([len(c.split()) for c in captions.values()]))
    with pytest.raises(ValueError, match="ground_truth"):
        chair_scores({"z": "A dog."}, truth, VOCABULARY)
    with pytest.raises(ValueError, match="instance_objects"):
        ground_truth_objects({"a": {"unicorn"}}, {}, VOCABULARY)


# -- runner end to end ---------------------------------------------------------------------------------------------
OBJECT_WORDS = ["dog", "cat", "person", "man", "car", "bus", "table", "pizza", "cup", "bench", "kite", "bowl", "horse",
                "sheep", "cow", "bird", "boat", "train", "truck", "chair", "couch", "bed", "toilet", "laptop", "book",
                "clock", "vase", "sink", "oven", "apple", "banana", "orange", "carrot", "cake", "donut", "fork",
                "knife", "spoon", "bottle", "umbrella", "tie", "skis", "ball", "bat", "phone", "mouse", "remote"]
COCO_IMAGES = {1: {"person", "dog", "car"}, 2: {"person", "cat", "cup", "bowl"}, 3: {"bus", "car", "person"},
               4: {"pizza", "cup", "dining table"}, 5: {"dog", "bench", "kite"}}


def _word_tokenizer(words: list[str], special: dict[str, str], **tokens: str) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over `words` (ids in order)."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", extra_special_tokens=special, **tokens)


def _chat_template(image: str) -> str:
    return ("{% for m in messages %}USER : {% for c in m['content'] %}{% if c['type'] == 'image' %}" + image +
            " {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT :"
            "{% endif %}")


TEXT_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "USER", "ASSISTANT", ":", "Is", "there", "a", "in", "the", "image", "?",
              "Please", "describe", "this", "detail", ".", "yes", "no", "Yes", "No", ","]


def _tiny_processor() -> LlavaProcessor:
    words = TEXT_WORDS + OBJECT_WORDS
    words += [f"w{i}" for i in range(len(words), LLAVA_IMAGE_ID)] + ["<image>"]
    tokenizer = _word_tokenizer(words, {"image_token": "<image>"}, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=_chat_template("<image>"))


def _tiny_qwen_processor() -> Qwen2VLProcessor:
    special = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    words = TEXT_WORDS + [f"w{i}" for i in range(len(TEXT_WORDS), QWEN_IMAGE_ID)]
    words += ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    words += [f"w{i}" for i in range(len(words), 199)] + ["<|endoftext|>"]
    tokenizer = _word_tokenizer(words, special, pad_token="<pad>", eos_token="<|endoftext|>")
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 84, patch_size=14, merge_size=2)
    return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=_chat_template("<|vision_start|> <|image_pad|> <|vision_end|>"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava(attn_implementation="eager").save_pretrained(path)
    _tiny_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(VOCABULARY.categories)]
    category_id = {c["name"]: c["id"] for c in categories}
    images, instances, captions = [], [], []
    for image_id, names in COCO_IMAGES.items():
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (28 * image_id, 60, 3), dtype=np.uint8)).save(root / "val2014" / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": 28 * image_id, "width": 60})
        for name in sorted(names):
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": category_id[name]})
        captions.append({"id": image_id, "image_id": image_id, "caption": f"A photo with a {min(names)}."})
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": instances, "categories": categories}))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return root


def _run(task, model_dir, coco_dir, output, *extra):
    assert main([task, "--model", str(model_dir), "--coco", str(coco_dir), "--output", str(output), "--images", "3",
                 "--max-new-tokens", "6", *extra]) == 0
    return json.loads((output / f"{task}.json").read_text())


def _answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_runner_pope_scores_its_answers_per_split(model_dir, coco_dir, tmp_path):
    record = _run("pope", model_dir, coco_dir, tmp_path, "--batch-size", "4")
    coco = CocoSplit.from_folder(coco_dir)
    for split in ("random", "popular", "adversarial"):
        rows = _answers(tmp_path / f"pope_{split}.jsonl")
        assert len(rows) == 3 * 6 and len({r["image"] for r in rows}) == 3
        for row in rows:
            name = row["text"].removeprefix("Is there a ").removesuffix(" in the image?")
            assert (name in coco.objects[row["image"]]) == (row["label"] == "yes")
        expected = pope_scores([parse_pope_answer(r["answer"]) for r in rows], [r["label"] == "yes" for r in rows])
        assert record["metrics"][split] == expected.as_dict()
    assert record["metrics"]["mean_f1"] == pytest.approx(np.mean([record["metrics"][s]["f1"] for s in
                                                                  ("random", "popular", "adversarial")]))


def test_runner_batched_answers_equal_single_prompt_answers(model_dir, coco_dir, tmp_path):
    _run("pope", model_dir, coco_dir, tmp_path / "b1", "--split", "popular", "--batch-size", "1")
    _run("pope", model_dir, coco_dir, tmp_path / "b5", "--split", "popular", "--batch-size", "5")
    single, batched = (_answers(tmp_path / d / "pope_popular.jsonl") for d in ("b1", "b5"))
    assert [r["answer"] for r in single] == [r["answer"] for r in batched]


def test_runner_chair_scores_its_captions(model_dir, coco_dir, tmp_path):
    record = _run("chair", model_dir, coco_dir, tmp_path, "--prompt", "Please describe this image in detail.")
    rows = _answers(tmp_path / "chair.jsonl")
    assert len(rows) == 3
    coco = CocoSplit.from_folder(coco_dir)
    truth = ground_truth_objects(coco.objects, coco.captions, VOCABULARY)
    scores, _ = chair_scores({r["image"]: r["caption"] for r in rows}, truth, VOCABULARY)
    assert record["metrics"] == scores.as_dict()
    assert sum(len(r["mentioned"]) for r in rows) > 0  # the tiny vocabulary is mostly object words
    for row in rows:
        assert row["hallucinated"] == [m for m in row["mentioned"] if m not in truth[row["image"]]]


def test_runner_interventions_from_a_preset(model_dir, coco_dir, tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text("fastv: {k: 2, ratio: 0.5}\nvar: {p: 0.6, tau: 0.5, sink_dims: [0, 1]}\n")
    plain = _run("pope", model_dir, coco_dir, tmp_path / "plain", "--split", "random")
    identity = _run("pope", model_dir, coco_dir, tmp_path / "identity", "--split", "random", "--preset", str(preset),
                    "--intervention", "fastv", "--override", "fastv.ratio=0.0")
    assert identity["interventions"] and identity["metrics"] == plain["metrics"]
    assert _answers(tmp_path / "identity" / "pope_random.jsonl") == _answers(tmp_path / "plain" / "pope_random.jsonl")
    pruned = _run("chair", model_dir, coco_dir, tmp_path / "pruned", "--preset", str(preset),
                  "--intervention", "fastv", "--intervention", "var")
    assert len(pruned["interventions"]) == 2 and pruned["metrics"]["count"] == 3


@pytest.mark.parametrize("task, paths, extra, option", [
    ("pope", ("model", "coco"), ("--intervention", "fastv"), "--preset"),
    ("pope", ("missing", "coco"), (), "--model"),
    ("pope", ("not_a_model", "coco"), (), "--model"),
    ("chair", ("model", "not_coco"), (), "--coco"),
    ("pope", ("model", "coco"), ("--preset", "no-such-preset", "--intervention", "var"), "--preset"),
    ("pope", ("model", "coco"), ("--preset", "llava-1.5-7b", "--intervention", "fastv", "--override", "var.p=0.5"),
     "--override"),
    ("pope", ("model", "coco"), ("--batch-size", "0"), "--batch-size"),
    ("pope", ("model", "coco"), ("--questions", "x.jsonl"), "--questions"),
])
def test_runner_errors_are_one_line_naming_the_option(model_dir, coco_dir, tmp_path, capsys, task, paths, extra, option):
    folders = {"model": model_dir, "coco": coco_dir, "missing": tmp_path / "missing", "not_a_model": tmp_path,
               "not_coco": tmp_path}
    with pytest.raises(SystemExit) as exit_info:
        _run(task, folders[paths[0]], folders[paths[1]], tmp_path, *extra)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.count("\n") == 1 and error.startswith(f"python -m mmattn.vlm.eval: error: {option}"), error


def test_qwen2vl_batched_answers_equal_single_prompt_answers(coco_dir, tmp_path):
    tiny_qwen2vl().save_pretrained(tmp_path)
    _tiny_qwen_processor().save_pretrained(tmp_path)
    model, processor = load_model(tmp_path)
    coco = CocoSplit.from_folder(coco_dir)
    questions = ["Is there a dog in the image?", "Is there a cat?", "Please describe this image in detail."]
    requests = [(coco.image_path(name), question) for name, question in zip(coco.file_names, questions)]
    batched = generate_answers(model, processor, requests, GenerationSettings(5, batch_size=3))
    assert batched == generate_answers(model, processor, requests, GenerationSettings(5, batch_size=1))
    assert all(batched)
    grids = processor.image_processor([Image.open(path).convert("RGB") for path, _ in requests])["image_grid_thw"]
    assert len({int(grid.prod()) for grid in grids}) > 1  # rows differ in image tokens: left padding
