"""The same seed starts the same run whether the embedded LLM's cache was empty or warm (issue 19): filling the cache
(dequantising SmolLM2's GGUF) builds throw-away models, which must not consume the torch RNG the run then draws its
projectors from. SmolLM2's GGUF is replaced here by a tiny random Llama, which consumes the RNG the same way."""

from __future__ import annotations

import torch
from conftest import IMAGE_TOKEN, text_config, tiny_processor, vision_config
from transformers import AutoTokenizer, LlamaForCausalLM

import saisa.embedded as embedded
from saisa import SaisaConfig, SaisaForConditionalGeneration


class _FakeGGUF:
    """Stands in for AutoModelForCausalLM / AutoTokenizer reading the GGUF file (a random tiny Llama and the tests'
    tokenizer); plain folders are read by the real AutoTokenizer."""

    @staticmethod
    def from_pretrained(folder, gguf_file=None, **kwargs):
        assert gguf_file == embedded.SMOLLM2_GGUF
        return LlamaForCausalLM(text_config())


class _Tokenizer:
    @staticmethod
    def from_pretrained(folder, gguf_file=None, **kwargs):
        if gguf_file is not None:
            return tiny_processor().tokenizer
        return AutoTokenizer.from_pretrained(folder, **kwargs)


def _step_one_loss(monkeypatch, cache) -> float:
    monkeypatch.setenv("SAISA_CACHE", str(cache))
    torch.manual_seed(0)  # what `saisa train` does (set_seed) before building the model
    language_model, _ = embedded.load_smollm2()
    config = SaisaConfig(
        text_config=language_model.config,
        vision_config=vision_config(),
        architecture="saisa",
        image_token_id=IMAGE_TOKEN,
    )
    model = SaisaForConditionalGeneration(config, language_model=language_model)  # new projectors and vision tower
    ids = torch.tensor([[5, IMAGE_TOKEN, 6, 7, 8, 9]])
    pixels = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    return model(input_ids=ids, pixel_values=pixels, labels=ids.masked_fill(ids == IMAGE_TOKEN, -100)).loss.item()


def test_step_one_loss_is_the_same_with_an_empty_and_a_warm_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "_smollm2_folder", lambda: tmp_path / "wheel")
    monkeypatch.setattr(embedded, "AutoModelForCausalLM", _FakeGGUF)
    monkeypatch.setattr(embedded, "AutoTokenizer", _Tokenizer)
    cold = _step_one_loss(monkeypatch, tmp_path / "cache")  # empty cache: dequantises first
    assert (tmp_path / "cache" / "smollm2-135m-instruct" / "model.safetensors").exists()
    warm = _step_one_loss(monkeypatch, tmp_path / "cache")
    assert cold == warm
