"""SaisaProcessor behaves as transformers' processors do (issue 19): argument order, processing kwargs, chat templates
written for transformers' message format, transformers' defaults, truncation that never orphans an image."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_chat_processor
from PIL import Image

from saisa.processing import SaisaProcessor

# llava-hf/llava-1.5-7b-hf's chat template (content lists of typed items)
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}]


def image(side: int = 16) -> Image.Image:
    return Image.new("RGB", (side, side), "red")


def test_positional_arguments_are_images_then_text():
    processor = tiny_chat_processor()
    by_position = processor([image()], "what is <image> ?", return_tensors="pt")
    by_keyword = processor(text="what is <image> ?", images=[image()], return_tensors="pt")
    assert torch.equal(by_position["input_ids"], by_keyword["input_ids"])
    assert torch.equal(by_position["pixel_values"], by_keyword["pixel_values"])


def test_a_template_for_transformers_message_format_renders_the_content_lists():
    processor = SaisaProcessor(
        tiny_chat_processor().tokenizer, tiny_chat_processor().image_processor, chat_template=LLAVA_HF_TEMPLATE
    )
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == (
        "USER: <image>\nwhat is this ? ASSISTANT:"
    )
    ids = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert ids["pixel_values"].shape == (1, 3, 16, 16)
    assert (ids["input_ids"] == processor.image_token_id).sum() == 1


def test_chat_template_defaults_are_transformers_defaults():
    processor = tiny_chat_processor()  # a template reading string content: lists are flattened for it
    assert not processor.apply_chat_template(MESSAGES).endswith("assistant:")  # add_generation_prompt=False
    ids = processor.apply_chat_template([{"role": "user", "content": "what ?"}], tokenize=True)
    assert isinstance(ids, list)  # return_tensors=None: python lists, as transformers returns
    assert isinstance(processor(text="what ?")["input_ids"], list)


def test_text_and_images_kwargs_are_applied():
    processor = tiny_chat_processor()
    padded = processor(
        text="what is <image> ?", images=[image()], text_kwargs={"padding": "max_length", "max_length": 9}
    )
    assert len(padded["input_ids"][0]) == 9
    flat = processor(text="what is <image> ?", images=[image()], padding="max_length", max_length=9)
    assert flat["input_ids"] == padded["input_ids"]
    plain = processor(images=[image()], return_tensors="pt")["pixel_values"]
    unnormalised = processor(images=[image()], images_kwargs={"do_normalize": False}, return_tensors="pt")
    assert not torch.equal(plain, unnormalised["pixel_values"])
    assert unnormalised["pixel_values"].min() >= 0  # rescaled to [0, 1], not normalised to [-1, 1]
    common = processor(text="what ?", common_kwargs={"return_tensors": "pt"})
    assert isinstance(common["input_ids"], torch.Tensor)
    with pytest.raises(ValueError):  # given twice: transformers refuses it
        processor(text="what ?", text_kwargs={"padding": "do_not_pad"}, padding="max_length")


def test_truncation_never_cuts_an_image_whose_pixels_are_given():
    processor = tiny_chat_processor()
    with pytest.raises(ValueError, match=r"cut 1 of the 1 <image> placeholder\(s\) of prompt 0"):
        processor(text="what is this ? <image>", images=[image()], truncation=True, max_length=3)
    kept = processor(text="<image> what is this ?", images=[image()], truncation=True, max_length=3)
    assert kept["input_ids"][0].count(processor.image_token_id) == 1


def test_num_multimodal_tokens_counts_the_placeholders_the_processor_writes():
    processor = tiny_chat_processor()
    sizes = [(10, 30), (40, 40)]
    inputs = processor(
        text=["<image> what", "<image> ?"],
        images=[image(s[0]) for s in sizes],
        return_mm_token_type_ids=True,
        return_tensors="pt",
    )
    counts = (inputs["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert inputs["mm_token_type_ids"].sum(1).tolist() == counts
    assert processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"] == counts == [1, 1]
