"""The vision feature cache: a hit equals the encoder's own output, training through it equals training without it,
and a changed encoder, changed weights or changed preprocessing never reuse an entry."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_TOKEN as I
from conftest import images, tiny_model
from test_training import _write_run

from saisa.model.feature_cache import VisionFeatureCache
from saisa.training import run_training


def _count_encoder_calls(model) -> list[int]:
    calls: list[int] = []
    model.vision_tower.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def test_a_hit_returns_the_encoders_features_and_skips_it(tmp_path):
    model = tiny_model("saisa")
    model.vision_tower.requires_grad_(False)
    px = images(3)
    with torch.no_grad():
        expected = model.vision_tower(px)
    model.vision_feature_cache = VisionFeatureCache(tmp_path)
    calls = _count_encoder_calls(model)
    first = model.encode_images(px[:2])
    again = model.encode_images(px[[2, 1, 0]])  # one new image, two seen
    assert calls == [2, 1]
    assert torch.equal(first, expected[:2])
    assert torch.equal(again[1:], first[[1, 0]])  # read back bit for bit
    # image 2 was encoded alone: the same features up to batch-size-dependent kernel rounding
    torch.testing.assert_close(again[0], expected[2], atol=1e-5, rtol=1e-5)
    # a new process (another stage, architecture or seed) reads the same files
    other = VisionFeatureCache(tmp_path)
    assert torch.equal(other.encode(model.vision_tower, px), torch.cat([first, again[:1]])) and other.hits == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_changed_weights_or_preprocessing_miss(tmp_path):
    model = tiny_model("saisa")
    model.vision_tower.requires_grad_(False)
    cache = model.vision_feature_cache = VisionFeatureCache(tmp_path)
    px = images(1)
    model.encode_images(px)
    with torch.no_grad():
        next(model.vision_tower.parameters()).add_(0.5)  # an updated encoder
        expected = model.vision_tower(px)
    assert torch.equal(model.encode_images(px), expected) and cache.misses == 2
    other_encoder = tiny_model("saisa", seed=3).vision_tower.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(cache.encode(other_encoder, px), other_encoder(px)) and cache.misses == 3
    shifted = px * 0.9  # other normalisation statistics: other pixels
    with torch.no_grad():
        assert torch.equal(model.encode_images(shifted), model.vision_tower(shifted)) and cache.misses == 4


def test_a_trainable_encoder_is_never_served_from_the_cache(tmp_path):
    model = tiny_model("saisa").train()
    model.vision_feature_cache = VisionFeatureCache(tmp_path)
    ids = torch.tensor([[5, I, 6, 7]])
    model(ids, pixel_values=images(1), labels=ids).loss.backward()
    model(ids, pixel_values=images(1), labels=ids).loss.backward()
    assert model.vision_feature_cache.hits == 0 and not list(tmp_path.rglob("*.safetensors"))
    assert next(model.vision_tower.parameters()).grad is not None


@pytest.mark.parametrize("arch", ["saisa", "llava"])
def test_training_with_the_cache_equals_training_without(tmp_path, arch):
    reports = {}
    for cached in (False, True, True):  # the second cached run reads every feature back
        (tmp_path / "data").mkdir(exist_ok=True)
        recipe = _write_run(tmp_path / "data", arch)  # the same data and initial weights each time
        recipe["output_dir"] = str(tmp_path / f"out-{cached}-{len(reports)}")
        recipe["training"]["max_steps"] = 3
        if cached:
            recipe["model"]["feature_cache"] = str(tmp_path / "features")
        out = run_training(recipe)
        reports[len(reports)] = json.loads((out / "training_report.json").read_text())
    plain, filled, reread = reports[0], reports[1], reports[2]
    assert plain["losses"] == filled["losses"] == reread["losses"]
    assert filled["feature_cache"]["misses"] > 0
    assert reread["feature_cache"]["misses"] == 0 and reread["feature_cache"]["hits"] > 0


def test_feature_cache_is_refused_with_sharded_engines(tmp_path):
    recipe = _write_run(tmp_path, "saisa")
    recipe["model"]["feature_cache"] = str(tmp_path / "features")
    recipe["training"]["fsdp"] = "full_shard"
    with pytest.raises(ValueError, match="feature_cache cannot be used with FSDP or ZeRO-3"):
        run_training(recipe)
