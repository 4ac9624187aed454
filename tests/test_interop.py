"""Checkpoints in the authors' (LLaVA code base) layout and the llava-hf layout load and give the right logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_TOKEN as I
from conftest import hf_llava_with_weights_of, images, tiny_chat_processor, tiny_model
from reference import reference_logits
from transformers import LlavaForConditionalGeneration

from saisa.checkpoints.export_llava_hf import export_llava_hf
from saisa.checkpoints.foreign import UnknownCheckpointError, detect_layout, processor_for_foreign
from saisa.checkpoints.loading import load_model
from saisa.model import SaisaForConditionalGeneration
from saisa.model.configuration import SaisaConfig
from saisa.model.modeling import to_legacy_keys
from saisa.processing import SaisaProcessor

IDS = torch.tensor([[5, 6, I, 7, 8, 9]])


def _load(folder, **kwargs):
    """The model alone, as `saisa.load_pretrained` loads it (foreign folders are converted there)."""
    return load_model(folder, **kwargs)


def write_authors_layout(model, folder, *, bin_weights: bool = True) -> None:
    """Our tiny model written the way the LLaVA-1.5 code base (and the SAISA release) writes checkpoints."""
    folder.mkdir(parents=True)
    (folder / "clip").mkdir()
    model.config.vision_config.save_pretrained(folder / "clip")
    config = model.config.text_config.to_dict()
    config.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower="clip",
        mm_hidden_size=model.vision_tower.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad",
        use_mm_proj=True,
    )
    (folder / "config.json").write_text(json.dumps(config))
    state = {}
    for key, value in to_legacy_keys(model.state_dict()).items():  # the names our folders hold
        if key.startswith("language_model.model."):
            state["model." + key.removeprefix("language_model.model.")] = value
        elif key == "language_model.lm_head.weight":
            state["lm_head.weight"] = value
        elif key.startswith("vision_tower.model."):  # transformers 4 naming, with the vision_model level
            state["model.vision_tower.vision_tower.vision_model." + key.removeprefix("vision_tower.model.")] = value
        elif key.startswith("layer_projectors."):
            _, layer, linear, kind = key.split(".")
            state[f"model.layers.{layer}.mm_projector.{0 if linear == 'linear_1' else 2}.{kind}"] = value
        elif key.startswith("projector."):
            _, linear, kind = key.split(".")
            state[f"model.mm_projector.{0 if linear == 'linear_1' else 2}.{kind}"] = value
    if model.config.architecture == "saisa":  # the release keeps a vestigial model-level projector
        for index, shape in (
            (0, (model.config.text_config.hidden_size, model.vision_tower.hidden_size)),
            (2, (model.config.text_config.hidden_size,) * 2),
        ):
            state[f"model.mm_projector.{index}.weight"] = torch.randn(shape)
            state[f"model.mm_projector.{index}.bias"] = torch.randn(shape[0])
    state = {k: v.clone().contiguous() for k, v in state.items()}
    if bin_weights:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, folder / "model.safetensors")
    tiny_chat_processor().tokenizer.save_pretrained(folder)


def test_saisa_release_layout_matches_the_reference(tmp_path):
    source = tiny_model("saisa")
    write_authors_layout(source, tmp_path / "release")
    loaded = _load(tmp_path / "release")
    assert loaded.config.architecture == "saisa" and len(loaded.layer_projectors) == 3
    with torch.no_grad():
        expected = reference_logits(source, IDS[0], images(1))  # the released model's equations, source weights
        got = loaded(IDS, pixel_values=images(1)).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_llava_original_layout_matches_transformers_llava(tmp_path):
    source = tiny_model("llava")
    write_authors_layout(source, tmp_path / "llava15", bin_weights=True)
    loaded = _load(tmp_path / "llava15")
    assert loaded.config.architecture == "llava"
    hf = hf_llava_with_weights_of(source, image_token_index=3)
    v = loaded.tokens_per_image
    with torch.no_grad():
        ours = loaded(IDS, pixel_values=images(1)).logits[0]
        theirs = hf(input_ids=torch.tensor([[5, 6] + [3] * v + [7, 8, 9]]), pixel_values=images(1)).logits[0]
    torch.testing.assert_close(ours[[0, 1, 3, 4, 5]], theirs[[0, 1, 2 + v, 3 + v, 4 + v]], atol=1e-5, rtol=1e-5)


def test_llava_hf_layout_loads_and_exports_back(tmp_path):
    torch.manual_seed(0)
    reference = tiny_model("llava")
    hf = hf_llava_with_weights_of(reference, image_token_index=3)
    hf.save_pretrained(tmp_path / "hf")
    loaded = _load(tmp_path / "hf")
    assert loaded.config.image_token_id == 3
    v = loaded.tokens_per_image
    ids = torch.tensor([[5, 6, 3, 7, 8, 9]])
    with torch.no_grad():
        ours = loaded(ids, pixel_values=images(1)).logits[0]
        theirs = hf(input_ids=torch.tensor([[5, 6] + [3] * v + [7, 8, 9]]), pixel_values=images(1)).logits[0]
    torch.testing.assert_close(ours[[0, 1, 3, 4, 5]], theirs[[0, 1, 2 + v, 3 + v, 4 + v]], atol=1e-5, rtol=1e-5)

    # and back: llava-hf keeps its image token inside the vocabulary
    ours = tiny_model("llava", image_token_id=3)
    export_llava_hf(ours, tmp_path / "exported")
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
    expanded = torch.tensor([[5, 6] + [3] * v + [7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=expanded, pixel_values=images(1)).logits,
            hf_llava_with_weights_of(ours, image_token_index=3)(input_ids=expanded, pixel_values=images(1)).logits,
        )


def test_saisa_from_a_llava_checkpoint_keeps_llm_and_vision(tmp_path):
    source = tiny_model("llava")
    write_authors_layout(source, tmp_path / "llava15")
    started = _load(tmp_path / "llava15", architecture="saisa")
    assert started.config.architecture == "saisa"
    for key, value in source.state_dict().items():
        if key.startswith(("model.language_model.", "model.vision_tower.", "lm_head.")):
            assert torch.equal(started.state_dict()[key], value), key


def test_convert_cli_writes_a_folder_with_the_training_template(tmp_path):
    from saisa.cli import main

    write_authors_layout(tiny_model("saisa"), tmp_path / "release")
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "ours")]) == 0
    processor = SaisaProcessor.from_pretrained(tmp_path / "ours")
    assert processor.template == "vicuna_v1"
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True,
    )
    assert prompt.endswith("USER: <image>\nWhat? ASSISTANT:") and prompt.startswith("<s>A chat between")
    model = _load(tmp_path / "ours")
    assert model.config.image_token_id == processor.image_token_id


def test_from_pretrained_refuses_foreign_folders_naming_the_loader(tmp_path):
    """transformers' `from_pretrained` would build a model of the default config with none of the weights in place;
    it names the loader that converts them instead."""
    write_authors_layout(tiny_model("saisa"), tmp_path / "release")
    hf_llava_with_weights_of(tiny_model("llava"), image_token_index=3).save_pretrained(tmp_path / "hf")
    for folder, model_type in ((tmp_path / "release", "llava_llama"), (tmp_path / "hf", "llava")):
        with pytest.raises(ValueError, match=f"'{model_type}' config is not a saisa folder: saisa.load_pretrained"):
            SaisaForConditionalGeneration.from_pretrained(folder)
        with pytest.raises(ValueError, match="saisa convert SRC DST"):
            SaisaConfig.from_pretrained(folder)
    tiny_model("saisa").save_pretrained(tmp_path / "ours")
    assert SaisaForConditionalGeneration.from_pretrained(tmp_path / "ours").config.architecture == "saisa"


def test_unknown_layouts_are_refused_with_what_is_missing(tmp_path):
    with pytest.raises(UnknownCheckpointError, match="no config.json"):
        detect_layout(tmp_path)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnknownCheckpointError, match="unknown layout.*'gpt2'"):
        _load(tmp_path / "gpt")
    write_authors_layout(tiny_model("saisa"), tmp_path / "broken")
    config = json.loads((tmp_path / "broken" / "config.json").read_text())
    config["mm_vision_tower"] = "someone/unknown-tower"
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownCheckpointError, match="vision tower 'someone/unknown-tower'"):
        _load(tmp_path / "broken")
    write_authors_layout(tiny_model("saisa"), tmp_path / "partial")
    state = torch.load(tmp_path / "partial" / "pytorch_model.bin")
    del state["model.layers.0.self_attn.q_proj.weight"]
    torch.save(state, tmp_path / "partial" / "pytorch_model.bin")
    with pytest.raises(UnknownCheckpointError, match="weights missing.*q_proj"):
        _load(tmp_path / "partial")


def test_llama3_checkpoints_get_the_llava_llama3_template(tmp_path):
    write_authors_layout(tiny_model("saisa"), tmp_path / "release")
    model = _load(tmp_path / "release")
    processor = processor_for_foreign(tmp_path / "release", model, template="llama3")
    prompt = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
