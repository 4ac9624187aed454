"""Visual K/V pruning (`saisa.model.pruning`): r = 1 runs the pruning machinery and equals no pruning exactly, the
score is the eager attention weights' mean, a padded batch prunes each row as that row alone, the KV cache shrinks to
the kept entries, and the FLOPs / KV-bytes accounting matches hand-written equations."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN, images, tiny_model

from saisa import ImageKVCache, SaisaConfig, SaisaForConditionalGeneration
from saisa.bench.flops import ModelDims, kv_cache_bytes, prefill_flops
from saisa.model import pruning as pruning_module
from saisa.model.pruning import VisualPruning

CASES = [("saisa", "fastv"), ("saisa", "per_layer"), ("llava", "fastv"), ("naavit", "fastv")]
IMG = IMAGE_TOKEN
# Two prompts of different lengths and image counts, left-padded into one batch.
ROW_A = [1, 3, IMG, 6, 7, IMG, 8, 9]
ROW_B = [1, IMG, 4, 5, 6, 7, 8, 9, 10, 11]


def _batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _pixels(rows: list[list[int]]) -> torch.Tensor:
    """Each row's images: row A's are images 0, 1; row B's image 2 (the same pixels whichever batch they are in)."""
    every = images(3)
    chosen = ([0, 1] if ROW_A in rows else []) + ([2] if ROW_B in rows else [])
    return every[chosen]


def _model(arch: str, impl: str = "sdpa", pruning: dict | None = None, family: str = "llama"):
    model = tiny_model(arch, family)
    model.set_attn_implementation(impl)
    model.config.visual_pruning = pruning
    return model


