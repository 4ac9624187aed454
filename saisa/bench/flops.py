"""Analytic FLOPs for LLaVA-1.5, NAAViT, SAISA and a Flamingo-style model (SAISA.md §4).

Convention (the authors', from their ShortV paper): a multiply-add is 2 FLOPs; attention scores and the weighted sum
cost `4 * queries * keys * q_dim` per layer (no causal halving); norms, activations, RoPE and softmax are ignored.
With GQA the K/V projections are `h -> kv_dim`, so the paper's `4h^2` becomes `2h(q_dim + kv_dim) + ...`; with
kv_dim = q_dim = h the formulas reduce to SAISA.md's exactly. The vision encoder is reported separately.

Layout assumed by the formulas: one image of v tokens, then t text tokens (LLaVA's prompt order). NAAViT's visual
queries then see only themselves.

Visual pruning (`saisa.model.pruning.VisualPruning`, keep k = kept(v) per image): "fastv" runs layers 0..K in full and
every later layer on the kept tokens (LLaVA / NAAViT: FastV proper, the kept visual tokens' rows and attention columns;
SAISA: the kept tokens' projector, K/V projections and attention columns); the score's own cost is not counted.
"per_layer" (SAISA) makes every visual K/V in every layer to score them: counted as the unpruned prefill. Either way
the KV cache holds k entries per image in every layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from saisa.components.encoders import visual_token_count
from saisa.model.architectures import architecture_named
from saisa.model.pruning import VisualPruning

ARCHITECTURES = ("llava", "naavit", "saisa", "flamingo")


@dataclass(frozen=True)
class ModelDims:
    name: str
    hidden: int  # h
    ffn: int  # m (gated FFN: 3 matrices h x m)
    layers: int  # L
    heads: int
    kv_heads: int
    head_dim: int
    vision_hidden: int  # d_vis
    visual_tokens: int  # v per image
    vocab: int = 32000
    vision_flops: float | None = None  # one image through the vision encoder, if known

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def per_token_linear(self) -> float:
        """A full decoder layer's linear FLOPs for one token: Q, K, V, O and the gated FFN."""
        h = self.hidden
        return 2 * h * (2 * self.q_dim + 2 * self.kv_dim) + 2 * 3 * h * self.ffn

    def projector(self, tokens: int | None = None) -> float:
        """One 2-layer MLP projector over v tokens (or `tokens`): `2 v (d_vis h + h^2)`."""
        tokens = self.visual_tokens if tokens is None else tokens
        return 2 * tokens * (self.vision_hidden * self.hidden + self.hidden**2)


