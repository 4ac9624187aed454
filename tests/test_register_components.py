"""Adding a backbone family and a vision encoder is one file each: this module is that file for both. It registers
Phi (LayerNorm, partial rotary embedding, `dense`/`fc1`/`fc2` linears: not the Llama recipe's names) and ViT (with its
own image processor) through the public registration API only, and checks a SAISA / LLaVA model built from them against
references written here from transformers' own Phi and ViT: forward, generate, save/load, the processor, LoRA targets
and what device_map must not split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXT_SIZES, VOCAB, images, tiny_chat_processor
from transformers import (
    AutoProcessor,
    DynamicCache,
    PhiConfig,
    PhiForCausalLM,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

from saisa import SaisaConfig, SaisaForConditionalGeneration
from saisa.compat import CACHE_KWARG
from saisa.components.backbones import DECODER_FAMILIES, DecoderFamily, register_decoder_family
from saisa.components.encoders import (
    IMAGE_PROCESSORS,
    VISION_ENCODERS,
    ImagePreprocessing,
    VisionEncoder,
    register_image_processor,
    register_vision_encoder,
)
from saisa.processing import SaisaProcessor
from saisa.training.stages import LoraSettings, configure_stage

I = VOCAB  # noqa: E741  the image placeholder id, as in the other tests


# -- the new backbone family -------------------------------------------------------------------------------------------
def phi_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Phi rotates the first cos.shape[-1] features of each head and passes the rest (its attention splits them)."""
    d = cos.shape[-1]
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :d], k[..., :d], cos, sin)
    return torch.cat([q_rot, q[..., d:]], -1), torch.cat([k_rot, k[..., d:]], -1)


