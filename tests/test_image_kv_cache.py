"""The image KV cache: reuse by content at any position, identical outputs, LRU bounded by the bytes it really holds,
never stale after a weight, dtype or device change, never in the way of gradients."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_TOKEN as I
from conftest import images, tiny_model
from torch import nn

from saisa import ImageKVCache  # the public name
from saisa.model.image_kv_cache import WeightsVersion


def test_cached_generation_equals_uncached_at_other_positions_and_prompts():
    model = tiny_model("saisa")
    px = images(2)
    prompts = [([5, I, 6], px[:1]), ([7, 8, 9, 10, I, 11], px[:1]), ([I, 12, I, 13], px[[1, 0]])]
    plain = [
        model.generate(torch.tensor([ids]), pixel_values=p, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for ids, p in prompts
    ]
    model.image_kv_cache = ImageKVCache()
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    cached = [
        model.generate(torch.tensor([ids]), pixel_values=p, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for ids, p in prompts
    ]
    hook.remove()
    for a, b in zip(plain, cached, strict=True):
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


# -- the cache cannot go wrong: weights version, dtype, gradients, true bytes ------------------------------------------


def _uncached_copy(model):
    """A deep copy of `model` without an image KV cache: what every cached result must equal."""
    cache, model.image_kv_cache = model.image_kv_cache, None
    try:
        return copy.deepcopy(model)
    finally:
        model.image_kv_cache = cache


def _count_encoder_calls(model) -> list[int]:
    calls = []
    model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


IDS = torch.tensor([[5, I, 6, 7, 8]])


def test_an_optimizer_step_makes_cached_kv_stale():
    model = tiny_model("saisa")
    model.image_kv_cache = ImageKVCache()
    with torch.no_grad():
        model(IDS, pixel_values=images(1))  # filled with the weights before the step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(IDS, pixel_values=images(1), labels=IDS).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = _uncached_copy(model)(IDS, pixel_values=images(1)).logits
        calls = _count_encoder_calls(model)
        got = model(IDS, pixel_values=images(1)).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert calls == [1] and model.image_kv_cache.invalidations == 1  # recomputed, not served stale


def test_load_state_dict_and_replaced_parameters_make_cached_kv_stale():
    model, other = tiny_model("saisa"), tiny_model("saisa", seed=1)
    model.image_kv_cache = ImageKVCache()
    with torch.no_grad():
        model(IDS, pixel_values=images(1))
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(
            model(IDS, pixel_values=images(1)).logits, other(IDS, pixel_values=images(1)).logits, atol=1e-6, rtol=1e-6
        )
        v_proj = model.language_model.layers[1].self_attn.v_proj
        v_proj.weight = nn.Parameter(torch.randn_like(v_proj.weight))
        got = model(IDS, pixel_values=images(1)).logits
        expected = _uncached_copy(model)(IDS, pixel_values=images(1)).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert model.image_kv_cache.invalidations == 2


def test_weights_version_follows_every_kind_of_weight_change():
    model = tiny_model("saisa")
    modules = [model.vision_tower, model.layer_projectors, model.language_model.layers[0].self_attn]
    version = lambda: WeightsVersion(modules)  # noqa: E731
    before = version()
    assert version() == before  # nothing changed: equal
    model.language_model.layers[0].mlp.up_proj.weight.data.add_(1)  # feeds no visual K/V
    assert version() == before
    k_proj = model.language_model.layers[0].self_attn.k_proj
    with torch.no_grad():
        k_proj.weight.mul_(1.0)  # an in-place write, even one that keeps the values
    assert version() != before
    changes = [
        lambda: model.layer_projectors[2].load_state_dict(model.layer_projectors[0].state_dict()),
        lambda: setattr(k_proj, "weight", nn.Parameter(k_proj.weight.detach().clone())),
        lambda: setattr(k_proj.weight, "data", k_proj.weight.detach().clone()),
        lambda: setattr(model.layer_projectors[0], "linear_1", nn.Linear(24, 32)),
        lambda: model.to(torch.float64),
        lambda: model.to("meta"),
    ]
    for change in changes:
        before = version()
        change()
        assert version() != before, change


def test_after_bfloat16_conversion_cached_equals_uncached():
    model = tiny_model("saisa", "qwen3")
    model.image_kv_cache = ImageKVCache()
    with torch.no_grad():
        model(IDS, pixel_values=images(1))  # float32 entries
        model.to(torch.bfloat16)
        expected = _uncached_copy(model)(IDS, pixel_values=images(1)).logits
        calls = _count_encoder_calls(model)
        got = model(IDS, pixel_values=images(1)).logits
        again = model(IDS, pixel_values=images(1).to(torch.bfloat16)).logits  # bfloat16 pixels hash too
        hit = model(IDS, pixel_values=images(1)).logits
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected) and torch.equal(hit, expected)
    torch.testing.assert_close(again, expected)
    assert calls == [1, 1]  # recomputed once in bfloat16, then a hit; the bfloat16 pixels are another image


def test_eval_mode_with_gradients_bypasses_the_cache():
    model = tiny_model("saisa")
    model.image_kv_cache = ImageKVCache()
    with torch.no_grad():
        model(IDS, pixel_values=images(1))  # a hit would be possible
    reference = _uncached_copy(model)
    for m in (model, reference):
        m(IDS, pixel_values=images(1), labels=IDS).loss.backward()
    for (name, got), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        if expected.grad is None:  # e.g. the vision layers after the feature layer
            assert got.grad is None, name
        else:
            torch.testing.assert_close(got.grad, expected.grad, atol=1e-6, rtol=1e-6, msg=name)
    assert all(p.grad is not None for p in model.layer_projectors.parameters())
    assert model.image_kv_cache.hits == 0

    # Frozen weights but pixels that need gradients (e.g. an adversarial attack): still bypassed.
    model.requires_grad_(False)
    reference.requires_grad_(False)
    pixels = [images(1).requires_grad_() for _ in range(2)]
    for m, p in zip((model, reference), pixels, strict=True):
        m(IDS, pixel_values=p).logits.sum().backward()
    torch.testing.assert_close(pixels[0].grad, pixels[1].grad, atol=1e-6, rtol=1e-6)
    assert model.image_kv_cache.hits == 0


def test_hits_when_nothing_changed_even_with_gradients_on_for_other_weights():
    model = tiny_model("saisa")
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)  # trains, but feeds no visual K/V
    model.image_kv_cache = ImageKVCache()
    calls = _count_encoder_calls(model)
    px = images(2)
    two = torch.tensor([[5, I, 6, I, 7]])
    model(two, pixel_values=px[[0, 0]])  # the same image twice: encoded once
    model(two, pixel_values=px[[1, 0]])  # image 1 new, image 0 a hit
    out = model(two, pixel_values=px[[0, 1]])
    out.logits.sum().backward()
    assert calls == [1, 1] and model.image_kv_cache.hits == 3
    assert model.lm_head.weight.grad is not None


def test_weights_made_in_inference_mode_bypass_the_cache():
    with torch.inference_mode():
        model = tiny_model("saisa")
        model.image_kv_cache = ImageKVCache()
        got = model(IDS, pixel_values=images(1)).logits
    assert len(model.image_kv_cache) == 0  # no version counter: a change could not be seen
    with torch.no_grad():
        expected = tiny_model("saisa")(IDS, pixel_values=images(1)).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def _held(cache: ImageKVCache) -> list[torch.Tensor]:
    return [t for layers, _ in cache._entries.values() for kv in layers for t in kv]


def test_byte_count_is_the_storage_it_holds():
    model = tiny_model("saisa")
    model.image_kv_cache = cache = ImageKVCache(max_bytes=40_000)  # ~6 images of the tiny model
    ids = torch.tensor([[5, I, 6, I, 7, I, 8, I, 9]])
    with torch.no_grad():
        for seed in range(10):
            model(ids, pixel_values=images(4, seed=seed))
    held = _held(cache)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    assert len(storages) == len(held)  # no two entries share a storage
    assert all(t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in held)
    assert sum(storages.values()) == cache.bytes <= cache.max_bytes and len(cache) >= 5


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set size from /proc")
def test_resident_memory_stays_within_the_budget():
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    budget, mib = 4 << 20, 1 << 20
    cache = ImageKVCache(max_bytes=budget)  # 16 entries of 256 KiB
    start = rss()
    for step in range(16):
        # As the model puts them: one image's K/V are slices of a batch's tensor (33 MiB: above glibc's largest mmap
        # threshold, so freeing it returns it to the OS and RSS shows only what is still referenced).
        batch = torch.full((264, 1, 128, 256), float(step))
        cache.put(str(step), [(batch[0], batch[1])])
        del batch
    grown = rss() - start
    assert cache.bytes == budget and sum(t.untyped_storage().nbytes() for t in _held(cache)) == budget
    # Views would keep all 16 batches alive: 528 MiB.
    assert grown < budget + 24 * mib, f"RSS grew {grown / mib:.0f} MiB for a {budget / mib:.0f} MiB budget"
