"""A naive reference written from SAISA.md's equations: one sample at a time, the whole LLaVA-ordered sequence laid
out explicitly, every layer computed by hand from the weights (RMSNorm, RoPE, GQA attention with an explicit mask,
SwiGLU FFN). It shares no code with the library: only weights are read from the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, theta):  # x (heads, n, d), positions (n,)
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    angles = positions[:, None].float() * inv_freq[None]  # (n, d/2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def _linear(x, module):
    return F.linear(x, module.weight, module.bias)


def _projector(features, projector):
    return _linear(F.gelu(_linear(features, projector.linear_1)), projector.linear_2)


def reference_logits(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """input_ids (T,) of ONE sample without padding; returns logits (T, vocab) in input_ids' layout
    (at an image placeholder: the last visual token's logits for llava/naavit, zeros for saisa)."""
    cfg, tc = model.config, model.config.text_config
    arch = cfg.architecture
    lm = model.language_model
    layers = lm.layers
    v = model.vision_tower.num_tokens
    theta = tc.rope_parameters["rope_theta"]
    eps = tc.rms_norm_eps
    heads, kv_heads = tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    features = model.vision_tower(pixel_values) if pixel_values is not None else None  # (N, v, d_vis)

    # The expanded sequence: one entry per text token, v entries per image.
    kinds, image_of, token_of = [], [], []
    n_image = 0
    for t, token in enumerate(input_ids.tolist()):
        if token == cfg.image_token_id:
            kinds += ["visual"] * v
            image_of += [(n_image, j) for j in range(v)]
            token_of += [t] * v
            n_image += 1
        else:
            kinds.append("text")
            image_of.append(None)
            token_of.append(t)
    n = len(kinds)
    positions = torch.arange(n)
    is_visual = torch.tensor([k == "visual" for k in kinds])
    text_ids = torch.tensor([int(input_ids[token_of[i]]) if not is_visual[i] else 0 for i in range(n)])

    def visual_rows(proj_output):  # (N, v, h) -> (n, h) rows placed at visual entries, zeros elsewhere
        rows = torch.zeros(n, proj_output.shape[-1])
        for i, where in enumerate(image_of):
            if where is not None:
                rows[i] = proj_output[where[0], where[1]]
        return rows

    hidden = lm.embed_tokens.weight[text_ids].clone()  # (n, h)
    if arch != "saisa" and features is not None:
        hidden = torch.where(is_visual[:, None], visual_rows(_projector(features, model.projector)), hidden)

    causal = positions[None, :] <= positions[:, None]  # (query, key)
    if arch == "naavit":
        allowed = causal & ~(is_visual[:, None] & is_visual[None, :]) | torch.eye(n, dtype=torch.bool)
    else:
        allowed = causal
    mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))

    for index, layer in enumerate(layers):
        attn = layer.self_attn
        if arch == "saisa" and features is not None:
            projector = model.layer_projectors[index] if hasattr(model, "layer_projectors") else model.projector
            # Visual entries enter the layer's input space afresh; they carry nothing from the previous layer.
            layer_input = torch.where(is_visual[:, None], visual_rows(_projector(features, projector)), hidden)
        else:
            layer_input = hidden
        x = _rms(layer_input, layer.input_layernorm.weight, eps)
        q = _linear(x, attn.q_proj).view(n, heads, head_dim).transpose(0, 1)
        k = _linear(x, attn.k_proj).view(n, kv_heads, head_dim).transpose(0, 1)
        val = _linear(x, attn.v_proj).view(n, kv_heads, head_dim).transpose(0, 1)
        if hasattr(attn, "q_norm"):
            q = _rms(q, attn.q_norm.weight, eps)
            k = _rms(k, attn.k_norm.weight, eps)
        q, k = _rope(q, positions, theta), _rope(k, positions, theta)
        k = k.repeat_interleave(heads // kv_heads, 0)
        val = val.repeat_interleave(heads // kv_heads, 0)
        scores = q @ k.transpose(1, 2) / head_dim**0.5 + mask  # (heads, n, n)
        out = (scores.softmax(-1) @ val).transpose(0, 1).reshape(n, heads * head_dim)
        h_attn = layer_input + _linear(out, attn.o_proj)
        mlp = layer.mlp
        y = _rms(h_attn, layer.post_attention_layernorm.weight, eps)
        hidden = h_attn + _linear(F.silu(_linear(y, mlp.gate_proj)) * _linear(y, mlp.up_proj), mlp.down_proj)

    logits_full = _linear(_rms(hidden, lm.norm.weight, eps), model.lm_head)  # (n, vocab)
    # Back to input_ids' layout.
    out = torch.zeros(len(input_ids), logits_full.shape[-1])
    for i in range(n):
        t = token_of[i]
        if not is_visual[i]:
            out[t] = logits_full[i]
        elif arch != "saisa":
            out[t] = logits_full[i]  # the last visual entry of the image writes last
    return out
