"""The real embedded assets from PyPI (SmolLM2-135M-Instruct, EfficientNet-Lite0)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def embedded():
    from saisa.embedded import build_embedded_default

    return build_embedded_default("saisa")


def test_embedded_default_is_real_and_answers_text_like_the_bare_llm(embedded):
    from saisa.cli.ask import answer

    model, processor = embedded
    assert model.config.text_config.num_hidden_layers == 30 and model.tokens_per_image == 49
    assert len(model.layer_projectors) == 30
    assert answer(model, processor, [], "What is the capital of France?", max_new_tokens=12).startswith(
        "The capital of France is Paris"
    )


def test_embedded_default_batches_real_photos(embedded):
    from PIL import Image
    from skimage import data

    model, processor = embedded
    photos = [Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut())]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in ("What is this?", "Describe the picture in detail, please.")
    ]
    batch = processor(text=prompts, return_tensors="pt", images=photos)
    with torch.no_grad():
        batched = model(**batch).logits
        for row in range(2):
            single = processor(text=prompts[row], return_tensors="pt", images=[photos[row]])
            logits = model(**single).logits[0]
            torch.testing.assert_close(batched[row, -logits.shape[0] :], logits, atol=2e-4, rtol=1e-4)
