"""`SaisaConfig`: one config for SAISA and its two baselines (LLaVA-1.5 and NAAViT)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

from saisa.model.architectures import Architecture, architecture_named
from saisa.model.pruning import VisualPruning


class SaisaConfig(PreTrainedConfig):
    r"""
    Args:
        text_config: config of the decoder LLM (any registered family, see `saisa.components.backbones`).
        vision_config: config of the vision encoder (any registered encoder, see `saisa.components.encoders`).
        architecture: `"saisa"` (per-layer visual K/V, visual tokens issue no queries), `"llava"` (LLaVA-1.5 embedding-
            space alignment) or `"naavit"` (LLaVA with No Attention Among Visual Tokens).
        image_token_id: id that marks one image in `input_ids` (one id per image, not one per visual token).
        shared_projector: `saisa` only; one projector shared by all layers instead of one per layer.
        projector_hidden_act: activation between the two projector linears (LLaVA-1.5: GELU).
        projector_bias: whether the projector linears have biases.
        vision_feature_layer: hidden-state index of the vision encoder to read (LLaVA-1.5: -2, the penultimate).
        vision_feature_select_strategy: `"default"` drops the CLS token, `"full"` keeps every token.
        visual_pruning: None (off), or `{"keep_ratio": r, "method": "fastv" | "per_layer", "score_layer": K}`: in
            inference each image keeps a fraction r of its visual K/V (`saisa.model.pruning.VisualPruning`).
    """

    model_type = "saisa"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        text_config: PreTrainedConfig | dict | None = None,
        vision_config: PreTrainedConfig | dict | None = None,
        architecture: str = "saisa",
        image_token_id: int = -200,
        shared_projector: bool = False,
        projector_hidden_act: str = "gelu",
        projector_bias: bool = True,
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: str = "default",
        visual_pruning: VisualPruning | dict | None = None,
        **kwargs,
    ):
        architecture_named(architecture)  # raises for an unknown name
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' (drop CLS) or 'full'")
        self.text_config = _as_config(text_config, default_type="llama")
        self.vision_config = _as_config(vision_config, default_type="clip_vision_model")
        self.architecture = architecture
        self.image_token_id = image_token_id
        self.shared_projector = shared_projector
        self.projector_hidden_act = projector_hidden_act
        self.projector_bias = projector_bias
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.set_visual_pruning(visual_pruning)
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def arch(self) -> Architecture:
        """What `architecture` does differently (`saisa.model.architectures`)."""
        return architecture_named(self.architecture)

    @property
    def pruning(self) -> VisualPruning | None:
        """`visual_pruning` read and checked against this model (None: off): it may have been assigned directly."""
        return self._checked_pruning(self.visual_pruning)

    def set_visual_pruning(self, value: VisualPruning | dict | None) -> None:
        """Turn pruning on (`value`) or off (None), checked against this model first; config.json holds a dict."""
        pruning = self._checked_pruning(value)
        self.visual_pruning = pruning.to_dict() if pruning is not None else None

    def _checked_pruning(self, value: VisualPruning | dict | None) -> VisualPruning | None:
        pruning = VisualPruning.from_config(value)
        if pruning is not None:
            pruning.check(num_layers=self.text_config.num_hidden_layers, arch=self.arch)
        return pruning

    @property
    def per_layer_projectors(self) -> bool:
        """Whether the model holds one projector per decoder layer (`layer_projectors`), not one (`projector`)."""
        return self.arch.per_layer_projectors and not self.shared_projector

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        return self.text_config

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Also an `auto_map` and a model card, so that the folder says how to open it (`saisa.portable`)."""
        from saisa import portable

        self.auto_map = portable.auto_map(type(self))
        super().save_pretrained(save_directory, *args, **kwargs)
        portable.write_auto_module(save_directory)
        portable.write_model_card(save_directory, self)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> SaisaConfig:
        # `from_pretrained` reads any folder's config.json into this class, only warning on another model_type: a LLaVA
        # or SAISA-release folder would become a model with none of its weights in place.
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"a {model_type!r} config is not a saisa folder: saisa.load_pretrained(folder) converts LLaVA-1.5, "
                "llava-hf and SAISA-release folders on load, `saisa convert SRC DST` writes the converted folder once"
            )
        return super().from_dict(config_dict, **kwargs)


def _as_config(config: PreTrainedConfig | dict | None, *, default_type: str) -> PreTrainedConfig:
    if config is None:
        return AutoConfig.for_model(default_type)
    if isinstance(config, dict):
        config = dict(config)
        return AutoConfig.for_model(config.pop("model_type", default_type), **config)
    return config
