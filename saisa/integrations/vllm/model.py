"""`SaisaForVLLM`: our checkpoints (SAISA and the LLaVA-1.5 baseline) as a vLLM model, over vLLM's own Llama / Qwen2 /
Qwen3 / Mistral layers, our vision encoders (`saisa.components.encoders`) and projectors
(`saisa.components.connectors`).

SAISA.md §3 in vLLM's terms. vLLM's attention needs a query row for every scheduled token and writes K/V through a
per-token slot mapping, so the v visual tokens of each view (an image, a tile, a video frame) are scheduled tokens
(`processing.py` expands each `<image>` and `<video>`). At every layer l their rows enter attention as
n_l = input_layernorm_l(P_l(v_feats)) (`saisa.model.visual_kv.normed_layer_input`, as in the transformers model), so
the layer's own k/v projections (and k_norm, RoPE at their positions) give SAISA's visual K/V, which vLLM caches as
any other. Plain causal attention then is SAISA's mask: text before an image cannot see it, text after sees all of it.
Their queries are computed and dropped; `o_proj`, the FFN and the residual stream run on the text rows only.

LLaVA-1.5 (`architecture: llava`) is vLLM's usual path: projected features replace the placeholders' embeddings.
NAAViT (`architecture: naavit`) is that path with SAISA.md §2's mask, which vLLM's causal kernels cannot express: they
run for every row (caching every K/V and giving the text rows their output), then a hook on each layer's attention
recomputes the visual rows' output over the text before them and themselves. That needs each prompt's earlier K/V in
the same step, so NAAViT is served with whole-prompt prefills: chunked prefill, prefix caching, async scheduling and
every other way to split a prompt off (checked at load).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from saisa.integrations.vllm.processing import (
    SaisaDummyInputsBuilder,
    SaisaMultiModalProcessor,
    SaisaProcessingInfo,
    vision_encoder,
)
from saisa.model.configuration import SaisaConfig
from saisa.model.visual_kv import add_projectors, normed_layer_input, project
from saisa.processing import IMAGE_TOKEN
from saisa.processing.templates import VIDEO_TOKEN


@MULTIMODAL_REGISTRY.register_processor(
    SaisaMultiModalProcessor, info=SaisaProcessingInfo, dummy_inputs=SaisaDummyInputsBuilder
)
class SaisaForVLLM(nn.Module, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        if modality.startswith("video"):
            return VIDEO_TOKEN
        raise ValueError(f"saisa models take images and videos only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: SaisaConfig = vllm_config.model_config.hf_config
        self.config = config
        self.arch = config.arch
        _refuse_full_cuda_graphs_for_image_steps(vllm_config)
        _refuse_visual_pruning(config)
        if self.arch.no_visual_to_visual:
            _require_whole_prompt_prefills(vllm_config)
        text = config.text_config
        self.configure_mm_token_handling(vocab_size=text.vocab_size, mm_token_ids=[config.image_token_id])

        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.vision_tower = vision_encoder(config)
            add_projectors(self, config, self.vision_tower.hidden_size)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

        # Visual rows of the step being run: (is_visual (T,) bool, v_feats (n_visual, d_vis)), set by embed_input_ids
        # and taken by the forward right after it (the model runner calls the two in turn for every step).
        self._scheduled_visual: tuple[torch.Tensor, torch.Tensor] | None = None
        self._text_rows: torch.Tensor | None = None  # during a SAISA forward: the rows o_proj keeps
        # NAAViT: the step's is_multimodal, set by embed_input_ids and taken by forward; then, during the forward,
        # per prompt holding visual rows: (first row, rows up to its last visual row, visual offsets (nv,),
        # keys each may see (nv, n))
        self._naavit_rows: torch.Tensor | None = None
        self._naavit_prompts: list[tuple[int, int, torch.Tensor, torch.Tensor]] | None = None
        for layer in self.language_model.model.layers:
            layer.self_attn.o_proj.register_forward_pre_hook(self._o_proj_on_text_rows)
            if self.arch.no_visual_to_visual:
                layer.self_attn.attn.register_forward_hook(self._visual_queries_see_text_only)

    # -- images and videos -----------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Per image or video (vLLM passes one modality at a time) its views' patch features one after another,
        (views * v, d_vis) (SAISA), or their projected embeddings, (views * v, h) (LLaVA)."""
        if kwargs.get("pixel_values") is not None:
            pixel_values, counts = kwargs["pixel_values"], kwargs["image_num_views"]
        elif kwargs.get("pixel_values_videos") is not None:
            pixel_values, counts = kwargs["pixel_values_videos"], kwargs["video_num_frames"]
        else:
            return []
        # (N, 3, S, S): every view of every item, each preprocessed to S x S
        features = self.vision_tower(pixel_values)  # (N, v, d_vis)
        if not self.arch.visual_keys_values_only:
            features = project(self, features)  # (N, v, h)
        return [item.flatten(0, 1) for item in features.split(torch.as_tensor(counts).tolist())]

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.arch.visual_keys_values_only:
            if self.arch.no_visual_to_visual and multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
                self._naavit_rows = is_multimodal
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        embeds = self._embed_text_input_ids(
            input_ids, self.language_model.embed_input_ids, is_multimodal=is_multimodal
        )  # (T, h); the visual rows' are never read
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            # v_feats are d_vis wide and vLLM's inputs_embeds buffer is h wide: they reach forward beside it.
            rows = is_multimodal.to(embeds.device)
            self._scheduled_visual = (rows, torch.cat(list(multimodal_embeddings)).to(embeds.dtype))
        return embeds

    # -- the decoder ---------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        decoder = self.language_model.model
        if self.arch.no_visual_to_visual:
            return self._naavit_forward(decoder, input_ids, positions, intermediate_tensors, inputs_embeds)
        scheduled, self._scheduled_visual = self._scheduled_visual, None
        if scheduled is None:  # no image rows in this step (every decode step too): the plain LLM
            return decoder(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
        rows, features = scheduled
        is_visual = _padded_to_step(rows, inputs_embeds)  # (T,)
        text_rows = (~is_visual).nonzero().squeeze(1)  # (Tt,)
        visual_rows = is_visual.nonzero().squeeze(1)  # (Tv,), Tv = features.shape[0]
        hidden, residual = inputs_embeds[text_rows], None  # (Tt, h): the residual stream is the text's alone
        normed = inputs_embeds.new_empty(inputs_embeds.shape)  # (T, h): every row's input to attention
        self._text_rows = text_rows
        try:
            for index, layer in enumerate(decoder.layers):
                if residual is None:
                    residual, normed_text = hidden, layer.input_layernorm(hidden)
                else:
                    normed_text, residual = layer.input_layernorm(hidden, residual)
                normed[text_rows] = normed_text
                normed[visual_rows] = normed_layer_input(layer, self, features, index)  # (Tv, h)
                hidden = layer.self_attn(positions=positions, hidden_states=normed)  # (Tt, h): o_proj on text rows
                hidden, residual = layer.post_attention_layernorm(hidden, residual)
                hidden = layer.mlp(hidden)
        finally:
            self._text_rows = None
        hidden, _ = decoder.norm(hidden, residual)
        out = inputs_embeds.new_zeros(inputs_embeds.shape)  # (T, h); visual rows predict nothing
        out[text_rows] = hidden
        return out

    def _o_proj_on_text_rows(self, module: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook on every layer's o_proj: in a SAISA step only the text rows' attention outputs go on."""
        if self._text_rows is None:
            return None
        return (args[0][self._text_rows], *args[1:])  # (T, heads * head_dim) -> (Tt, heads * head_dim)

    def _naavit_forward(self, decoder, input_ids, positions, intermediate_tensors, inputs_embeds):
        """The plain LLM, with the visual rows' attention recomputed by `_visual_queries_see_text_only`. Steps with
        image rows call the layers one by one: the compiled decoder would not run the hook's branch."""
        rows, self._naavit_rows = self._naavit_rows, None
        if rows is None:  # no image rows in this step (every decode step too)
            return decoder(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
        is_visual = _padded_to_step(rows, inputs_embeds)  # (T,)
        # what every layer's hook needs, made once per step: per prompt, its visual rows and the keys they may see
        self._naavit_prompts = []
        for first, length in _prompts_with_visual_rows(is_visual, positions):
            in_prompt = is_visual[first : first + length]  # (n,)
            visual = in_prompt.nonzero().squeeze(1)  # (nv,) offsets of the prompt's visual rows
            keys = torch.arange(length, device=visual.device)  # (n,)
            allowed = (keys[None, :] < visual[:, None]) & ~in_prompt[None, :]  # (nv, n): earlier text
            allowed[torch.arange(visual.shape[0]), visual] = True  # and itself
            self._naavit_prompts.append((first, length, visual, allowed))
        hidden, residual = inputs_embeds, None  # (T, h)
        try:
            for layer in decoder.layers:
                hidden, residual = layer(positions, hidden, residual)
        finally:
            self._naavit_prompts = None
        hidden, _ = decoder.norm(hidden, residual)
        return hidden

    def _visual_queries_see_text_only(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on every layer's vLLM `Attention` (NAAViT): the causal kernel's output for the visual rows is
        replaced by attention over the text keys before them and their own key (SAISA.md §2); text rows keep theirs."""
        if self._naavit_prompts is None:
            return output
        query, key, value = args[:3]  # (T, Hq * d), (T, Hkv * d), (T, Hkv * d), RoPE applied
        heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_size
        out = output.view(-1, heads, head_dim)  # (T, Hq, d), written in place
        for first, length, visual, allowed in self._naavit_prompts:
            span = slice(first, first + length)
            q = query[span].view(length, heads, head_dim)[visual].transpose(0, 1)  # (Hq, nv, d)
            k = key[span].view(length, kv_heads, head_dim).transpose(0, 1)  # (Hkv, n, d)
            v = value[span].view(length, kv_heads, head_dim).transpose(0, 1)  # (Hkv, n, d)
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=module.impl.scale, enable_gqa=True
            )  # (Hq, nv, d)
            out[first + visual] = attended.transpose(0, 1).to(out.dtype)  # (nv, Hq, d)
        return output

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


def _padded_to_step(rows: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """The step's is_multimodal (scheduled tokens) as a (T,) mask over every row: the runner may pad the step."""
    is_visual = torch.zeros(inputs_embeds.shape[0], dtype=torch.bool, device=inputs_embeds.device)
    is_visual[: rows.shape[0]] = rows.to(is_visual.device)
    return is_visual


def _refuse_full_cuda_graphs_for_image_steps(vllm_config: VllmConfig) -> None:
    """Steps with image rows run Python code (the layer loop, NAAViT's hook) that a full CUDA graph captured on a
    text-only dummy batch would skip; vLLM's default sends such steps to piecewise graphs, where it runs."""
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.mixed_mode() == CUDAGraphMode.FULL:
        raise ValueError(
            f"saisa models cannot run prefill steps in full CUDA graphs (cudagraph_mode {mode}): use the default "
            "FULL_AND_PIECEWISE, or PIECEWISE / FULL_DECODE_ONLY"
        )


def _refuse_visual_pruning(config: SaisaConfig) -> None:
    """A checkpoint saved with `visual_pruning` would be served unpruned here, a silently different model: vLLM fixes
    each image's cache slots before the forward and its attention kernels take no per-layer key mask, so a selection
    that depends on the text's attention cannot be applied (docs/views.md)."""
    if config.visual_pruning is not None:
        raise ValueError(
            f"this checkpoint's config sets visual_pruning {config.visual_pruning}, which the vLLM plugin cannot "
            "apply; serve it unpruned with --hf-overrides '{\"visual_pruning\": null}' (LLM(..., hf_overrides="
            '{"visual_pruning": None})), or pruned with `saisa serve`'
        )


def _require_whole_prompt_prefills(vllm_config: VllmConfig) -> None:
    """NAAViT's visual rows need every earlier key of their prompt in the same step (`SaisaForVLLM` docstring): every
    setting that lets the scheduler start a prompt with images in one step and finish it in another is refused."""
    scheduler = vllm_config.scheduler_config
    reasons = []
    if scheduler.enable_chunked_prefill:
        reasons.append("chunked prefill (--no-enable-chunked-prefill, LLM(..., enable_chunked_prefill=False))")
    if vllm_config.cache_config.enable_prefix_caching:
        reasons.append("prefix caching (--no-enable-prefix-caching, LLM(..., enable_prefix_caching=False))")
    if scheduler.async_scheduling:  # plans a step before the last one frees its encoder cache: cuts before an image
        reasons.append("async scheduling (--no-async-scheduling, LLM(..., async_scheduling=False))")
    if scheduler.long_prefill_token_threshold or getattr(scheduler, "long_prefill_token_threshold_adaptive", False):
        reasons.append("a long-prefill token threshold (--long-prefill-token-threshold 0)")
    if vllm_config.kv_transfer_config is not None:
        reasons.append("a KV connector (--kv-transfer-config), which loads part of a prompt from elsewhere")
    if reasons:
        raise ValueError(
            "NAAViT (no attention among visual tokens) is served with whole-prompt prefills only; turn off "
            + ", ".join(reasons)
        )


def _prompts_with_visual_rows(is_visual: torch.Tensor, positions: torch.Tensor) -> list[tuple[int, int]]:
    """(first row, rows up to its last visual row) of every prompt in the step that holds visual rows. Such a prompt is
    prefilled whole (`_require_whole_prompt_prefills`), so it starts at position 0 and a visual row's prompt starts
    `position` rows before it: no attention backend's metadata is needed. Checked, since a part-prefilled prompt
    would silently attend to another request's rows."""
    visual = is_visual.nonzero().squeeze(1)  # (Tv,)
    starts = visual - positions[visual]  # (Tv,) first row of each visual row's prompt
    prompts = []
    for first in starts.unique().tolist():
        end = int(visual[starts == first].max()) + 1
        expected = torch.arange(end - first, device=positions.device)
        if first < 0 or not torch.equal(positions[max(first, 0) : end], expected):
            raise RuntimeError(
                "NAAViT: a prompt with images was not prefilled whole in one step; its visual rows need all of it"
            )
        prompts.append((first, end - first))
    return prompts
