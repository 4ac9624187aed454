"""SaisaProcessor as a transformers processor: Auto classes, chat templates with images, pipeline, old folders,
a checkpoint's own preprocessor_config.json, and LLaVA-1.5 pad-to-square kept bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_chat_processor, tiny_model, tiny_processor
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    pipeline,
)

from saisa import SaisaConfig, SaisaForConditionalGeneration, SaisaImageProcessor, SaisaModel
from saisa.components.encoders import ImagePreprocessing
from saisa.processing import SaisaProcessor

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def llava_reference(images: list[Image.Image], p: ImagePreprocessing) -> torch.Tensor:
    """The hand-written preprocessing SaisaProcessor had before it wrapped image processors (LLaVA-1.5 `pad`)."""
    mean, std = np.array(p.image_mean, dtype=np.float32), np.array(p.image_std, dtype=np.float32)
    out = []
    for image in images:
        side = max(image.size)
        square = Image.new("RGB", (side, side), tuple(int(c * 255) for c in p.image_mean))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        resized = square.resize((p.image_size, p.image_size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy((np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std).permute(2, 0, 1))
    return torch.stack(out)


def chat(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def assert_same_batch(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_auto_processor_round_trip(tmp_path):
    processor = tiny_chat_processor()
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").exists() and not (tmp_path / "saisa_processor.json").exists()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SaisaProcessor) and isinstance(loaded.image_processor, SaisaImageProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), SaisaImageProcessor)
    assert loaded.image_token_id == processor.image_token_id and loaded.pad_to_square
    assert loaded.preprocessing == processor.preprocessing and loaded.chat_template == processor.chat_template
    prompt = processor.apply_chat_template(
        chat({"type": "image"}, {"type": "text", "text": "what is this ?"}), add_generation_prompt=True
    )
    assert (
        loaded.apply_chat_template(
            chat({"type": "image"}, {"type": "text", "text": "what is this ?"}), add_generation_prompt=True
        )
        == prompt
    )
    image = noise(24, 10)
    assert_same_batch(
        loaded(text=prompt, return_tensors="pt", images=[image]),
        processor(text=prompt, return_tensors="pt", images=[image]),
    )


def test_every_auto_class_loads_a_saved_folder(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tiny_chat_processor().save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SaisaConfig)
    # as for transformers' Llava: AutoModel is the base model (no head), AutoModelForImageTextToText the full one,
    # and a vision-language model is no AutoModelForCausalLM
    for auto_class, expected in ((AutoModel, SaisaModel), (AutoModelForImageTextToText, SaisaForConditionalGeneration)):
        loaded = auto_class.from_pretrained(tmp_path)
        assert type(loaded) is expected
        assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_chat_template_tokenized_carries_the_images_in_order(tmp_path):
    processor = tiny_chat_processor()
    first, second = noise(20, 12, seed=1), noise(9, 15, seed=2)
    second.save(tmp_path / "second.png")
    messages = chat(
        {"type": "image", "image": first},
        {"type": "text", "text": "what is this ?"},
        {"type": "image", "url": str(tmp_path / "second.png")},
    )
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)  # tokenize=False: the prompt string
    assert isinstance(prompt, str) and prompt.count("<image>") == 2 and prompt.endswith("assistant:")
    batch = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    assert_same_batch(batch, processor(text=prompt, return_tensors="pt", images=[first, second]))
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert torch.equal(
        processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt"),
        batch["input_ids"],
    )


def test_an_image_item_without_an_image_is_refused_when_tokenizing():
    processor = tiny_chat_processor()
    messages = chat({"type": "text", "text": "what is"}, {"type": "image"})
    with pytest.raises(ValueError, match="image content item 0 has no image"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)


def test_named_template_tokenized():
    processor = SaisaProcessor(
        tiny_processor().tokenizer, ImagePreprocessing(16, (0.5,) * 3, (0.5,) * 3), template="vicuna_v1"
    )
    image = noise(16, 16)
    messages = chat({"type": "image", "image": image}, {"type": "text", "text": "what is this ?"})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<s>A chat between") and prompt.endswith("USER: <image>\nwhat is this ? ASSISTANT:")
    assert_same_batch(
        processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
        ),
        processor(text=prompt, return_tensors="pt", images=[image]),
    )


def test_pipeline_gives_what_generate_gives(tmp_path):
    model, processor = tiny_model(), tiny_chat_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = noise(20, 12)
    messages = chat({"type": "image", "image": image}, {"type": "text", "text": "what is this ?"})
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    assert isinstance(pipe.processor, SaisaProcessor)
    ids = pipe(text=messages, max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert torch.equal(torch.as_tensor(ids), expected[0])
    # the pipeline cuts the decoded prompt off the decoded sequence, leaving the word separator in front
    assert pipe(text=messages, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"] == (
        " " + answer
    )
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert (
        pipe(images=[image], text=prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0][
            "generated_text"
        ]
        == " " + answer
    )


def test_a_checkpoints_preprocessor_config_is_read(tmp_path):
    image = noise(13, 21)
    mean, std = (0.1, 0.2, 0.3), (0.3, 0.2, 0.1)
    default = tiny_processor().preprocess_images([image])
    CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=list(mean), image_std=list(std)
    ).save_pretrained(tmp_path)
    only_the_checkpoints = tmp_path / "checkpoint"  # a tokenizer and preprocessor_config.json, nothing of ours
    tiny_processor().tokenizer.save_pretrained(only_the_checkpoints)
    (only_the_checkpoints / "preprocessor_config.json").write_text((tmp_path / "preprocessor_config.json").read_text())
    loaded = SaisaProcessor.from_pretrained(only_the_checkpoints)
    assert type(loaded.image_processor).__name__.startswith("CLIPImageProcessor")
    pixels = loaded.preprocess_images([image])
    assert not torch.allclose(pixels, default)
    torch.testing.assert_close(pixels, llava_reference([image], ImagePreprocessing(16, mean, std)))


def test_a_folder_without_a_processor_is_named(tmp_path):
    tiny_processor().tokenizer.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no processor_config.json or preprocessor_config.json"):
        SaisaProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "preprocessing",
    [
        ImagePreprocessing(224, (0.5,) * 3, (0.5,) * 3),  # the embedded default's EfficientNet-Lite0
        ImagePreprocessing(32, CLIP_MEAN, CLIP_STD, "CLIPImageProcessor"),
        ImagePreprocessing(32, (0.5,) * 3, (0.5,) * 3, "SiglipImageProcessor"),
    ],
    ids=["efficientnet", "clip", "siglip"],
)
def test_pad_to_square_is_bit_identical_to_llava_preprocessing(preprocessing):
    processor = SaisaProcessor(tiny_processor().tokenizer, preprocessing)
    assert type(processor.image_processor).__name__.removesuffix("Pil") == preprocessing.image_processor_type
    images = [noise(301, 97, seed=3), noise(50, 123, seed=4), noise(64, 64, seed=5)]
    assert torch.equal(processor.preprocess_images(images), llava_reference(images, preprocessing))


def test_each_encoder_names_its_own_image_processor(tmp_path):
    assert tiny_model(vision="clip").vision_tower.preprocessing.image_processor_type == "CLIPImageProcessor"
    assert tiny_model(vision="siglip").vision_tower.preprocessing.image_processor_type == "SiglipImageProcessor"
    # EfficientNet-Lite has no transformers image processor: ours is registered for its config
    AutoConfig.for_model("efficientnet_lite", image_size=112).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 112, "width": 112}}))
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(image_processor, SaisaImageProcessor) and image_processor.size.height == 112


def test_a_torchvision_image_processor_is_replaced_by_its_pil_twin():
    """Where torchvision imports, AutoImageProcessor returns torchvision-backed classes (named without `Pil`); the
    processor keeps LLaVA-1.5's PIL preprocessing so a GPU machine gives the pixels a CPU one gives."""
    from transformers import CLIPImageProcessorPil

    settings = dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=[0.4] * 3)
    torchvision_like = type("CLIPImageProcessor", (CLIPImageProcessorPil,), {})(**settings)
    processor = SaisaProcessor(tiny_processor().tokenizer, torchvision_like)
    assert type(processor.image_processor) is CLIPImageProcessorPil
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 12, 3), dtype=np.uint8))
    reference = SaisaProcessor(tiny_processor().tokenizer, CLIPImageProcessorPil(**settings))
    assert torch.equal(processor.preprocess_images([image]), reference.preprocess_images([image]))
