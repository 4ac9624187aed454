"""Training: loss goes down, resume is exact, labels are assistant-only, templates and images fail loudly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_processor
from PIL import Image
from safetensors.torch import load_file

from saisa.processing.templates import Template, TemplateMismatchError, get_template, tokenize_with_labels
from saisa.training import load_recipe, run_training
from saisa.training.data import LlavaJsonDataset

QUESTION = {"from": "human", "value": "<image>\nwhat is this ?"}


def _write_run(tmp_path, arch: str, samples: int = 4, **model_kwargs) -> dict:
    processor = tiny_processor()
    model = tiny_model(arch, image_token_id=processor.image_token_id, **model_kwargs)
    model.save_pretrained(tmp_path / "init")
    processor.save_pretrained(tmp_path / "init")
    rng = np.random.default_rng(0)
    records = []
    for i in range(samples):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
        answer = ["a cat", "this is a cat", "a", "cat and a cat"][i % 4]
        if i % 4 == 3:  # several images in one sample
            records.append(
                {
                    "id": str(i),
                    "image": [name, "img0.png"],
                    "conversations": [
                        {"from": "human", "value": "<image> and <image> ?"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
        elif i % 4 == 2:  # text only
            records.append(
                {
                    "id": str(i),
                    "conversations": [{"from": "human", "value": "what is a cat ?"}, {"from": "gpt", "value": answer}],
                }
            )
        else:
            records.append({"id": str(i), "image": name, "conversations": [QUESTION, {"from": "gpt", "value": answer}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    return {
        "architecture": arch,
        "stage": "instruct",
        "model": {"init": str(tmp_path / "init")},
        "data": {"train": str(tmp_path / "train.json"), "image_folder": str(tmp_path), "template": "tokenizer"},
        "output_dir": str(tmp_path / "out"),
        "training": {
            "per_device_train_batch_size": 4,
            "max_steps": 8,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_steps": 100,
            "seed": 0,
        },
    }


@pytest.mark.parametrize("arch", ["saisa", "llava", "naavit"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path, arch):
    out = run_training(_write_run(tmp_path, arch))
    losses = [loss for _, loss in json.loads((out / "training_report.json").read_text())["losses"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert (out / "model.safetensors").exists() and (out / "processor_config.json").exists()
    assert (out / "loss.png").exists()


def test_align_trains_projectors_only_then_shared_projector_seeds_every_layer(tmp_path):
    recipe = _write_run(tmp_path, "saisa", shared_projector=True)
    recipe["stage"] = "align"
    before = load_file(tmp_path / "init" / "model.safetensors")
    out = run_training(recipe)
    after = load_file(out / "model.safetensors")
    assert not torch.equal(before["projector.linear_1.weight"], after["projector.linear_1.weight"])
    for key in before:
        if not key.startswith("projector."):
            assert torch.equal(before[key], after[key]), key  # LLM and vision untouched
    recipe = {**recipe, "stage": "instruct", "model": {"init": str(out)}, "output_dir": str(tmp_path / "inst")}
    recipe["training"] = {**recipe["training"], "max_steps": 1, "learning_rate": 0.0}
    inst = load_file(run_training(recipe) / "model.safetensors")
    for layer in range(3):
        assert torch.equal(inst[f"layer_projectors.{layer}.linear_1.weight"], after["projector.linear_1.weight"])


def test_resume_after_an_interruption_gives_the_same_parameters(tmp_path):
    recipe = _write_run(tmp_path, "saisa", samples=8)
    recipe["training"] = {
        **recipe["training"],
        "per_device_train_batch_size": 2,
        "max_steps": 6,
        "save_steps": 2,
        "save_total_limit": None,
    }
    out = run_training(recipe)
    uninterrupted = load_file(out / "model.safetensors")
    # Interrupted after step 2 (mid-epoch): later checkpoints gone, one half-written checkpoint left behind.
    import shutil

    for step in (4, 6):
        shutil.rmtree(out / f"checkpoint-{step}")
    (out / "model.safetensors").unlink()
    (out / "checkpoint-5").mkdir()
    resumed = load_file(run_training(recipe, resume=True) / "model.safetensors")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_lora_instruct_and_merge(tmp_path):
    recipe = _write_run(tmp_path, "saisa")
    recipe["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    out = run_training(recipe)
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = load_file(out / "model.safetensors")
    assert not any("lora" in key for key in merged)
    from saisa.cli import main

    assert (
        main(["merge-lora", str(out / "adapter"), "--base", str(tmp_path / "init"), "--out", str(tmp_path / "m")]) == 0
    )
    again = load_file(tmp_path / "m" / "model.safetensors")
    for key, value in merged.items():
        torch.testing.assert_close(again[key], value, msg=key)


def test_only_assistant_tokens_carry_labels():
    processor = tiny_processor()
    turns = [
        QUESTION,
        {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "what is this ?"},
        {"from": "gpt", "value": "this is a cat"},
    ]
    for name in ("tokenizer", "chatml", "vicuna_v1"):
        rendered = get_template(name, processor.tokenizer).render(turns)
        ids, labels = tokenize_with_labels(rendered, processor.tokenizer)
        labelled = processor.tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])
        assert "cat" in labelled and "what" not in labelled and "user" not in labelled, (name, labelled)


def test_plain_template_keeps_images_and_caption_only():
    rendered = get_template("plain").render([QUESTION, {"from": "gpt", "value": "a cat"}])
    assert rendered.text == "<image>a cat\n"
    assert rendered.text[slice(*rendered.assistant_spans[0])] == "a cat\n"


def test_a_template_that_does_not_tokenize_as_rendered_raises():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # No separator, and a tokenizer that splits on whitespace only: "assistant:cat" becomes one token that starts
    # before the answer, so no token carries the answer's loss.
    backend = Tokenizer(models.WordLevel({"?": 0, "user:": 1, "assistant:cat": 2}, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    whitespace_only = PreTrainedTokenizerFast(tokenizer_object=backend)
    glued = Template("glued", "", "", "user: {content}\n", "assistant:", "", "\n")
    rendered = glued.render([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "cat"}])
    with pytest.raises(TemplateMismatchError, match="does not line up"):
        tokenize_with_labels(rendered, whitespace_only)
    processor = tiny_processor()
    processor.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    )
    with pytest.raises(TemplateMismatchError, match="alters the assistant text"):
        get_template("tokenizer", processor.tokenizer).render([QUESTION, {"from": "gpt", "value": "a cat"}])


def test_missing_or_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    _write_run(tmp_path, "saisa")
    (tmp_path / "img0.png").write_bytes(b"garbage")
    processor = tiny_processor()
    dataset = LlavaJsonDataset(tmp_path / "train.json", tmp_path, processor, template="tokenizer", tokens_per_image=16)
    with pytest.raises(ValueError, match=r"sample 0: cannot decode image .*img0.png"):
        dataset[0]
    (tmp_path / "img1.png").unlink()  # a missing image is found when the data loads, before training
    with pytest.raises(FileNotFoundError, match=r"1 of 4 samples name an image that is not in .*sample 1: .*img1.png"):
        LlavaJsonDataset(tmp_path / "train.json", tmp_path, processor, template="tokenizer", tokens_per_image=16)
    lenient = LlavaJsonDataset(
        tmp_path / "train.json", tmp_path, processor, template="tokenizer", tokens_per_image=16, skip_bad_images=True
    )
    sample = lenient[0]  # falls through to the next usable sample
    assert "input_ids" in sample and lenient.stats.skipped_images == [0] and list(lenient.stats.skipped_records) == [1]
    assert lenient.stats.skipped == 2


def test_truncation_is_counted_and_drops_whole_images(tmp_path):
    _write_run(tmp_path, "saisa")
    turns = [QUESTION, {"from": "gpt", "value": "a cat"}, {"from": "human", "value": "<image> ?"}]
    record = {"id": "two", "image": ["img0.png", "img1.png"], "conversations": [*turns, {"from": "gpt", "value": "a"}]}
    (tmp_path / "train.json").write_text(json.dumps([record]))
    processor = tiny_processor()
    dataset = LlavaJsonDataset(
        tmp_path / "train.json", tmp_path, processor, template="tokenizer", tokens_per_image=16, max_length=40
    )
    sample = dataset[0]  # two images = 32 positions and the text > 40: the second image is cut with what follows it
    assert sample["pixel_values"].shape[0] == 1 and dataset.stats.truncated == 1
    assert (sample["labels"] != -100).any()  # the first answer is kept


def test_recipe_overrides():
    recipe = load_recipe(None, ["stage=instruct", "training.max_steps=5", "lora.r=8"])
    assert recipe == {"stage": "instruct", "training": {"max_steps": 5}, "lora": {"r": 8}}
    with pytest.raises(ValueError, match="must look like"):
        load_recipe(None, ["nonsense"])


def test_full_scale_recipe_path_on_tiny_local_checkpoints(tmp_path):
    """The shipped Vicuna-7B + CLIP recipe, pointed at tiny local LLM and CLIP folders, runs its stage align."""
    from conftest import text_config, vision_config
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from saisa.processing import SaisaProcessor

    recipe = _write_run(tmp_path, "saisa")
    LlamaForCausalLM(text_config("llama")).save_pretrained(tmp_path / "llm")
    tiny_processor().tokenizer.save_pretrained(tmp_path / "llm")
    CLIPVisionModel(vision_config()).save_pretrained(tmp_path / "clip")
    overrides = [
        f"model.llm={tmp_path / 'llm'}",
        f"model.vision={tmp_path / 'clip'}",
        f"data.train={recipe['data']['train']}",
        f"data.image_folder={tmp_path}",
        f"output_dir={tmp_path / 'full'}",
        "training.deepspeed=null",
        "training.bf16=false",
        "training.max_steps=2",
        "training.per_device_train_batch_size=2",
        "training.dataloader_num_workers=0",
    ]
    out = run_training(load_recipe("vicuna7b-clip336-align", overrides))
    processor = SaisaProcessor.from_pretrained(out)
    assert processor.template == "vicuna_v1"
    assert (out / "model.safetensors").exists()