register_decoder_family(
    DecoderFamily("phi", phi_rotary, lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")), "phi"
)


# -- the new vision encoder --------------------------------------------------------------------------------------------
@register_image_processor("ViTImageProcessor")
def vit_image_processor(preprocessing: ImagePreprocessing) -> ViTImageProcessorPil:
    return ViTImageProcessorPil(**preprocessing.square_settings())


@register_vision_encoder("vit")
class ViTEncoder(VisionEncoder):
    _no_split_modules = ["ViTEmbeddings", "ViTLayer"]

    def __init__(self, config: ViTConfig, *, feature_layer: int, select_strategy: str, module=None):
        super().__init__(config)
        self.model = module if module is not None else ViTModel(config, add_pooling_layer=False)
        self.feature_layer = feature_layer
        self.drop_cls = select_strategy == "default"
        self.num_tokens = self.token_count(config, select_strategy)
        self.hidden_size = config.hidden_size
        self.preprocessing = ImagePreprocessing(config.image_size, (0.5,) * 3, (0.5,) * 3, "ViTImageProcessor")

    @classmethod
    def token_count(cls, config: ViTConfig, select_strategy: str) -> int:
        return (config.image_size // config.patch_size) ** 2 + (0 if select_strategy == "default" else 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, v, d_vis)
        hidden = self.model(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        return hidden[:, 1:] if self.drop_cls else hidden


@pytest.fixture(autouse=True, scope="module")
def _unregister_after_this_module():
    """The rest of the session sees only saisa's own components."""
    yield
    DECODER_FAMILIES.pop("phi")
    VISION_ENCODERS.pop("vit")
    IMAGE_PROCESSORS.pop("ViTImageProcessor")


def phi_vit_model(architecture: str = "saisa") -> SaisaForConditionalGeneration:
    torch.manual_seed(0)
    text = PhiConfig(
        **TEXT_SIZES,
        initializer_range=0.3,  # weights large enough that the image's keys and values move the logits
    )
    vision = ViTConfig(
        hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=4
    )
    config = SaisaConfig(text_config=text, vision_config=vision, architecture=architecture, image_token_id=I)
    model = SaisaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random-init biases are zero and norms one: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


# -- references from transformers' own Phi and ViT ---------------------------------------------------------------------
def phi_with_weights_of(model: SaisaForConditionalGeneration) -> PhiForCausalLM:
    phi = PhiForCausalLM(model.config.text_config).eval()
    phi.model.load_state_dict(model.language_model.state_dict())
    phi.lm_head.load_state_dict(model.lm_head.state_dict())
    return phi


def vit_patch_features(model: SaisaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """LLaVA-1.5's reading of a ViT: the penultimate layer's hidden states, CLS dropped. (N, v, d_vis)"""
    return model.vision_tower.model(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]


def mlp(projector, x: torch.Tensor) -> torch.Tensor:
    hidden = F.gelu(F.linear(x, projector.linear_1.weight, projector.linear_1.bias))
    return F.linear(hidden, projector.linear_2.weight, projector.linear_2.bias)


def partial_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, d: int) -> torch.Tensor:
    """x (B, heads, n, head_dim): the first d features of each head rotated at positions (n,), the rest kept."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    angles = positions[:, None].float() * inv_freq[None]  # (n, d/2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    head, rest = x[..., :d], x[..., d:]
    rotated = torch.cat([-head[..., d // 2 :], head[..., : d // 2]], -1)
    return torch.cat([head * cos + rotated * sin, rest], -1)


def saisa_reference_logits(model: SaisaForConditionalGeneration, text_ids: torch.Tensor, pixel_values: torch.Tensor):
    """SAISA.md §3 for one image before the text `text_ids` (T,): each Phi layer's KV cache starts with the image's v
    keys (rotated at positions 0..v-1) and values, made by hand from that layer's projector, LayerNorm, k_proj and
    v_proj; transformers' Phi then runs the text at positions v..v+T-1. Returns (T, vocab)."""
    tc = model.config.text_config
    phi = phi_with_weights_of(model)
    features = vit_patch_features(model, pixel_values)  # (1, v, d_vis)
    v = features.shape[1]
    head_dim = tc.hidden_size // tc.num_attention_heads
    rotary = int(head_dim * tc.rope_parameters["partial_rotary_factor"])
    cache = DynamicCache(config=tc)
    for index, layer in enumerate(phi.model.layers):
        norm, attn = layer.input_layernorm, layer.self_attn
        projected = mlp(model.layer_projectors[index], features)  # (1, v, h): the layer's input space
        x = F.layer_norm(projected, (tc.hidden_size,), norm.weight, norm.bias, norm.eps)
        keys = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(1, v, -1, head_dim).transpose(1, 2)
        values = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(1, v, -1, head_dim).transpose(1, 2)
        cache.update(partial_rope(keys, torch.arange(v), tc.rope_parameters["rope_theta"], rotary), values, index)
    positions = torch.arange(v, v + len(text_ids))[None]
    return phi(input_ids=text_ids[None], position_ids=positions, **{CACHE_KWARG: cache}).logits[0]


# -- the tests ---------------------------------------------------------------------------------------------------------
def test_saisa_with_a_new_family_and_encoder_matches_the_reference():
    model = phi_vit_model("saisa")
    assert len(model.layer_projectors) == 3 and model.tokens_per_image == 16
    text, px = torch.tensor([5, 6, 7, 8]), images(1)
    with torch.no_grad():
        got = model(torch.cat([torch.tensor([I]), text])[None], pixel_values=px).logits[0, 1:]
        expected = saisa_reference_logits(model, text, px)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the image moves the logits: a reference that misplaced its keys would fail
        assert (expected - saisa_reference_logits(model, text, images(1, seed=5))).abs().max() > 0.1


def test_llava_with_a_new_family_and_encoder_matches_transformers():
    """LLaVA-1.5 over Phi + ViT: the projected patch features spliced into Phi's input embeddings."""
    model = phi_vit_model("llava")
    phi = phi_with_weights_of(model)
    before, after, px = torch.tensor([5, 6]), torch.tensor([7, 8, 9]), images(1)
    with torch.no_grad():
        embed = phi.get_input_embeddings()
        visual = mlp(model.projector, vit_patch_features(model, px))[0]  # (v, h)
        spliced = torch.cat([embed(before), visual, embed(after)])[None]
        theirs = phi(inputs_embeds=spliced).logits[0]
        ours = model(torch.cat([before, torch.tensor([I]), after])[None], pixel_values=px).logits[0]
    v = model.tokens_per_image
    torch.testing.assert_close(ours[[0, 1, 3, 4, 5]], theirs[[0, 1, 2 + v, 3 + v, 4 + v]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[2], theirs[1 + v], atol=1e-5, rtol=1e-5)  # the image's last visual token


def test_generate_equals_a_greedy_loop_over_the_reference():
    model = phi_vit_model("saisa")
    text, px = torch.tensor([5, 6, 7]), images(1)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.cat([torch.tensor([I]), text])[None], pixel_values=px, max_new_tokens=6, do_sample=False
        )
        for _ in range(6):
            text = torch.cat([text, saisa_reference_logits(model, text, px)[-1].argmax()[None]])
    assert out[0, 1:].tolist() == text.tolist()


@pytest.mark.parametrize("architecture", ["saisa", "llava"])
def test_save_and_load_with_the_new_parts(architecture, tmp_path):
    model = phi_vit_model(architecture)
    processor = SaisaProcessor(tiny_chat_processor().tokenizer, model.vision_tower.preprocessing)
    assert isinstance(processor.image_processor, ViTImageProcessorPil)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    loaded = SaisaForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.model.vision_tower, ViTEncoder)
    assert loaded_processor.preprocessing == processor.preprocessing == model.vision_tower.preprocessing
    ids = torch.tensor([[I, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=images(1)).logits, loaded(ids, pixel_values=images(1)).logits)


def test_lora_targets_are_the_familys_linears_inside_the_llm():
    model = phi_vit_model("saisa")
    llm_linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".language_model.layers." in name
    }
    assert {name.rsplit(".", 1)[-1] for name in llm_linears} == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    peft_model = configure_stage(model, "instruct", lora=LoraSettings(r=2))
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and not name.endswith("lora_A")
    }
    assert adapted == llm_linears  # every linear of Phi's layers, none of ViT's (it has `dense` ones too)
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name or "projectors" in name for name in trainable)


def test_device_map_keeps_the_new_parts_whole():
    model = phi_vit_model("saisa")
    assert {"PhiDecoderLayer", "ViTEmbeddings", "ViTLayer"} <= set(model._no_split_modules)
