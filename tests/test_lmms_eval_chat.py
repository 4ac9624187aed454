"""lmms-eval (0.7.3, installed): `--batch_size auto` and the chat model interface (`--model saisa_chat`) besides the
simple one (issue 19)."""

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

pytest.importorskip("lmms_eval")

from saisa.inference.generation import answer_batch  # noqa: E402
from saisa.integrations.lmms_eval_model import SaisaChatLMM, SaisaLMM, parse_batch_size  # noqa: E402

TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmms") / "model"
    tiny_model("saisa").save_pretrained(folder)
    tiny_chat_processor().save_pretrained(folder)
    return folder


def test_batch_size_auto_is_accepted():
    assert parse_batch_size("auto", None) == (64, True)
    assert parse_batch_size("auto:4", 8) == (8, True)
    assert parse_batch_size("3", None) == (3, False)
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        parse_batch_size("many", None)


def test_an_automatic_batch_size_halves_on_out_of_memory(folder):
    lmm = SaisaLMM(pretrained=str(folder), batch_size="auto", max_batch_size=8, device="cpu")
    seen = []

    def run(chunk):
        seen.append(len(chunk))
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item * 10 for item in chunk]

    assert lmm._batched(list(range(7)), run, "test") == [item * 10 for item in range(7)]
    assert seen == [7, 4, 2, 2, 2, 1] and lmm.batch_size_per_gpu == 2
    fixed = SaisaLMM(pretrained=str(folder), batch_size=4, device="cpu")
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a batch size the user fixed is not changed behind their back
        fixed._batched(list(range(7)), run, "test")


def test_the_chat_interface_answers_as_the_simple_one_with_batch_size_auto(folder, tmp_path):
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    docs = []
    for i in range(4):
        image = Image.new("RGB", (16, 16), (60 * i, 20, 20))
        image.save(tmp_path / f"img{i}.png")
        (answer,) = answer_batch(model, processor, ["what is this ?"], [[image]], max_new_tokens=3)
        docs.append({"image": str(tmp_path / f"img{i}.png"), "question": "what is this ?", "answer": answer.strip()})
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "saisa_chat_vqa.yaml").write_text(
        textwrap.dedent(f"""
        task: saisa_chat_vqa
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "docs.json"}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs: {{max_new_tokens: 3, temperature: 0, do_sample: false}}
        process_results: !function utils.process_results
        metric_list:
          - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
        """)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "lmms_eval", "eval", "--model", "saisa_chat"]
    command += ["--model_args", f"pretrained={folder},device=cpu", "--tasks", "saisa_chat_vqa"]
    command += ["--include_path", str(tasks), "--batch_size", "auto", "--output_path", str(tmp_path / "results")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*results.json")]
    assert results, done.stdout[-2000:] + done.stderr[-2000:]
    assert results[0]["results"]["saisa_chat_vqa"]["exact_match,none"] == 1.0


def test_chat_requests_with_video_are_refused_by_name(folder):
    lmm = SaisaChatLMM(pretrained=str(folder), batch_size=1, device="cpu")
    messages = [{"role": "user", "content": [{"type": "video", "url": "clip.mp4"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match="text and images; this request holds 'video'"):
        lmm._prompt(messages)
