"""The one place a model meets its processor: every route to a (model, processor) that does not read a folder of ours
(conversions of foreign folders, a recipe's LLM + vision encoder, the embedded default) ends here."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from saisa.model import SaisaForConditionalGeneration
from saisa.processing.processor import SaisaProcessor, checkpoint_image_processor


def with_processor(model, tokenizer, *, images_from: str | Path | None = None, template: str | None = None):
    """(model, its `SaisaProcessor`). Images are prepared as the folder `images_from` says (its own image processor)
    where it has one, else as the model's vision encoder expects; the model's `image_token_id` becomes the id the
    processor gives `<image>` (which it adds to the tokenizer where the vocabulary lacks it)."""
    image_processor = model.vision_tower.preprocessing
    if images_from is not None:
        image_processor = checkpoint_image_processor(images_from, image_processor)
    processor = SaisaProcessor(tokenizer, image_processor, template=template)
    model.config.image_token_id = processor.image_token_id
    return model, processor


def from_parts(
    language_model: PreTrainedModel,
    tokenizer,
    vision_model: nn.Module,
    *,
    images_from: str | Path | None = None,
    template: str | None = None,
    **config_kwargs,
):
    """(model, processor) around an already-loaded LLM and vision encoder (their weights kept, projectors new);
    `config_kwargs` go to `SaisaConfig` (architecture, vision_config, vision_feature_layer, ...)."""
    model = SaisaForConditionalGeneration.from_modules(language_model, vision_model, **config_kwargs)
    return with_processor(model, tokenizer, images_from=images_from, template=template)
