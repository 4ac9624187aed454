"""Reading an eval question file as a hostile user would write it: JSON Lines split at '\\n' only, a bad byte or row
costing only its own line (reported with file:line), a BOM accepted, empty image names, too many options and image
paths leaving the image folder refused clearly, and the command line failing on the file before the model loads."""

from __future__ import annotations

import codecs
import json

import pytest
from conftest import tiny_chat_processor, tiny_model
from PIL import Image

from saisa.evaluation import evaluate, read_questions


def _row(i: int, **fields) -> dict:
    return {"question_id": i, "text": "what is this ?", "answer": "w20", **fields}


def _lines(*rows) -> bytes:
    """Rows (dicts, or raw bytes for a broken line) as a JSONL file's bytes, non-ASCII written raw."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n" for r in rows)


def _read(tmp_path, data: bytes, **kwargs):
    path = tmp_path / "q.jsonl"
    path.write_bytes(data)
    questions, skipped = read_questions(path, **kwargs)
    return path, questions, skipped


# what str.splitlines splits at that a JSON string may hold raw (control characters must be escaped there)
@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_a_raw_line_separator_inside_a_row_stays_in_it(tmp_path, separator):
    data = _lines(_row(1), _row(2, text=f"what{separator}is this ?"), _row(3), b'{"question_id": 4, "text": ')
    path, questions, skipped = _read(tmp_path, data)
    assert [q.row["question_id"] for q in questions] == [1, 2, 3]
    assert questions[1].row["text"] == f"what{separator}is this ?"
    assert [q.where for q in questions] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert [(s.where, s.unreadable) for s in skipped] == [(f"{path}:4", True)]  # later line numbers stay right


def test_an_invalid_utf8_byte_costs_its_row_only(tmp_path):
    data = _lines(_row(1), b'{"question_id": 2, "text": "caf\xe9 ?", "answer": "w20"}', _row(3))
    path, questions, skipped = _read(tmp_path, data)
    assert [q.row["question_id"] for q in questions] == [1, 3]
    assert len(skipped) == 1 and skipped[0].where == f"{path}:2" and skipped[0].unreadable
    assert "not valid UTF-8 (byte 0xe9" in skipped[0].reason


def test_a_utf8_bom_is_accepted(tmp_path):
    data = codecs.BOM_UTF8 + _lines(_row(1), _row(2)).replace(b"\n", b"\r\n")  # as saved on Windows
    path, questions, skipped = _read(tmp_path, data)
    assert [q.row["question_id"] for q in questions] == [1, 2] and not skipped
    assert questions[0].where == f"{path}:1"


@pytest.mark.parametrize("image", ["", "   "])
def test_an_empty_image_name_is_refused_not_made_text_only(tmp_path, image):
    _, questions, skipped = _read(tmp_path, _lines(_row(1, image=image), _row(2, image=None), _row(3)))
    assert [q.row["question_id"] for q in questions] == [2, 3]  # null or absent: a text-only question
    assert "image is an empty file name" in skipped[0].reason


def test_options_beyond_z_are_refused_not_dropped(tmp_path):
    options = [f"w{i}" for i in range(27)]
    mc = {"question": "which ?", "answer": "A"}
    _, questions, skipped = _read(tmp_path, _lines({**mc, "options": options}, {**mc, "options": options[:26]}))
    assert len(questions) == 1 and len(questions[0].row["options"]) == 26
    assert "27 options in a list, but only 26 can be lettered A-Z" in skipped[0].reason


@pytest.mark.parametrize(
    "image, fragment",
    [
        ("../outside.png", "leaves the image folder"),
        ("sub/../../outside.png", "leaves the image folder"),
        ("..", "leaves the image folder"),
        ("/etc/outside.png", "absolute path"),
    ],
)
def test_image_paths_are_confined_to_the_image_folder(tmp_path, image, fragment):
    data = _lines(_row(1, image=image), _row(2, image="sub/../inside.png"), _row(3, image="sub/inside.png"))
    _, questions, skipped = _read(tmp_path, data)
    assert [q.row["question_id"] for q in questions] == [2, 3]
    assert fragment in skipped[0].reason and "--allow-external-images" in skipped[0].reason
    _, questions, skipped = _read(tmp_path, data, allow_external_images=True)
    assert len(questions) == 3 and not skipped


def _external_image_setup(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (12, 12), "red").save(tmp_path / "outside.png")
    Image.new("RGB", (12, 12), "blue").save(folder / "inside.png")
    path = tmp_path / "q.jsonl"
    path.write_bytes(
        _lines(
            _row("inside", image="inside.png"),
            _row("up", image="../outside.png"),
            _row("absolute", image=str(tmp_path / "outside.png")),
            b"\xff\xfe",
            b"[",
        )
    )
    return path, folder


def test_evaluate_confines_images_and_counts_unreadable_rows(tmp_path):
    path, folder = _external_image_setup(tmp_path)
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    metrics = evaluate(model, processor, path, folder, out_dir=tmp_path / "out", max_new_tokens=2)
    assert metrics["questions"] == 5 and metrics["answered"] == 1
    assert metrics["skipped"] == 4 and metrics["unreadable"] == 2
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [item["where"] for item in skipped] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "not valid UTF-8" in skipped[2]["reason"] and "not valid JSON" in skipped[3]["reason"]

    metrics = evaluate(
        model, processor, path, folder, out_dir=tmp_path / "out2", max_new_tokens=2, allow_external_images=True
    )
    assert metrics["answered"] == 3 and metrics["missing_images"] == 0 and metrics["unreadable"] == 2
    records = [json.loads(line) for line in (tmp_path / "out2" / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["inside", "up", "absolute"]
    assert all(r["prediction"] is not None for r in records)


@pytest.fixture
def no_model_load(monkeypatch):
    """The command must refuse the file before it loads a model: loading fails the test."""

    def load_pretrained(*args, **kwargs):
        raise AssertionError("the model was loaded before the question file was checked")

    monkeypatch.setattr("saisa.checkpoints.loading.load_pretrained", load_pretrained)


def test_eval_cli_refuses_a_file_without_usable_rows_before_loading_the_model(tmp_path, capsys, no_model_load):
    from saisa.cli import main

    path = tmp_path / "q.jsonl"
    path.write_bytes(_lines(_row(1, image=""), b"\xff"))
    assert main(["eval", str(tmp_path / "model"), "--questions", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"no question in {path} can be asked (2 row(s) skipped" in error
    assert f"{path}:1: image is an empty file name" in error and f"{path}:2: not valid UTF-8" in error

    argv = ["eval", str(tmp_path / "model"), "--questions", str(path), "--image-folder", str(tmp_path / "nowhere")]
    assert main(argv) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_eval_cli_allows_external_images_when_asked(tmp_path):
    from saisa.cli import main

    path, folder = _external_image_setup(tmp_path)
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    common = ["eval", str(tmp_path / "m"), "--questions", str(path), "--image-folder", str(folder)]
    assert main([*common, "--out", str(tmp_path / "o1"), "--max-new-tokens", "2"]) == 0
    assert json.loads((tmp_path / "o1" / "metrics.json").read_text())["answered"] == 1
    assert main([*common, "--out", str(tmp_path / "o2"), "--max-new-tokens", "2", "--allow-external-images"]) == 0
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["answered"] == 3