def _prefill_and_decode(model, ids, mask, pixels, steps: int = 3):
    """Logits of the prefill and of `steps` greedy decode steps, and the cache."""
    out = model(ids, pixel_values=pixels, attention_mask=mask, use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for _ in range(steps):
        token = logits[-1][:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits.append(model(token, attention_mask=mask, past_key_values=cache, use_cache=True).logits)
    return logits, cache


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,method", CASES)
def test_keep_ratio_one_equals_no_pruning_exactly(arch, method, impl):
    ids, mask = _batch([ROW_A, ROW_B])
    pixels = _pixels([ROW_A, ROW_B])
    model = _model(arch, impl)
    plain, plain_cache = _prefill_and_decode(model, ids, mask, pixels)
    plain_tokens = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    model.config.visual_pruning = {"keep_ratio": 1.0, "method": method, "score_layer": 1}
    ran = []
    original = pruning_module.PruningPass.compact
    with pytest.MonkeyPatch.context() as patch:  # the pruning machinery runs, it is not skipped at r = 1
        patch.setattr(pruning_module.PruningPass, "compact", lambda self, cache: ran.append(1) or original(self, cache))
        pruned, pruned_cache = _prefill_and_decode(model, ids, mask, pixels)
        tokens = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert len(ran) == 2
    assert all(torch.equal(a, b) for a, b in zip(plain, pruned, strict=True))
    assert torch.equal(plain_tokens, tokens)
    for a, b in zip(plain_cache.layers, pruned_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize(
    "arch,family", [("saisa", "llama"), ("saisa", "qwen3"), ("llava", "qwen2"), ("naavit", "llama")]
)
def test_score_is_the_mean_of_eager_attention_weights(arch, family):
    """The score (computed from the module's own projections, whatever the attention kernel) against the weights that
    eager attention returns at the score layer: mean over heads and over the real text queries after the image."""
    ids, mask = _batch([ROW_A, ROW_B])
    model = _model(arch, "eager", {"keep_ratio": 0.25, "method": "fastv", "score_layer": 1}, family)
    recorded = []
    original = pruning_module.visual_scores
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            pruning_module, "visual_scores", lambda *a, **k: recorded.append(original(*a, **k)) or recorded[-1]
        )
        out = model(ids, pixel_values=_pixels([ROW_A, ROW_B]), attention_mask=mask, output_attentions=True)
    (scores,) = recorded  # (B, Vb): one score layer
    weights = out.attentions[1]  # (B, heads, T, keys): keys = this call's visual block, then its input columns
    v = model.tokens_per_image
    expected = torch.zeros_like(scores)
    for b in range(ids.shape[0]):
        placeholders = (ids[b] == IMG).nonzero().flatten().tolist()
        text = (mask[b].bool() & (ids[b] != IMG)).nonzero().flatten()
        for i, column in enumerate(placeholders):
            queries = text[text > column]
            slots = slice(i * v, (i + 1) * v)
            expected[b, slots] = weights[b][:, queries, slots].mean(0).mean(0)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    assert scores.abs().sum() > 0


@pytest.mark.parametrize("arch", ["saisa", "llava"])
def test_score_of_a_later_turn_counts_the_cached_keys(arch):
    """A later call's image is scored over every key its text sees, the cached ones included."""
    model = _model(arch, "eager", {"keep_ratio": 0.5, "method": "fastv", "score_layer": 2})
    cache = model(torch.tensor([ROW_A]), pixel_values=_pixels([ROW_A]), use_cache=True).past_key_values
    cached = cache.layers[0].keys.shape[-2]
    recorded = []
    original = pruning_module.visual_scores
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            pruning_module, "visual_scores", lambda *a, **k: recorded.append(original(*a, **k)) or recorded[-1]
        )
        out = model(
            torch.tensor([[5, IMG, 6, 7]]), pixel_values=images(1, 9), past_key_values=cache, output_attentions=True
        )
    (scores,) = recorded
    v = model.tokens_per_image
    expected = out.attentions[2][0][:, 2:, cached : cached + v].mean(0).mean(0)  # queries 6, 7 see the image
    torch.testing.assert_close(scores[0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
@pytest.mark.parametrize("arch,method", CASES)
def test_batched_prunes_each_row_as_alone(arch, method, keep_ratio):
    model = _model(arch, "sdpa", {"keep_ratio": keep_ratio, "method": method, "score_layer": 1})
    rows = [ROW_A, ROW_B]
    ids, mask = _batch(rows)
    batched, _ = _prefill_and_decode(model, ids, mask, _pixels(rows))
    tokens = model.generate(ids, attention_mask=mask, pixel_values=_pixels(rows), max_new_tokens=5, do_sample=False)
    for b, row in enumerate(rows):
        alone_ids, alone_mask = _batch([row])
        alone, _ = _prefill_and_decode(model, alone_ids, alone_mask, _pixels([row]))
        real = mask[b].bool()
        torch.testing.assert_close(batched[0][b, real], alone[0][0], atol=1e-5, rtol=1e-4)
        for step in range(1, len(alone)):
            torch.testing.assert_close(batched[step][b], alone[step][0], atol=1e-5, rtol=1e-4)
        alone_tokens = model.generate(
            alone_ids, attention_mask=alone_mask, pixel_values=_pixels([row]), max_new_tokens=5, do_sample=False
        )
        assert tokens[b, ids.shape[1] :].tolist() == alone_tokens[0, alone_ids.shape[1] :].tolist()


@pytest.mark.parametrize("arch,method", CASES)
def test_cache_holds_the_kept_entries_only(arch, method):
    """Every layer's cache tensors hold kept(v) visual entries per image (plus the text): their visual bytes shrink to
    kept/v; a later call's image is pruned when it is prefilled, the earlier entries untouched."""
    ids, mask = _batch([ROW_A])
    pixels = _pixels([ROW_A])
    model = _model(arch)
    _, full = _prefill_and_decode(model, ids, mask, pixels, steps=0)
    pruning = VisualPruning(0.25, method, 1)
    model.config.visual_pruning = pruning.to_dict()
    _, pruned = _prefill_and_decode(model, ids, mask, pixels, steps=0)
    v, k, text = model.tokens_per_image, pruning.kept(model.tokens_per_image), ids.shape[1]
    assert k == v // 4
    for a, b in zip(full.layers, pruned.layers, strict=True):
        per_entry = a.keys.nbytes // a.keys.shape[-2]
        assert a.keys.nbytes == (2 * v + text) * per_entry and b.keys.nbytes == (2 * k + text) * per_entry
        assert b.values.shape == b.keys.shape
    assert pruned.layout.positions.shape[1] == 2 * k + text and int(pruned.layout.is_visual.sum()) == 2 * k
    # each image's kept entries sit inside its span: positions 2 .. 2+v, then (after 6, 7) 4+v .. 4+2v
    visual = pruned.layout.positions[0][pruned.layout.is_visual[0]]
    assert ((visual[:k] >= 2) & (visual[:k] < 2 + v)).all() and ((visual[k:] >= 4 + v) & (visual[k:] < 4 + 2 * v)).all()

    # multi-turn: a new image in a later call keeps k entries too, and what was cached stays as it was
    before = [(layer.keys.clone(), layer.values.clone()) for layer in pruned.layers]
    turn = torch.tensor([[5, IMG, 6, 7]])
    model(turn, pixel_values=images(1, seed=9), past_key_values=pruned, use_cache=True)
    for (keys, values), layer in zip(before, pruned.layers, strict=True):
        assert layer.keys.shape[-2] == keys.shape[-2] + k + 4
        assert torch.equal(layer.keys[..., : keys.shape[-2], :], keys)
        assert torch.equal(layer.values[..., : values.shape[-2], :], values)
    assert pruned.layout.positions.shape[1] == pruned.layers[0].keys.shape[-2]


def test_per_layer_prefill_attends_to_each_layers_top_keys():
    """per_layer against an independent reference: the unpruned model in which every layer first runs as it is (eager)
    to read its own attention weights, ranks each image's visual keys by their mean over heads and over the text
    queries that see the image, then runs again with the others hidden by the mask (not removed from the keys)."""
    ids, mask = _batch([ROW_A, ROW_B])
    pixels = _pixels([ROW_A, ROW_B])
    model = _model("saisa", "eager")
    v, ratio = model.tokens_per_image, 0.25
    k = VisualPruning(ratio, "per_layer").kept(v)
    blocked = torch.finfo(torch.float32).min
    placeholders = [(ids[b] == IMG).nonzero().flatten().tolist() for b in range(ids.shape[0])]
    text = mask.bool() & (ids != IMG)  # (B, T) real text

    def hide_all_but_the_top_keys(module, args, kwargs):
        if getattr(module, "_reference_running", False):
            return None
        module._reference_running = True
        try:
            weights = module(*args, **kwargs)[1]  # (B, heads, T, Vb + T)
        finally:
            module._reference_running = False
        hidden = torch.zeros(weights.shape[0], weights.shape[-1], dtype=torch.bool)  # (B, Vb + T)
        hidden[:, : weights.shape[-1] - ids.shape[1]] = True
        for b, columns in enumerate(placeholders):
            for i, column in enumerate(columns):
                queries = (text[b] & (torch.arange(ids.shape[1]) > column)).nonzero().flatten()
                score = weights[b][:, queries, i * v : (i + 1) * v].mean(0).mean(0)  # (v,)
                hidden[b, i * v + score.topk(k).indices] = False
        kwargs["attention_mask"] = kwargs["attention_mask"].masked_fill(hidden[:, None, None, :], blocked)
        return args, kwargs

    handles = [
        layer.self_attn.register_forward_pre_hook(hide_all_but_the_top_keys, with_kwargs=True)
        for layer in model.model.language_model.layers
    ]
    try:
        # no KV cache: the layer's first run would add its text K/V to it
        reference = model(ids, pixel_values=pixels, attention_mask=mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    unpruned = model(ids, pixel_values=pixels, attention_mask=mask).logits
    model.config.visual_pruning = {"keep_ratio": ratio, "method": "per_layer"}
    pruned = model(ids, pixel_values=pixels, attention_mask=mask).logits
    without_cache = model(ids, pixel_values=pixels, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(pruned[real], reference[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(without_cache[real], reference[real], atol=1e-5, rtol=1e-4)
    assert (pruned[real] - unpruned[real]).abs().max() > 1e-3  # the pruning changes what the text reads


@pytest.mark.parametrize("method", ["fastv", "per_layer"])
def test_pruning_after_image_kv_cache_lookup(method):
    """The image KV cache keeps every image's full K/V; pruning selects after the lookup: same result as without."""
    ids, mask = _batch([ROW_A, ROW_B])
    pixels = _pixels([ROW_A, ROW_B])
    model = _model("saisa", "sdpa", {"keep_ratio": 0.25, "method": method, "score_layer": 1})
    plain, _ = _prefill_and_decode(model, ids, mask, pixels)
    model.image_kv_cache = ImageKVCache()
    for _ in range(2):  # the first call fills the image KV cache, the second is served from it
        with torch.no_grad():  # (cached K/V are constants: the cache serves no call that needs their gradients)
            served, _ = _prefill_and_decode(model, ids, mask, pixels)
        for a, b in zip(plain, served, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert model.image_kv_cache.hits == 3


def test_beam_search_keeps_cache_and_layout_in_step():
    ids, mask = _batch([ROW_A, ROW_B])
    pixels = _pixels([ROW_A, ROW_B])
    model = _model("saisa", "sdpa", {"keep_ratio": 1.0, "method": "fastv", "score_layer": 1})
    pruned = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, num_beams=3)
    model.config.visual_pruning = None
    plain = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, num_beams=3)
    assert torch.equal(pruned, plain)
    model.config.visual_pruning = {"keep_ratio": 0.25, "method": "fastv", "score_layer": 1}
    beams = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, num_beams=3)
    greedy = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=1, do_sample=False)
    assert beams.shape == (2, ids.shape[1] + 4) and greedy.shape == (2, ids.shape[1] + 1)


def test_training_and_labels_keep_every_visual_token():
    ids, mask = _batch([ROW_A])
    model = _model("saisa", "sdpa", {"keep_ratio": 0.25, "method": "fastv", "score_layer": 0})
    pixels = _pixels([ROW_A])
    with_pruning = model(ids, pixel_values=pixels, attention_mask=mask, labels=ids)
    model.config.visual_pruning = None
    without = model(ids, pixel_values=pixels, attention_mask=mask, labels=ids)
    assert torch.equal(with_pruning.logits, without.logits)


def test_validation_errors():
    for bad in (0, -0.5, 1.5, "half", True):
        with pytest.raises(ValueError, match="keep_ratio"):
            VisualPruning(bad)
    with pytest.raises(ValueError, match="method"):
        VisualPruning(0.5, "random")
    with pytest.raises(ValueError, match="score_layer"):
        VisualPruning(0.5, score_layer=-1)
    with pytest.raises(ValueError, match="unknown"):
        VisualPruning.from_config({"keep_ratio": 0.5, "ratio": 1})
    with pytest.raises(ValueError, match="keep_ratio"):
        VisualPruning.from_config({"method": "fastv"})
    with pytest.raises(ValueError, match="None, a dict"):
        VisualPruning.from_config(0.5)
    model = tiny_model("saisa")
    with pytest.raises(ValueError, match="past the LLM's 3 layers"):
        SaisaConfig(text_config=model.config.text_config, visual_pruning={"keep_ratio": 0.5, "score_layer": 3})
    with pytest.raises(ValueError, match="per_layer"):
        SaisaConfig(architecture="llava", visual_pruning={"keep_ratio": 0.5, "method": "per_layer"})
    llava = tiny_model("naavit")
    llava.config.visual_pruning = {"keep_ratio": 0.5, "method": "per_layer"}  # read at the forward
    with pytest.raises(ValueError, match="per_layer"):
        llava(torch.tensor([[1, IMG, 5]]), pixel_values=images(1))
    assert [VisualPruning(r).kept(v) for r, v in [(0.25, 16), (0.3, 10), (0.01, 5), (1.0, 7), (0.1, 576)]] == [
        4,
        3,
        1,
        7,
        58,
    ]


def test_config_round_trip(tmp_path):
    model = _model("saisa", "sdpa", {"keep_ratio": 0.5, "method": "per_layer", "score_layer": 2})
    model.save_pretrained(tmp_path)
    loaded = SaisaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.visual_pruning == {"keep_ratio": 0.5, "method": "per_layer", "score_layer": 2}
    assert loaded.config.pruning == VisualPruning(0.5, "per_layer", 2)
    assert SaisaConfig(visual_pruning=VisualPruning(0.25)).to_dict()["visual_pruning"] == {
        "keep_ratio": 0.25,
        "method": "fastv",
        "score_layer": 2,
    }


def test_pruned_flops_and_kv_bytes_match_hand_equations():
    h, m, L, heads, kv, hd, d, v, t = 8, 16, 4, 2, 1, 4, 6, 10, 5
    dims = ModelDims("tiny", h, m, L, heads, kv, hd, d, v)
    qd, kvd = heads * hd, kv * hd
    lin = 2 * h * (2 * qd + 2 * kvd) + 6 * h * m  # Q, K, V, O and the gated FFN, per token
    proj = lambda n: 2 * n * (d * h + h * h)  # noqa: E731
    fastv = VisualPruning(0.3, "fastv", 1)  # layers 0, 1 full, layers 2, 3 on k = 3
    k, full, rest = 3, 2, 2
    llava = full * ((t + v) * lin + 4 * (t + v) ** 2 * qd) + rest * ((t + k) * lin + 4 * (t + k) ** 2 * qd) + proj(v)
    assert prefill_flops(dims, "llava", t, pruning=fastv)["total"] == llava
    naavit = full * ((t + v) * lin + 4 * (t * (t + v) + v) * qd) + rest * ((t + k) * lin + 4 * (t * (t + k) + k) * qd)
    assert prefill_flops(dims, "naavit", t, pruning=fastv)["total"] == naavit + proj(v)
    saisa_layer = lambda n: t * lin + 2 * n * h * 2 * kvd + 4 * t * (t + n) * qd + proj(n)  # noqa: E731
    assert prefill_flops(dims, "saisa", t, pruning=fastv)["total"] == full * saisa_layer(v) + rest * saisa_layer(k)
    # per layer: the prefill runs in full
    per_layer = VisualPruning(0.3, "per_layer", 1)
    assert prefill_flops(dims, "saisa", t, pruning=per_layer) == prefill_flops(dims, "saisa", t)
    # r = 1 and two images
    assert prefill_flops(dims, "llava", t, images=2, pruning=VisualPruning(1.0)) == prefill_flops(
        dims, "llava", t, images=2
    )
    for arch, pruning in [("llava", fastv), ("saisa", fastv), ("saisa", per_layer)]:
        assert kv_cache_bytes(dims, arch, t, pruning=pruning) == 2 * kvd * 2 * L * (t + k)
    assert kv_cache_bytes(dims, "saisa", t) == 2 * kvd * 2 * L * (t + v)
    with pytest.raises(ValueError, match="flamingo"):
        prefill_flops(dims, "flamingo", t, pruning=fastv)
    with pytest.raises(ValueError, match="per_layer"):
        kv_cache_bytes(dims, "llava", t, pruning=per_layer)
