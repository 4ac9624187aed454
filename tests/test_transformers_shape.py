"""The model behaves as the transformers ecosystem expects of a Llava-like model (issue 19): base model and head, Auto
classes, first-release folders, attention implementations, outputs, embeddings resizing, activation checkpointing,
offloading and candidate-based decoding. Each test reproduces a defect of the first release (c7ea9dc)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN, tiny_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionModel,
    LlamaForCausalLM,
    PreTrainedModel,
)

from saisa import SaisaForConditionalGeneration, SaisaModel

ARCHS = ["saisa", "llava", "naavit"]


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


IDS = torch.tensor([[3, 4, IMAGE_TOKEN, 5, 6, 7], [IMAGE_TOKEN, 8, IMAGE_TOKEN, 9, 10, 11]])  # 3 images


def test_base_model_and_head_as_transformers_llava(tmp_path):
    model = tiny_model("saisa")
    assert type(model).base_model_prefix == "model" and isinstance(model.model, SaisaModel)
    assert model.base_model is model.model and not hasattr(model.model, "lm_head")
    assert model.get_output_embeddings() is model.lm_head
    assert isinstance(model.vision_tower, PreTrainedModel)
    # the parts the rest of the code reaches stay where they were
    assert model.language_model is model.model.language_model and model.layer_projectors is model.model.layer_projectors
    model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is SaisaModel
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is SaisaForConditionalGeneration
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    base = SaisaModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hidden = base(IDS, pixel_values=pixels(3)).last_hidden_state  # (B, T, h): one row per input column
        assert torch.equal(model.lm_head(hidden)[:, -1], model(IDS, pixel_values=pixels(3)).logits[:, -1])


def _first_release_folder(model: SaisaForConditionalGeneration, folder) -> None:
    """A folder as c7ea9dc wrote it: its key names built from the modules it had (a causal LM at `language_model`,
    the vision module at `vision_tower.model`, projectors at the top), independently of the mapping under test."""
    folder.mkdir()
    lm = LlamaForCausalLM(model.config.text_config)
    lm.model.load_state_dict(model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    state = {f"language_model.{k}": v for k, v in lm.state_dict().items()}
    state |= {f"vision_tower.model.{k}": v for k, v in model.vision_tower.model.state_dict().items()}
    state |= {f"layer_projectors.{k}": v for k, v in model.layer_projectors.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)


def test_a_folder_of_the_first_release_loads_and_is_written_back_in_its_names(tmp_path):
    model = tiny_model("saisa", seed=3)
    _first_release_folder(model, tmp_path / "old")
    loaded = SaisaForConditionalGeneration.from_pretrained(tmp_path / "old").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS, pixel_values=pixels(3)).logits, model(IDS, pixel_values=pixels(3)).logits)
    loaded.save_pretrained(tmp_path / "again")
    # folders keep the first release's names (older saisa versions and the vLLM plugin read them)
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(
        load_file(tmp_path / "old" / "model.safetensors")
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_standard_attention_names_and_any_switch_keeps_the_model_correct(arch, tmp_path):
    model = tiny_model(arch)
    assert model.config._attn_implementation == "sdpa" and model.config.text_config._attn_implementation == "sdpa"
    labels = IDS.masked_fill(IDS == IMAGE_TOKEN, 0)
    with torch.no_grad():
        before = model(IDS, pixel_values=pixels(3), use_cache=False)
        loss_before = model(IDS, pixel_values=pixels(3), labels=labels).loss
    for name in ("eager", "sdpa"):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name == model.config.text_config._attn_implementation
        with torch.no_grad():  # the training path: no KV cache, each layer makes its visual K/V itself
            after = model(IDS, pixel_values=pixels(3), use_cache=False)
            loss = model(IDS, pixel_values=pixels(3), labels=labels).loss
        torch.testing.assert_close(after.logits, before.logits)
        torch.testing.assert_close(loss, loss_before)
    model.save_pretrained(tmp_path)
    eager = SaisaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager" == eager.language_model.config._attn_implementation
    with pytest.raises(ValueError, match="does not support Flash Attention"):
        model.set_attn_implementation("flash_attention_2")


def test_a_model_around_loaded_modules_runs_their_attention_as_chosen():
    llm = LlamaForCausalLM(tiny_model("llava").config.text_config).eval()
    model = SaisaForConditionalGeneration.from_modules(llm, CLIPVisionModel(tiny_model().config.vision_config))
    assert model.language_model.config._attn_implementation == "sdpa" == model.config._attn_implementation
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():  # text only: exactly the LLM it was built around (causal, not attending ahead)
        torch.testing.assert_close(model.eval()(ids).logits, llm(ids).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_and_attentions_are_returned(arch):
    model = tiny_model(arch)
    model.set_attn_implementation("eager")  # as in transformers, attention maps come from eager attention
    with torch.no_grad():
        out = model(IDS, pixel_values=pixels(3), output_hidden_states=True, output_attentions=True)
    layers, (batch, length) = model.config.text_config.num_hidden_layers, IDS.shape
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    assert all(h.shape == (batch, length, 32) for h in out.hidden_states)
    text = IDS != IMAGE_TOKEN
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1])[text], out.logits[text])
    visual = 2 * model.tokens_per_image  # the batch's visual block: 2 images in the second sample
    heads = model.config.text_config.num_attention_heads
    assert all(a.shape == (batch, heads, length, visual + length) for a in out.attentions)
    for a in out.attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(batch, heads, length))
        # text before sample 0's image gives its visual keys no weight; text after it does
        assert a[0, :, :2, :visual].abs().max() == 0 and a[0, :, 3:, : model.tokens_per_image].min() > 0
    assert model(IDS, pixel_values=pixels(3)).hidden_states is None


@pytest.mark.parametrize("arch", ARCHS)
def test_return_dict_false_gives_a_tuple(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        out = model(IDS, pixel_values=pixels(3), return_dict=False)
        assert isinstance(out, tuple) and torch.equal(out[0], model(IDS, pixel_values=pixels(3)).logits)


def test_image_outputs_and_image_features_as_llava():
    model = tiny_model("llava")
    with torch.no_grad():
        out = model(IDS, pixel_values=pixels(3))
        features = model.get_image_features(pixels(3))
    assert out.image_hidden_states.shape == (3, model.tokens_per_image, 32)
    assert torch.equal(out.image_outputs.last_hidden_state, model.vision_tower(pixels(3)))
    assert all(torch.equal(a, b) for a, b in zip(features.pooler_output, out.image_hidden_states, strict=True))
    saisa = tiny_model("saisa")
    with torch.no_grad():
        layer_2 = saisa.get_image_features(pixels(1), layer=2).pooler_output[0]  # into layer 2's input space
        assert torch.equal(layer_2, saisa.layer_projectors[2](saisa.vision_tower(pixels(1)))[0])
        assert saisa(IDS, pixel_values=pixels(3)).image_outputs.last_hidden_state.shape[0] == 3


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_resizes_input_and_output_together(tied):
    model = tiny_model("saisa", tie_word_embeddings=tied)
    if tied:
        model.config.text_config.tie_word_embeddings = True
        model.tie_weights()
    with torch.no_grad():
        before = model(IDS, pixel_values=pixels(3)).logits
    model.resize_token_embeddings(133)
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 133
    assert model.config.text_config.vocab_size == 133
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    with torch.no_grad():
        after = model(IDS, pixel_values=pixels(3)).logits
    torch.testing.assert_close(after[..., :120], before)


def _grads(model, use_reentrant: bool | None):
    model.train()
    if use_reentrant is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.zero_grad()
    labels = IDS.masked_fill(IDS == IMAGE_TOKEN, 0)
    model(IDS, pixel_values=pixels(3), labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_gradients(arch):
    model = tiny_model(arch)
    for module in model.modules():  # dropout off: the three runs must see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain = _grads(model, None)
    assert any("projector" in name for name in plain) and any("vision_tower" in name for name in plain)
    for use_reentrant in (True, False):
        grads = _grads(model, use_reentrant)
        assert grads.keys() == plain.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain[name], msg=f"{name} (use_reentrant={use_reentrant})")


def test_device_map_with_disk_offload_generates(tmp_path):
    model = tiny_model("saisa")
    model.save_pretrained(tmp_path / "model")
    offloaded = SaisaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": 60_000}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    ids = torch.tensor([[5, IMAGE_TOKEN, 7, 8]])
    kwargs = dict(pixel_values=pixels(1), max_new_tokens=4, do_sample=False)
    assert torch.equal(offloaded.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_prompt_lookup_never_proposes_the_image_placeholder():
    # the <image> id inside the vocabulary (SmolLM2's Vicuna setup) and the prompt's n-gram "5 6" followed by an image
    model = tiny_model("saisa", image_token_id=100)
    ids = torch.tensor([[5, 6, 100, 7, 8, 5, 6]])
    kwargs = dict(pixel_values=pixels(1), max_new_tokens=6, do_sample=False)
    looked_up = model.generate(ids, prompt_lookup_num_tokens=3, **kwargs)
    assert torch.equal(looked_up, model.generate(ids, **kwargs))


@pytest.mark.parametrize("arch", ["saisa", "llava"])
def test_generation_never_produces_the_image_placeholder(arch):
    # the <image> id inside the vocabulary, and a head that favours it: sampling and greedy decoding must not emit it
    model = tiny_model(arch, image_token_id=100)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[100] = 10 * head.abs().max()
    ids = torch.tensor([[5, 100, 7, 8]])
    for kwargs in (dict(do_sample=False), dict(do_sample=True, top_k=5), dict(prompt_lookup_num_tokens=2)):
        out = model.generate(ids, pixel_values=pixels(1), max_new_tokens=5, **kwargs)
        assert out.shape[1] == 9 and not (out[:, 4:] == 100).any()


def test_assisted_decoding_returns_hidden_states():
    model = tiny_model("saisa")
    ids = torch.tensor([[5, 6, IMAGE_TOKEN, 7, 8, 5, 6]])
    out = model.generate(
        ids,
        pixel_values=pixels(1),
        prompt_lookup_num_tokens=2,
        max_new_tokens=4,
        do_sample=False,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    steps = out.sequences.shape[1] - ids.shape[1]
    assert sum(step[0].shape[1] for step in out.hidden_states) == ids.shape[1] + steps - 1
    assert all(len(step) == model.config.text_config.num_hidden_layers + 1 for step in out.hidden_states)
