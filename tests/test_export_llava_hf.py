"""`saisa convert --to llava-hf` writes a folder plain transformers opens and answers from as our model does (issue 19):
`LlavaForConditionalGeneration`, `LlavaProcessor` via `AutoProcessor`, and `pipeline("image-text-to-text")`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_chat_processor, tiny_model
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor, pipeline

from saisa.checkpoints.export_llava_hf import llava_hf_chat_template
from saisa.processing import SaisaProcessor

NEW_TOKENS = 8


def photo(width: int = 24, height: int = 10) -> Image.Image:  # not square: the pad to square matters
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def messages(image=None):
    item = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [item, {"type": "text", "text": "what is this ?"}]}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from saisa.cli import main

    root = tmp_path_factory.mktemp("export")
    model, processor = tiny_model("llava"), tiny_chat_processor()
    model.save_pretrained(root / "ours")
    processor.save_pretrained(root / "ours")
    assert main(["convert", str(root / "ours"), str(root / "hf"), "--to", "llava-hf"]) == 0
    return model, processor, root / "hf"


def our_answer(model, processor) -> list[int]:
    inputs = processor.apply_chat_template(
        messages(photo()), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_folder_has_a_llava_processor(exported):
    _, _, folder = exported
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "LlavaProcessor"
    assert (folder / "preprocessor_config.json").exists() and (folder / "chat_template.jinja").exists()
    assert json.loads((folder / "tokenizer_config.json").read_text()).get("processor_class") != "SaisaProcessor"
    assert isinstance(AutoProcessor.from_pretrained(folder), LlavaProcessor)


def test_plain_transformers_answers_as_our_model(exported):
    model, processor, folder = exported
    hf_model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    hf_processor = AutoProcessor.from_pretrained(folder)
    ours = processor(text="<image>", images=[photo()], return_tensors="pt")["pixel_values"]
    theirs = hf_processor(text="<image>", images=[photo()], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(theirs, ours)  # LLaVA-1.5's pad to square, then the same resize and normalisation
    inputs = hf_processor.apply_chat_template(
        messages(photo()), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert (inputs["input_ids"] == hf_model.config.image_token_id).sum() == model.tokens_per_image
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == our_answer(model, processor)


def test_the_pipeline_answers_as_our_model(exported):
    model, processor, folder = exported
    pipe = pipeline("image-text-to-text", model=str(folder))
    result = pipe(text=messages(photo()), max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    expected = processor.decode(our_answer(model, processor), skip_special_tokens=True)
    # the pipeline cuts the decoded prompt off the decoded whole: the word-level test tokenizer leaves its space
    assert result[0]["generated_text"].strip() == expected


def test_the_chat_template_renders_as_our_processor(exported):
    _, processor, folder = exported
    hf_processor = AutoProcessor.from_pretrained(folder)
    conversation = [*messages(), {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]
    for add in (False, True):
        assert hf_processor.apply_chat_template(conversation, add_generation_prompt=add) == (
            processor.apply_chat_template(conversation, add_generation_prompt=add)
        )


@pytest.mark.parametrize("name", ["vicuna_v1", "llama3", "chatml"])
def test_named_templates_become_equivalent_jinja(name):
    processor = SaisaProcessor(tiny_chat_processor().tokenizer, tiny_chat_processor().image_processor, template=name)
    template = llava_hf_chat_template(processor)
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        *messages(),
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "and ?"},
    ]
    plain = SaisaProcessor(processor.tokenizer, processor.image_processor, chat_template=template)
    for turns in (conversation, conversation[1:]):
        for add in (False, True):
            assert plain.apply_chat_template(turns, add_generation_prompt=add) == (
                processor.apply_chat_template(turns, add_generation_prompt=add)
            )
