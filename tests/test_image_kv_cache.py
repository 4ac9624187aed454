"""The image KV cache: reuse by content at any position, identical outputs, LRU bounded by bytes."""

from __future__ import annotations

import torch
from conftest import IMAGE_TOKEN as I
from conftest import images, tiny_model

from saisa.modeling.image_kv_cache import ImageKVCache


def test_cached_generation_equals_uncached_at_other_positions_and_prompts():
    model = tiny_model("saisa")
    px = images(2)
    prompts = [([5, I, 6], px[:1]), ([7, 8, 9, 10, I, 11], px[:1]), ([I, 12, I, 13], px[[1, 0]])]
    plain = [model.generate(torch.tensor([ids]), pixel_values=p, max_new_tokens=6, do_sample=False, pad_token_id=0)
             for ids, p in prompts]
    model.image_kv_cache = ImageKVCache()
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    cached = [model.generate(torch.tensor([ids]), pixel_values=p, max_new_tokens=6, do_sample=False, pad_token_id=0)
              for ids, p in prompts]
    hook.remove()
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)
    assert calls == [1, 1]  # image 0 encoded once, image 1 once; every other use was a hit
    assert model.image_kv_cache.hits == 2


def test_cached_logits_match_at_a_shifted_position():
    model = tiny_model("saisa", "qwen3")
    ids = torch.tensor([[5, 6, 7, I, 8, 9]])
    with torch.no_grad():
        expected = model(ids, pixel_values=images(1)).logits
        model.image_kv_cache = ImageKVCache()
        model(torch.tensor([[I, 9]]), pixel_values=images(1))  # fill at position 0
        got = model(ids, pixel_values=images(1)).logits  # reuse at position 3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_lru_is_bounded_by_bytes():
    entry = [(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))]  # 2 * 64 floats = 512 bytes
    cache = ImageKVCache(max_bytes=1200)
    for key in "abc":
        cache.put(key, entry)
    assert len(cache) == 2 and cache.bytes <= 1200
    assert cache.get("a") is None and cache.get("c") is not None
    cache.put("d", entry)  # evicts b (c was just used)
    assert cache.get("b") is None and cache.get("c") is not None


def test_training_bypasses_the_cache():
    model = tiny_model("saisa").train()
    model.image_kv_cache = ImageKVCache()
    out = model(torch.tensor([[5, I, 6, 7]]), pixel_values=images(1), labels=torch.tensor([[5, -100, 6, 7]]))
    out.loss.backward()
    assert len(model.image_kv_cache) == 0 and model.layer_projectors[0].linear_1.weight.grad is not None
