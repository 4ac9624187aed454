"""Evaluation: metric functions against hand-computed cases, complete output files, missing images reported, and
the lmms-eval plugin answering local tasks end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_chat_processor, tiny_model
from PIL import Image

from saisa.evaluation import evaluate, exact_match, extract_choice, normalize_answer, pope_metrics, yes_no
from saisa.inference.scoring import continuation_loglikelihood


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat.", "cat"),
        ("  an apple, please! ", "apple please"),
        ("Two", "2"),
        ("1,000", "1000"),
        ("3.5", "3.5"),  # a decimal point stays
        ("dont", "don't"),
        ("T-shirt/top", "t shirt top"),
        ("Yes\n", "yes"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# The official VQA evaluation's documented processing (visualqa.org/evaluation.html), one case per rule, and entries
# of its contraction table beyond the few a hand-made list would hold.
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("WHITE", "white"),  # all characters lowercase
        ("cat.", "cat"),  # periods removed...
        ("2.5", "2.5"),  # ...except as a decimal point
        ("seven", "7"),  # number words to digits
        ("none", "0"),
        ("the dog on a mat", "dog on mat"),  # articles removed
        ("an owl", "owl"),
        ("dont", "don't"),  # a missing apostrophe added
        ("girl's", "girl's"),  # apostrophes kept (possessives stay singular)
        ("2:50 pm", "2:50 pm"),  # colons kept (times)
        ("100,978", "100978"),  # no space for a comma between digits
        ("red/white", "red white"),  # other punctuation becomes a space...
        ("yes!", "yes"),
        ("fish, chips", "fish chips"),  # ...or goes, where it touches a space
        ("couldnt've", "couldn't've"),
        ("yall", "y'all"),
        ("oclock", "o'clock"),
        ("somebodys", "somebody's"),
    ],
)
def test_normalize_answer_as_the_official_vqa_evaluation(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_accepts_any_listed_answer():
    assert exact_match("Two dogs.", ["2 dogs", "a pair"]) == 1.0
    assert exact_match("three dogs", ["2 dogs"]) == 0.0


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("(C) a dog", "C"),
        ("A. cat", "A"),
        ("The answer is a dog", "C"),
        ("cat or dog", None),
        ("E", None),
        ("", None),
    ],
)
def test_extract_choice(prediction, expected):
    assert extract_choice(prediction, {"A": "cat", "B": "bird", "C": "dog"}) == expected


def test_yes_no_and_pope_metrics_by_hand():
    # "maybe" says neither: the official POPE rule counts it as yes (not None, which would count as no)
    assert [yes_no(x) for x in ("Yes, there is.", "No.", "There is not", "maybe")] == ["yes", "no", "no", "yes"]
    predictions = ["yes", "yes", "no", "no", "yes"]
    labels = ["yes", "no", "yes", "no", "yes"]
    # tp=2 fp=1 fn=1 tn=1
    metrics = pope_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3) and metrics["yes_ratio"] == pytest.approx(3 / 5)


def _questions(tmp_path):
    for i in range(3):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / f"q{i}.png")
    rows = [
        {"question_id": "short", "image": "q0.png", "text": "what is this ?", "answer": "w20"},
        {"question_id": "mc", "image": "q1.png", "question": "what ?", "options": ["w11", "w12"], "answer": "A"},
        {"question_id": "pope", "image": "q2.png", "text": "is this ?", "label": "yes"},
        {"question_id": "lost", "image": "missing.png", "text": "what ?", "answer": "w30"},
        {"question_id": "text", "text": "what is this ?", "answer": "w40"},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_outputs_are_complete_and_missing_images_reported(tmp_path):
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    metrics = evaluate(
        model, processor, _questions(tmp_path), tmp_path, out_dir=tmp_path / "out", batch_size=2, max_new_tokens=3
    )
    assert metrics["questions"] == 5 and metrics["answered"] == 4 and metrics["missing_images"] == 1
    assert metrics["skipped"] == 0 and metrics["failed"] == 0
    assert set(metrics["pope"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["question_id"] for r in records) == ["lost", "mc", "pope", "short", "text"]
    lost = next(r for r in records if r["question_id"] == "lost")
    assert lost["prediction"] is None and "missing.png" in lost["error"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics


def test_pope_metrics_are_per_row_whatever_the_question_ids(tmp_path):
    """Labels yes/no/yes/no under a missing, then a repeated question_id: the metrics pair each answer with its own
    row's label (a dict keyed by id would pair them all with the last row's label)."""
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    rows = [
        {"text": "is this ?", "label": "yes"},
        {"text": "is this ?", "label": "no"},
        {"question_id": "q", "text": "what is this ?", "label": "yes"},
        {"question_id": "q", "text": "what ?", "label": "no"},
    ]
    path = tmp_path / "pope.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = evaluate(model, processor, path, tmp_path, out_dir=tmp_path / "out", max_new_tokens=3)
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["where"] for r in records] == [f"{path}:{i}" for i in range(1, 5)]
    said = [yes_no(r["prediction"]) for r in records]  # independently re-parsed from the predictions
    assert metrics["pope"] == pope_metrics(said, [r["label"] for r in rows])
    if len(set(said)) == 1:  # what the tiny model answers: the same verdict (no "no"/"not": yes) everywhere
        assert metrics["pope"]["accuracy"] == 0.5


def test_bad_rows_are_reported_with_file_line_and_skipped(tmp_path):
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    Image.new("RGB", (12, 12)).save(tmp_path / "ok.png")
    lines = [
        json.dumps({"question_id": 1, "image": "ok.png", "text": "what is this ?", "answer": "w20"}),
        json.dumps([1, 2]),
        json.dumps({"question_id": 3, "answer": "w20"}),
        json.dumps({"question_id": 4, "text": "what ?"}),
        json.dumps({"question_id": 5, "text": "what ?", "answer": 7}),
        json.dumps({"question_id": 6, "text": "what is <image> ?", "answer": "w20"}),
        json.dumps({"question_id": 7, "text": " ".join(["what"] * 600), "answer": "w20"}),
        '{"question_id": 8, "text": ',
        json.dumps({"question_id": 9, "question": "what ?", "options": ["w1", "w2"], "answer": "C"}),
        json.dumps({"question_id": 10, "text": "is this ?", "label": "maybe"}),
        json.dumps({"question_id": 11, "text": "what ?", "answer": ["w20", "w21"]}),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    metrics = evaluate(model, processor, path, tmp_path, out_dir=tmp_path / "out", max_new_tokens=2)
    assert metrics["questions"] == 11 and metrics["skipped"] == 9 and metrics["answered"] == 2
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    reasons = {item["where"]: item["reason"] for item in skipped}
    expected = {
        2: "JSON object",
        3: "text",
        4: "answer must be",
        5: "got int",
        6: "<image>",
        7: "over the model's 512",
        8: "not valid JSON",
        9: "option letters",
        10: "label must be",
    }
    assert [item["where"] for item in skipped] == [f"{path}:{n}" for n in expected]  # in file order
    for number, fragment in expected.items():
        assert fragment in reasons[f"{path}:{number}"]
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == [1, 11]


def test_eval_cli(tmp_path):
    from saisa.cli import main

    model, processor = tiny_model("saisa"), tiny_chat_processor()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    questions = _questions(tmp_path)
    assert (
        main(
            [
                "eval",
                str(tmp_path / "m"),
                "--questions",
                str(questions),
                "--image-folder",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert (tmp_path / "o" / "metrics.json").exists()


def test_continuation_loglikelihood_against_a_manual_sum():
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    image = Image.new("RGB", (16, 16), "white")
    logprob, greedy = continuation_loglikelihood(model, processor, "what ?", [image], "w20 w21")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=prompt, return_tensors="pt", images=[image])
    total, ids, pixels = 0.0, inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad():
        for token in (20, 21):  # token by token, each step a fresh forward
            logits = model(ids, pixel_values=pixels).logits[0, -1]
            total += torch.log_softmax(logits, -1)[token].item()
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert logprob == pytest.approx(total, abs=1e-4)
    assert isinstance(greedy, bool)


TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["options"]


def doc_to_target_index(doc):
    return doc["options"].index(doc["answer"])


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""


def test_lmms_eval_plugin_answers_local_tasks(tmp_path):
    pytest.importorskip("lmms_eval")
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    docs = []
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 20, 20)).save(tmp_path / f"img{i}.png")
        docs.append(
            {
                "image": str(tmp_path / f"img{i}.png"),
                "question": "what is this ?",
                "answer": f"w{20 + i}",
                "options": [f"w{20 + i}", "w50"],
            }
        )
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "docs.json"}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
    """
    (tasks / "saisa_local_vqa.yaml").write_text(
        textwrap.dedent("""
        task: saisa_local_vqa
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs: {max_new_tokens: 3, temperature: 0, do_sample: false}
        process_results: !function utils.process_results
        metric_list:
          - {metric: exact_match, aggregation: mean, higher_is_better: true}
    """)
        + textwrap.dedent(common)
    )
    (tasks / "saisa_local_mc.yaml").write_text(
        textwrap.dedent("""
        task: saisa_local_mc
        output_type: multiple_choice
        doc_to_choice: !function utils.doc_to_choice
        doc_to_target: !function utils.doc_to_target_index
        metric_list:
          - {metric: acc, aggregation: mean, higher_is_better: true}
    """)
        + textwrap.dedent(common)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "eval",
            "--model",
            "saisa",
            "--model_args",
            f"pretrained={tmp_path / 'model'}",
            "--tasks",
            "saisa_local_vqa,saisa_local_mc",
            "--include_path",
            str(tasks),
            "--batch_size",
            "2",
            "--output_path",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*results.json")]
    assert results, done.stdout[-2000:]
    scores = results[0]["results"]
    assert "saisa_local_vqa" in scores and "saisa_local_mc" in scores
    assert 0.0 <= scores["saisa_local_mc"]["acc,none"] <= 1.0
