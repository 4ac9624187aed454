"""SaisaCache: the layout travels with the cache through what `generate` does to caches — beam search (reorder,
expansion), assisted decoding (cropping rejected drafts) — and caches that cannot hold the visual keys are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN as I
from conftest import hf_llava_with_weights_of, images, tiny_model
from transformers import StaticCache

from saisa.compat import output_cache
from saisa.model.cache import SaisaCache

# Sample 0 holds two images, sample 1 one: expanding pixel_values per image instead of per sample would mix them up.
IDS = torch.tensor([[3, I, 6, I, 7, 8], [0, 0, 3, 6, I, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def _generate(model, ids, mask, pixels, **kwargs):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("arch", ["saisa", "llava", "naavit"])
def test_beam_search_on_a_batch_equals_each_sample_alone(arch):
    model, pixels = tiny_model(arch), images(3)
    batched = _generate(model, IDS, MASK, pixels, num_beams=3, num_return_sequences=2)
    alone = [
        _generate(model, IDS[:1], MASK[:1], pixels[:2], num_beams=3, num_return_sequences=2),
        _generate(model, IDS[1:, 2:], MASK[1:, 2:], pixels[2:], num_beams=3, num_return_sequences=2),
    ]
    torch.testing.assert_close(batched, torch.cat(alone))


def test_beam_search_equals_transformers_llava():
    """The baseline against transformers' own LlavaForConditionalGeneration, same weights, same beam search."""
    model = tiny_model("llava", image_token_id=3)
    hf = hf_llava_with_weights_of(model, image_token_index=3)
    ids = torch.tensor([[5, 6, 3, 7, 8, 9]])
    v = model.tokens_per_image
    expanded = torch.tensor([[5, 6] + [3] * v + [7, 8, 9]])
    ours = _generate(model, ids, torch.ones_like(ids), images(1), num_beams=4)
    theirs = _generate(hf, expanded, torch.ones_like(expanded), images(1), num_beams=4)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("draft", ["prompt_lookup", "assistant"])
def test_assisted_decoding_equals_greedy(draft):
    """Rejected draft tokens are cropped from the cache and its layout; greedy output must not change."""
    model, pixels = tiny_model("saisa"), images(2)
    ids, mask = IDS[:1], MASK[:1]
    greedy = _generate(model, ids, mask, pixels[:2], max_length=None)
    kwargs = (
        {"prompt_lookup_num_tokens": 3}
        if draft == "prompt_lookup"
        else {"assistant_model": tiny_model("saisa", seed=1)}
    )  # another model: most drafts are rejected
    torch.testing.assert_close(_generate(model, ids, mask, pixels[:2], **kwargs), greedy)


def test_crop_removes_generated_text_only():
    model = tiny_model("saisa")
    with torch.no_grad():
        cache = output_cache(model(input_ids=torch.tensor([[3, 6, 7]]), use_cache=True))
        # a second turn with an image: its visual keys enter the cache after the first turn's text
        model(input_ids=torch.tensor([[8, I, 9, 10]]), pixel_values=images(1), past_key_values=cache, use_cache=True)
    assert isinstance(cache, SaisaCache)
    entries, columns = cache.layers[0].get_seq_length(), cache.get_seq_length()
    assert (entries, columns) == (7 + model.tokens_per_image, 7)  # the visual keys are inside, not counted outside
    cache.crop(-2)
    assert (cache.layers[0].get_seq_length(), cache.get_seq_length()) == (entries - 2, columns - 2)
    assert cache.layout.next_position.tolist() == [3 + 1 + model.tokens_per_image]  # 3 + "8" + the image
    with pytest.raises(ValueError, match="never an image's visual keys"):
        cache.crop(-3)


def test_a_static_cache_is_refused_with_a_clear_error():
    model = tiny_model("saisa")
    static = StaticCache(config=model.config.text_config, max_cache_len=64)
    with pytest.raises(ValueError, match="static and quantized caches are not supported"):
        model(input_ids=IDS[:1], pixel_values=images(2), past_key_values=static, use_cache=True)


def test_a_failed_call_leaves_the_cache_as_it_was():
    """An error inside the decoder (after some layers wrote their visual and text keys) rolls the cache back, so the
    next call sees a cache in step with its layout and gives what an untouched cache gives."""
    model = tiny_model("saisa")
    turn1, turn2 = torch.tensor([[3, 6, 7]]), torch.tensor([[8, I, 9, 10]])
    with torch.no_grad():
        cache = output_cache(model(input_ids=turn1, use_cache=True))
        entries, layout = cache.entries(), cache.layout
        attention = model.language_model.layers[2].self_attn
        original = attention.forward
        attention.forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            model(input_ids=turn2, pixel_values=images(1), past_key_values=cache, use_cache=True)
        attention.forward = original
        assert cache.entries() == entries and cache.layout is layout
        after_failure = model(input_ids=turn2, pixel_values=images(1), past_key_values=cache, use_cache=True).logits
        fresh = output_cache(model(input_ids=turn1, use_cache=True))
        expected = model(input_ids=turn2, pixel_values=images(1), past_key_values=fresh, use_cache=True).logits
    torch.testing.assert_close(after_failure, expected)
