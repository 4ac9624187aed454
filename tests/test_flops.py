"""Analytic FLOPs: the paper's figures, and the real forward counted by torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN, images, tiny_model, vision_config
from torch.utils.flop_counter import FlopCounterMode

from saisa import SaisaConfig
from saisa.bench.flops import (
    PRESETS,
    dims_from_config,
    prefill_flops,
    recipe_training_ratio,
    training_flops,
    vision_dims,
)
from saisa.components.encoders import build_vision_encoder
from saisa.components.encoders.efficientnet import EfficientNetLiteConfig


def test_vicuna7b_reproduces_the_papers_reduction():
    dims = PRESETS["vicuna-7b"]
    llava, saisa = (prefill_flops(dims, a, 64)["total"] for a in ("llava", "saisa"))
    assert llava / 1e12 == pytest.approx(8.53, abs=0.01) and saisa / 1e12 == pytest.approx(2.86, abs=0.01)
    assert 1 - saisa / llava == pytest.approx(0.665, abs=0.01)
    for t, expected in [(128, 0.605), (512, 0.394)]:
        r = 1 - prefill_flops(dims, "saisa", t)["total"] / prefill_flops(dims, "llava", t)["total"]
        assert r == pytest.approx(expected, abs=0.005)


def test_training_accounting_orders():
    dims = PRESETS["vicuna-7b"]
    for arch in ("llava", "saisa"):
        align, instruct = (training_flops(dims, arch, 128, stage=s) for s in ("align", "instruct"))
        assert align["backward"] < instruct["backward"] and align["forward"] == instruct["forward"]
    assert 0.3 < recipe_training_ratio(dims)["ratio"] < 1.0


def _counted(model, ids, px) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, pixel_values=px, use_cache=False)
    with FlopCounterMode(display=False) as vision, torch.no_grad():
        model.vision_tower(px)
    return counter.get_total_flops() - vision.get_total_flops()


@pytest.mark.parametrize("arch", ["llava", "naavit", "saisa"])
def test_counted_forward_matches_analytic(arch):
    """sdpa is not counted on CPU: counted linear work + analytic attention must equal the analytic total."""
    model = tiny_model(arch, "qwen2")
    text = 40
    ids = torch.tensor([[IMAGE_TOKEN] + list(range(3, 3 + text))])
    dims = dims_from_config(model.config)
    analytic = prefill_flops(dims, arch, text + 1, lm_head=True)  # the placeholder is one more token in the stream
    counted = _counted(model, ids, images(1)) + analytic["attention"]
    assert counted == pytest.approx(analytic["total"], rel=0.02)


@pytest.mark.parametrize("arch", ["llava", "saisa"])
def test_counted_eager_attention_matches_analytic(arch):
    """With eager attention the score and value matmuls are counted too: the whole analytic figure is checked."""
    model = tiny_model(arch, "llama")
    model.language_model.set_attn_implementation("eager")
    text = 40
    ids = torch.tensor([[IMAGE_TOKEN] + list(range(3, 3 + text))])
    analytic = prefill_flops(dims_from_config(model.config), arch, text + 1, lm_head=True)
    assert _counted(model, ids, images(1)) == pytest.approx(analytic["total"], rel=0.02)


@pytest.mark.parametrize(
    ("vision", "strategy"),
    [
        (vision_config("clip"), "default"),
        (vision_config("clip"), "full"),
        (vision_config("siglip"), "default"),
        (EfficientNetLiteConfig(image_size=100), "default"),
    ],
)
def test_vision_dims_read_from_the_config_match_the_built_encoder(vision, strategy):
    """v and d_vis read from the config are what the encoder, built, reports and outputs."""
    config = SaisaConfig(vision_config=vision, vision_feature_select_strategy=strategy)
    try:
        encoder = build_vision_encoder(vision, feature_layer=config.vision_feature_layer, select_strategy=strategy)
    except ImportError:
        pytest.skip("efficientnet-lite-pytorch is not installed")
    side = vision.image_size
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, side, side))  # (1, v, d_vis)
    assert vision_dims(config) == (encoder.num_tokens, encoder.hidden_size) == tuple(features.shape[1:])
