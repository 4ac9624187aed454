"""easy-VQA, the second task of `saisa reproduce`, prepared from the real installed package (small sizes): the files
the training data loader and the evaluation read, balanced over answers, validation images unused by training."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from saisa.evaluation.formats import format_of
from saisa.evaluation.runner import read_questions

pytestmark = pytest.mark.assets
easy_vqa = pytest.importorskip("easy_vqa", reason="easy-VQA's package is not installed: pip install easy-vqa")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from saisa.experiments.easy_vqa import prepare

    out = tmp_path_factory.mktemp("easy_vqa")
    return out, prepare(out, align_per_caption=2, instruct_per_answer=3, val_per_answer=2, test_per_answer=2, seed=0)


def test_files_are_balanced_and_read_by_training_and_evaluation(prepared):
    from saisa.embedded import build_embedded_default
    from saisa.training.data import LlavaJsonDataset

    out, paths = prepared
    answers = easy_vqa.get_answers()
    instruct = json.loads(paths["instruct"].read_text())
    assert Counter(r["conversations"][1]["value"] for r in instruct) == dict.fromkeys(answers, 3)
    align = json.loads(paths["align"].read_text())
    assert len(align) == 2 * 24 and len({r["conversations"][1]["value"] for r in align}) == 24  # shape x colour
    for split, per_answer in (("val", 2), ("test", 2)):
        questions, skipped = read_questions(paths[split])
        assert not skipped and len(questions) == per_answer * len(answers)
        kinds = Counter(format_of(q.row).name for q in questions)
        assert kinds == {"yes_no": 2 * per_answer, "short": 11 * per_answer}
        assert all((out / q.row["image"]).is_file() for q in questions)
    _, processor = build_embedded_default("saisa", image_size=112)
    for stage in ("align", "instruct"):
        dataset = LlavaJsonDataset(paths[stage], out, processor, template="plain", tokens_per_image=9)
        assert len(dataset) == len(json.loads(paths[stage].read_text())) and dataset[0]["input_ids"].numel()


def test_captions_and_answers_agree_with_the_package(prepared):
    out, paths = prepared
    texts, answers, images = easy_vqa.get_train_questions()
    by_image: dict[int, set[str]] = {}
    for answer, image in zip(answers, images, strict=True):
        by_image.setdefault(image, set()).add(answer)
    for record in json.loads(paths["align"].read_text()):
        colour, shape = record["conversations"][1]["value"].rstrip(".").split()[1:]
        image = int(record["image"].removeprefix("images/train_").removesuffix(".png"))
        assert shape in by_image[image] and (
            colour in by_image[image]
            or any(colour in text.split() for text, i in zip(texts, images, strict=True) if i == image)
        )
    for line in paths["test"].read_text().splitlines():
        row = json.loads(line)
        index = int(row["question_id"].removeprefix("test_"))
        text, answer, image = (column[index] for column in easy_vqa.get_test_questions())
        assert row["text"].startswith(text) and row.get("label", row.get("answer")) == answer
        assert row["image"] == f"images/test_{image}.png"


def test_validation_images_are_not_trained_on_and_the_draw_is_seeded(prepared, tmp_path):
    from saisa.experiments.easy_vqa import prepare

    out, paths = prepared
    trained = {r["image"] for stage in ("align", "instruct") for r in json.loads(paths[stage].read_text())}
    validation = {json.loads(line)["image"] for line in paths["val"].read_text().splitlines()}
    assert validation and not validation & trained
    again = prepare(tmp_path, align_per_caption=2, instruct_per_answer=3, val_per_answer=2, test_per_answer=2, seed=0)
    assert all(again[name].read_text() == paths[name].read_text() for name in paths)
    other = prepare(
        tmp_path / "1", align_per_caption=2, instruct_per_answer=3, val_per_answer=2, test_per_answer=2, seed=1
    )
    assert other["instruct"].read_text() != paths["instruct"].read_text()
    with pytest.raises(ValueError, match="fewer than the 100000 asked for"):
        prepare(tmp_path / "2", align_per_caption=1, instruct_per_answer=100000, val_per_answer=1, test_per_answer=1)
