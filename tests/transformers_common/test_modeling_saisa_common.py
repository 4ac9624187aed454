"""transformers' ModelTesterMixin (from the installed version's own sources, `upstream.py`) and the ported
GenerationTesterMixin (`generation_common.py`), set up as transformers' tests/models/llava/test_modeling_llava.py, run
for SaisaModel and SaisaForConditionalGeneration in each architecture.

Differences from the Llava setup, by design: an image is ONE placeholder id in input_ids (not one per visual token),
and the placeholder's id lies outside the LLM's vocabulary, as the processor's added `<image>` token does.
"""

from __future__ import annotations

import unittest
from unittest import mock

import torch
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from saisa import SaisaConfig, SaisaForConditionalGeneration, SaisaModel

from .generation_common import GenerationTesterMixin
from .upstream import import_upstream

common = import_upstream("test_modeling_common")
ModelTesterMixin, floats_tensor, ids_tensor = common.ModelTesterMixin, common.floats_tensor, common.ids_tensor


class SaisaModelTester:
    def __init__(self, parent, architecture: str):
        self.parent = parent
        self.architecture = architecture
        self.text_config = {
            "model_type": "llama",
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 37,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        }
        self.vision_config = {
            "model_type": "clip_vision_model",
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": 32,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "initializer_range": 0.02,
        }
        # inside the vocabulary here (as Llava's test has it), so the tests that embed input_ids themselves can
        self.image_token_id = 3
        self.pad_token_id = 1
        self.num_hidden_layers = 2
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_attention_heads = 4
        self.is_training = True
        self.batch_size = 7  # what test_eager_matches_sdpa_inference runs (it pads rows with random text, no images)
        self.seq_length = 7  # input_ids columns; the image's placeholder is one of them
        self.num_image_tokens = (8 // 2) ** 2  # visual tokens per image (vision_feature_layer -1, CLS dropped)
        # Attention maps have one row per input column and one column per key: the visual block's keys come first
        self.key_length = self.seq_length + self.num_image_tokens

    def get_config(self) -> SaisaConfig:
        return SaisaConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            architecture=self.architecture,
            image_token_id=self.image_token_id,
            vision_feature_layer=-1,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, 3, 8, 8])
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4  # no id below 4
        # one image per sample, clear of the columns the padding tests mask (two at either end)
        input_ids[:, 3] = self.image_token_id
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=torch_device)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


class _SaisaCommonTests(ModelTesterMixin, GenerationTesterMixin):
    architecture: str
    all_model_classes = (SaisaModel, SaisaForConditionalGeneration)
    _is_composite = True
    additional_model_inputs = ["pixel_values"]  # as transformers' VLM tests: the images go with input_ids
    # CLIP's post_layernorm only makes the pooled output: reading a hidden layer (LLaVA-1.5, and transformers' Llava
    # alike) leaves it without gradient, by design
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = SaisaModelTester(self, self.architecture)
        # What transformers' Auto tables say of a native model (the tests pick inputs and labels from them); ours are
        # registered at run time, which those name tables do not list.
        for table, name in (
            (modeling_auto.MODEL_MAPPING_NAMES, "SaisaModel"),
            (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "SaisaForConditionalGeneration"),
        ):
            patcher = mock.patch.dict(table, {"saisa": name})
            patcher.start()
            self.addCleanup(patcher.stop)


# Skipped, each where its assumption cannot hold for these models by design:
SKIPS = {
    # random ids drawn over the whole vocabulary contain the image placeholder id with no pixels: one placeholder is
    # one image here (Llava's test keeps its image ids out of such draws by construction; ours cannot be avoided)
    "test_model_rope_scaling_from_config": "random ids include the image placeholder id without an image",
    # one rename set serves all three architectures; SAISA keeps per-layer projectors and LLaVA/NAAViT one projector,
    # so each architecture leaves one of the projector renames unused, which this test reports
    "test_reverse_loading_mapping": "the projector renames of the other architectures match no key of this one",
}


# LLaVA / NAAViT only: the LLM runs over [visual block, input columns], and hidden states and attention rows are
# reported per input_ids column (a placeholder's row is its image's last visual token's, as for the logits), so they are
# gathered from the LLM's own rows: not tensors the output is computed from (retain_grad sees no gradient), nor the
# layer outputs a hook captures. SAISA has no visual rows, and runs both tests.
EMBEDDING_SPACE_SKIPS = {
    "test_retain_grad_hidden_states_attentions": "hidden states/attentions are gathered per input column",
    "test_can_capture_specific_layers_hidden_states": "hidden states are gathered per input column",
}


def _skipped(cls):
    skips = SKIPS | (EMBEDDING_SPACE_SKIPS if cls.architecture != "saisa" else {})
    for name in dir(cls):
        for prefix, reason in skips.items():
            if name.startswith(prefix):
                setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
    return cls


@_skipped
class SaisaCommonTest(_SaisaCommonTests, unittest.TestCase):
    architecture = "saisa"


@_skipped
class LlavaCommonTest(_SaisaCommonTests, unittest.TestCase):
    architecture = "llava"


@_skipped
class NaavitCommonTest(_SaisaCommonTests, unittest.TestCase):
    architecture = "naavit"
