"""The three architectures one `SaisaConfig` can name, each as what it does differently (SAISA.md §1-3). Code that
depends on the architecture reads one of these properties (`config.arch`), never the name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    # Visual tokens are keys and values only, made per layer from the images (SAISA): they issue no query, so no
    # token is predicted right after an image, and their K/V depend on the image alone (an image KV cache can keep
    # them). Otherwise they are spliced into the input embeddings as full tokens (LLaVA-1.5, NAAViT).
    visual_keys_values_only: bool
    # One projector per decoder layer, into that layer's input space (unless the config shares one); otherwise one
    # projector into the embedding space.
    per_layer_projectors: bool
    # No attention among visual tokens (NAAViT): a visual query sees the text before it and itself only.
    no_visual_to_visual: bool


SAISA = Architecture("saisa", visual_keys_values_only=True, per_layer_projectors=True, no_visual_to_visual=False)
LLAVA = Architecture("llava", visual_keys_values_only=False, per_layer_projectors=False, no_visual_to_visual=False)
NAAVIT = Architecture("naavit", visual_keys_values_only=False, per_layer_projectors=False, no_visual_to_visual=True)

ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (SAISA, LLAVA, NAAVIT)}


def architecture_named(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"architecture must be one of {tuple(ARCHITECTURES)}, got {name!r}") from None