def vit_flops(*, image_size: int, patch_size: int, hidden: int, ffn: int, layers: int, cls: bool = True) -> float:
    """One image through a ViT (patch embedding + `layers` blocks), same convention."""
    patches = (image_size // patch_size) ** 2
    n = patches + int(cls)
    block = 2 * n * (4 * hidden**2 + 2 * hidden * ffn) + 4 * n * n * hidden
    return 2 * patches * 3 * patch_size**2 * hidden + layers * block


def _llama(name, h, m, L, heads, kv, vocab, vision: ModelDims | None = None) -> ModelDims:
    vision = vision or CLIP_L_336
    return ModelDims(
        name, h, m, L, heads, kv, h // heads, vision.vision_hidden, vision.visual_tokens, vocab, vision.vision_flops
    )


# vision towers, as partial dims: (d_vis, v, flops per image)
CLIP_L_336 = ModelDims(
    "clip-vit-l-14-336",
    0,
    0,
    0,
    1,
    1,
    0,
    1024,
    576,
    vision_flops=vit_flops(image_size=336, patch_size=14, hidden=1024, ffn=4096, layers=23),
)
EFFICIENTNET_LITE0 = ModelDims("efficientnet-lite0", 0, 0, 0, 1, 1, 0, 1280, 49, vision_flops=None)

PRESETS: dict[str, ModelDims] = {
    "vicuna-7b": _llama("vicuna-7b + clip-l-336", 4096, 11008, 32, 32, 32, 32000),
    "vicuna-13b": _llama("vicuna-13b + clip-l-336", 5120, 13824, 40, 40, 40, 32000),
    "llama3-8b": _llama("llama-3-8b + clip-l-336", 4096, 14336, 32, 32, 8, 128256),
    "mistral-7b": _llama("mistral-7b + clip-l-336", 4096, 14336, 32, 32, 8, 32000),
    "qwen2.5-7b": _llama("qwen2.5-7b + clip-l-336", 3584, 18944, 28, 28, 4, 152064),
    "embedded": _llama("smollm2-135m + efficientnet-lite0", 576, 1536, 30, 9, 3, 49152, EFFICIENTNET_LITE0),
}


def vision_dims(config) -> tuple[int, int]:
    """(v, d_vis) of a `SaisaConfig`'s vision tower, read from its vision config without building the tower (each
    encoder's own `token_count`)."""
    vision = config.vision_config
    return visual_token_count(vision, config.vision_feature_select_strategy), vision.hidden_size


def dims_from_config(config, name: str = "model") -> ModelDims:
    """ModelDims of a `SaisaConfig` (or anything with text_config / vision tower sizes)."""
    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    visual_tokens, vision_hidden = vision_dims(config)
    return ModelDims(
        name,
        tc.hidden_size,
        tc.intermediate_size,
        tc.num_hidden_layers,
        tc.num_attention_heads,
        tc.num_key_value_heads,
        head_dim,
        vision_hidden,
        visual_tokens,
        tc.vocab_size,
    )


def kept_per_image(dims: ModelDims, architecture: str, pruning: VisualPruning | None) -> int:
    """Visual entries each image keeps in the KV cache (all v without pruning); raises where `pruning` does not
    apply to `architecture`."""
    if pruning is None:
        return dims.visual_tokens
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; one of {ARCHITECTURES}")
    if architecture == "flamingo":
        raise ValueError("visual pruning is defined for llava, naavit and saisa, not flamingo")
    pruning.check(num_layers=dims.layers, arch=architecture_named(architecture))
    return pruning.kept(dims.visual_tokens)


def prefill_flops(
    dims: ModelDims,
    architecture: str,
    text_tokens: int,
    *,
    images: int = 1,
    lm_head: bool = False,
    pruning: VisualPruning | None = None,
) -> dict[str, float]:
    """Inference prefill FLOPs, vision encoder excluded, with `pruning` if given. Returns the parts and their
    `total`."""
    kept = kept_per_image(dims, architecture, pruning) * images
    groups = [(dims.layers, dims.visual_tokens * images)]  # (layers, visual tokens they run on)
    if pruning is not None and pruning.method == "fastv":
        full = pruning.score_layer + 1
        groups = [(full, dims.visual_tokens * images), (dims.layers - full, kept)]
    parts: dict[str, float] = {}
    for layers, v in groups:
        for name, value in _layer_flops(dims, architecture, text_tokens, v, layers).items():
            parts[name] = parts.get(name, 0) + value
    if architecture != "saisa":  # one projector into the embedding space, before pruning
        parts["projectors"] = dims.projector() * images
    if lm_head:
        parts["lm_head"] = 2 * text_tokens * dims.hidden * dims.vocab  # logits are needed at text positions only
    parts["total"] = sum(parts.values())
    return parts


def _layer_flops(dims: ModelDims, architecture: str, t: int, v: int, L: int) -> dict[str, float]:
    """`L` decoder layers' FLOPs with t text and v visual tokens (SAISA: and its per-layer projectors)."""
    h, lin, qd = dims.hidden, dims.per_token_linear(), dims.q_dim
    if architecture == "llava":
        parts = {"layers_linear": L * (t + v) * lin, "attention": L * 4 * (t + v) ** 2 * qd}
    elif architecture == "naavit":
        # visual queries see themselves only; text sees everything before it
        parts = {"layers_linear": L * (t + v) * lin, "attention": L * 4 * (t * (t + v) + v) * qd}
    elif architecture == "saisa":
        visual_kv = 2 * v * h * 2 * dims.kv_dim  # K and V projections of the visual tokens
        parts = {
            "layers_linear": L * (t * lin + visual_kv),
            "attention": L * 4 * t * (t + v) * qd,
            "projectors": L * dims.projector(v),
        }
    elif architecture == "flamingo":
        # LLM on text only, plus in every layer a gated cross-attention block (Q/O on text, K/V on visual tokens,
        # attention text x visual) and a gated FFN on the text; one projector into the LLM width.
        xattn = 2 * t * h * 2 * qd + 2 * v * h * 2 * dims.kv_dim + 4 * t * v * qd + 2 * 3 * t * h * dims.ffn
        parts = {"layers_linear": L * t * lin, "attention": L * 4 * t * t * qd, "cross_attention": L * xattn}
    else:
        raise ValueError(f"unknown architecture {architecture!r}; one of {ARCHITECTURES}")
    return parts


def decode_flops(dims: ModelDims, architecture: str, context: int) -> float:
    """One generated token with `context` cached entries (text + visual), lm_head excluded."""
    L, h, qd = dims.layers, dims.hidden, dims.q_dim
    per_token = L * (dims.per_token_linear() + 4 * (context + 1) * qd)
    if architecture == "flamingo":
        v = dims.visual_tokens
        text_context = context - v
        per_token = L * (
            dims.per_token_linear() + 4 * (text_context + 1) * qd + 2 * h * 2 * qd + 4 * v * qd + 2 * 3 * h * dims.ffn
        )
    return per_token


def kv_cache_bytes(
    dims: ModelDims,
    architecture: str,
    text_tokens: int,
    *,
    bytes_per_value: int = 2,
    pruning: VisualPruning | None = None,
) -> float:
    """Every architecture caches t + v entries per layer: LLaVA and NAAViT as tokens, SAISA as its per-layer visual
    K/V prefix, Flamingo as text self-attention plus per-layer cross-attention K/V. With `pruning`, t + kept(v)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; one of {ARCHITECTURES}")
    visual = kept_per_image(dims, architecture, pruning)
    return 2 * dims.kv_dim * bytes_per_value * dims.layers * (text_tokens + visual)


def training_flops(dims: ModelDims, architecture: str, text_tokens: int, *, stage: str) -> dict[str, float]:
    """Forward + backward FLOPs of one sample. Backward of a trainable linear = 2x its forward (input and weight
    gradients); of a frozen part that gradients must cross = 1x (input gradients only); of a frozen prefix that no
    trainable part precedes = 0 (the vision encoder). Attention's backward = 2x its forward."""
    if stage not in ("align", "instruct"):
        raise ValueError("stage is 'align' (projectors only) or 'instruct' (projectors + LLM)")
    fwd = prefill_flops(dims, architecture, text_tokens)
    llm_trainable = stage == "instruct"
    linear_backward = 2 if llm_trainable else 1
    backward = fwd["projectors"] * 2 + fwd["layers_linear"] * linear_backward + fwd["attention"] * 2
    backward += fwd.get("cross_attention", 0) * 2
    vision = dims.vision_flops or 0.0
    return {
        "forward": fwd["total"],
        "backward": backward,
        "vision_forward": vision,
        "total": fwd["total"] + backward + vision,
    }


def recipe_training_ratio(
    dims: ModelDims, *, align_samples=558_000, align_text=64, instruct_samples=665_000, instruct_text=512
) -> dict[str, float]:
    """SAISA / LLaVA-1.5 training FLOPs over the two-stage recipe (SAISA.md §5) at typical text lengths."""
    totals = {}
    for arch in ("llava", "saisa"):
        totals[arch] = (
            align_samples * training_flops(dims, arch, align_text, stage="align")["total"]
            + instruct_samples * training_flops(dims, arch, instruct_text, stage="instruct")["total"]
        )
    return {"llava": totals["llava"], "saisa": totals["saisa"], "ratio": totals["saisa"] / totals["llava"]}


def reduction_table(dims: ModelDims, text_lengths=(64, 128, 256, 512)) -> list[dict]:
    rows = []
    for t in text_lengths:
        row = {"text_tokens": t}
        for arch in ARCHITECTURES:
            row[arch] = prefill_flops(dims, arch, t)["total"]
        for arch in ("naavit", "saisa", "flamingo"):
            row[f"{arch}_reduction"] = 1 - row[arch] / row["llava"]
        rows.append(row)
    return rows


def report(dims: ModelDims, text_tokens: int) -> dict:
    return {
        "dims": asdict(dims),
        "text_tokens": text_tokens,
        "prefill": {arch: prefill_flops(dims, arch, text_tokens) for arch in ARCHITECTURES},
        "decode_per_token": {
            arch: decode_flops(dims, arch, text_tokens + dims.visual_tokens) for arch in ARCHITECTURES
        },
        "kv_cache_bytes_bf16": {arch: kv_cache_bytes(dims, arch, text_tokens) for arch in ARCHITECTURES},
        "vision_encoder_per_image": dims.vision_flops,
        "reduction_vs_text_length": reduction_table(dims, sorted({64, 128, 256, 512, text_tokens})),
        "training": {
            "align": {a: training_flops(dims, a, text_tokens, stage="align") for a in ("llava", "saisa")},
            "instruct": {a: training_flops(dims, a, text_tokens, stage="instruct") for a in ("llava", "saisa")},
            "recipe": recipe_training_ratio(dims),
        },
    }


def with_visual_tokens(dims: ModelDims, visual_tokens: int | None) -> ModelDims:
    return dims if visual_tokens is None else replace(dims, visual_tokens=visual_tokens)


def analyse(dims: ModelDims, text_tokens: int, *, json_path=None, plot_path=None) -> str:
    """`report` of `dims` at `text_tokens`, written to `json_path` and its reduction curve to `plot_path` if given;
    returns the tables a person reads."""
    rep = report(dims, text_tokens)
    lines = [
        f"{dims.name}: h={dims.hidden} m={dims.ffn} L={dims.layers} heads={dims.heads}/{dims.kv_heads} "
        f"v={dims.visual_tokens} t={text_tokens}  (TFLOPs, vision encoder excluded)",
        f"{'architecture':<10} {'prefill':>9} {'vs llava':>9} {'decode/tok':>11} {'KV cache':>10}",
    ]
    llava = rep["prefill"]["llava"]["total"]
    for arch in ARCHITECTURES:
        total = rep["prefill"][arch]["total"]
        lines.append(
            f"{arch:<10} {_tera(total)} {100 * (total / llava - 1):+8.1f}% "
            f"{rep['decode_per_token'][arch] / 1e9:9.2f} G {rep['kv_cache_bytes_bf16'][arch] / 2**20:7.1f} MiB"
        )
    if dims.vision_flops:
        lines.append(f"vision encoder: {_tera(dims.vision_flops)} TFLOPs per image (all architectures)")
    lines += [
        "\nprefill reduction against text length (vs LLaVA-1.5):",
        f"{'t':>6} {'naavit':>8} {'saisa':>8} {'flamingo':>9}",
    ]
    for row in rep["reduction_vs_text_length"]:
        lines.append(
            f"{row['text_tokens']:>6} {100 * row['naavit_reduction']:7.1f}% {100 * row['saisa_reduction']:7.1f}% "
            f"{100 * row['flamingo_reduction']:8.1f}%"
        )
    recipe = rep["training"]["recipe"]
    lines.append(
        f"\ntraining (LLaVA-1.5 recipe: 558K align at t=64, 665K instruct at t=512): SAISA/LLaVA FLOPs = "
        f"{recipe['ratio']:.2f} (paper: 0.74 in GPU hours)"
    )
    if json_path:
        Path(json_path).write_text(json.dumps(rep, indent=2))
        lines.append(f"wrote {json_path}")
    if plot_path:
        plot_reduction(dims, plot_path)
        lines.append(f"wrote {plot_path}")
    return "\n".join(lines)


def _tera(x: float) -> str:
    return f"{x / 1e12:9.3f}"


def plot_reduction(dims: ModelDims, path) -> None:
    """The prefill FLOPs each architecture saves against LLaVA-1.5, over text lengths 16..2048."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(range(16, 2049, 16))
    rows = reduction_table(dims, lengths)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for arch in ("saisa", "naavit", "flamingo"):
        ax.plot(lengths, [100 * r[f"{arch}_reduction"] for r in rows], label=arch)
    ax.set_xlabel("text tokens t")
    ax.set_ylabel("prefill FLOPs saved vs LLaVA-1.5 (%)")
    ax.set_title(f"{dims.name}, v = {dims.visual_tokens}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
