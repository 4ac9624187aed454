"""The model against independent references (issue #2, tests 1-8)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN as I
from conftest import hf_llava_with_weights_of, images, text_config, tiny_model, vision_config
from reference import reference_logits
from transformers import AutoModelForCausalLM, TextIteratorStreamer

from saisa import SaisaConfig, SaisaForConditionalGeneration
from saisa.compat import output_cache

ARCHS = ["saisa", "llava", "naavit"]
FAMILIES = ["llama", "qwen2", "qwen3"]


def _pad_batch(samples: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, samples))
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        span = slice(width - len(sample), width) if side == "left" else slice(0, len(sample))
        ids[row, span] = torch.tensor(sample)
        mask[row, span] = 1
    return ids, mask


# 1. naive reference from the equations --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_cache", [False, True])
def test_matches_naive_reference(arch, family, use_cache):
    model = tiny_model(arch, family)
    ids = torch.tensor([5, 6, I, 7, 8, I, 9, 10, 11])
    px = images(2)
    with torch.no_grad():
        expected = reference_logits(model, ids, px)
        got = model(ids[None], pixel_values=px, use_cache=use_cache).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 0.1  # not a trivially small signal


def test_shared_projector_matches_reference():
    model = tiny_model("saisa", shared_projector=True)
    assert not hasattr(model, "layer_projectors")
    ids = torch.tensor([5, I, 7, 8])
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids[None], pixel_values=images(1)).logits[0],
            reference_logits(model, ids, images(1)),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("vision", ["siglip"])
def test_siglip_tower_keeps_every_patch(vision):
    model = tiny_model("saisa", vision=vision)
    assert model.tokens_per_image == 16  # (16 / 4)^2 patches, no CLS to drop
    ids = torch.tensor([5, I, 7])
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids[None], pixel_values=images(1)).logits[0],
            reference_logits(model, ids, images(1)),
            atol=1e-5,
            rtol=1e-5,
        )


# 2. mixed batch == per-sample runs ---------------------------------------------------------------------------------
SAMPLES = [[5, 6, 7, 8, 9], [I, 5, 6], [5, I, 6, I, 7, 8], [I, I, 9]]
IMAGES_PER_SAMPLE = [0, 1, 2, 2]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_batch_equals_single_samples(arch, side):
    model = tiny_model(arch, "qwen2")
    px = images(sum(IMAGES_PER_SAMPLE))
    ids, mask = _pad_batch(SAMPLES, side)
    with torch.no_grad():
        batched = model(ids, pixel_values=px, attention_mask=mask).logits
        start = 0
        for row, (sample, n) in enumerate(zip(SAMPLES, IMAGES_PER_SAMPLE, strict=True)):
            single = model(torch.tensor([sample]), pixel_values=px[start : start + n] if n else None).logits[0]
            start += n
            torch.testing.assert_close(batched[row][mask[row].bool()], single, atol=1e-5, rtol=1e-5)


# 3. incremental decoding with the cache == full forward ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_equals_full_forward(arch):
    model = tiny_model(arch)
    ids, mask = _pad_batch([[5, I, 6, 7], [I, 8, I, 9, 10, 11]], "left")
    px = images(3)
    continuation = torch.tensor([[12, 13, 14, 15], [16, 17, 18, 19]])
    with torch.no_grad():
        out = model(ids, pixel_values=px, attention_mask=mask, use_cache=True)
        cache = output_cache(out)
        for step in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = model(continuation[:, step : step + 1], attention_mask=mask, cache=cache, use_cache=True)
            full_ids = torch.cat([ids, continuation[:, : step + 1]], 1)
            full = model(full_ids, pixel_values=px, attention_mask=mask, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_batched_multi_image_equals_greedy_loop(arch):
    model = tiny_model(arch)
    samples = [[5, I, 6, 7], [I, 8, I, 9, 10]]
    ids, mask = _pad_batch(samples, "left")
    px = images(3)
    with torch.no_grad():
        generated = model.generate(
            ids, pixel_values=px, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        start = 0
        for row, sample in enumerate(samples):
            n = sample.count(I)
            seq = torch.tensor([sample])
            for _ in range(6):  # greedy by full forwards, no cache, one sample at a time
                logits = model(seq, pixel_values=px[start : start + n], use_cache=False).logits[0, -1]
                seq = torch.cat([seq, logits.argmax().view(1, 1)], 1)
            start += n
            assert generated[row, -6:].tolist() == seq[0, -6:].tolist()


def test_generate_sampling_and_streamer():
    from threading import Thread

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(120)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    model = tiny_model("saisa")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    ids = torch.tensor([[5, I, 6]])
    kwargs = dict(pixel_values=images(1), max_new_tokens=5, do_sample=True, top_k=10, streamer=streamer, pad_token_id=0)
    thread = Thread(target=model.generate, args=(ids,), kwargs=kwargs)
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text.strip(), "the streamer received no text"


# 4. text only == the bare LLM -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_text_only_equals_bare_llm(arch):
    model = tiny_model(arch, "qwen3")
    bare = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    bare.model.load_state_dict(model.language_model.state_dict())
    bare.lm_head.load_state_dict(model.lm_head.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, bare(ids).logits)


# 5. llava == transformers' LlavaForConditionalGeneration -----------------------------------------------------------
def test_llava_equals_transformers_llava():
    model = tiny_model("llava")
    v = model.tokens_per_image
    hf = hf_llava_with_weights_of(model, image_token_index=3)

    ours_ids = torch.tensor([[5, 6, I, 7, 8, I, 9]])
    hf_ids = torch.tensor([[5, 6] + [3] * v + [7, 8] + [3] * v + [9]])
    px = images(2)
    with torch.no_grad():
        ours = model(ours_ids, pixel_values=px).logits[0]
        theirs = hf(input_ids=hf_ids, pixel_values=px).logits[0]
    text_rows = [0, 1, 2 + v, 3 + v, 4 + 2 * v]
    torch.testing.assert_close(ours[[0, 1, 3, 4, 6]], theirs[text_rows], atol=1e-5, rtol=1e-5)
    # at a placeholder: what the image's last visual token predicts
    torch.testing.assert_close(ours[[2, 5]], theirs[[1 + v, 3 + 2 * v]], atol=1e-5, rtol=1e-5)


# 6. locality of attention ---------------------------------------------------------------------------------------------
def test_naavit_visual_tokens_do_not_see_each_other():
    model = tiny_model("naavit")
    v = model.tokens_per_image
    captured, bump = {}, {"on": False}

    def perturb_first_visual_token(module, args, out):
        if bump["on"]:
            out = out.clone()
            out[:, 0] += 1.0
        return out

    hooks = [
        model.projector.register_forward_hook(perturb_first_visual_token),
        model.language_model.layers[-1].register_forward_hook(lambda m, args, out: captured.__setitem__("h", out)),
    ]
    ids = torch.tensor([[5, I, 6]])
    with torch.no_grad():
        model(ids, pixel_values=images(1))
        before = captured["h"][0].clone()  # (v + 3, h): the visual block comes first
        bump["on"] = True
        model(ids, pixel_values=images(1))
        after = captured["h"][0]
    for hook in hooks:
        hook.remove()
    changed = (before - after).abs().amax(-1) > 1e-6
    assert changed[0] and not changed[1:v].any()  # no other visual token moved, through all layers
    assert changed[v + 2]  # text after the image sees the change


def test_llava_visual_tokens_do_see_each_other():
    """The same probe on LLaVA must move later visual tokens, or the NAAViT test above proves nothing."""
    model = tiny_model("llava")
    captured = {}
    hook = model.language_model.layers[-1].register_forward_hook(lambda m, args, out: captured.__setitem__("h", out))
    ids = torch.tensor([[5, I, 6]])
    px = images(1)
    with torch.no_grad():
        model(ids, pixel_values=px)
        before = captured["h"][0].clone()
        bump_first = (torch.arange(model.tokens_per_image) == 0)[None, :, None]  # (1, v, 1)
        handle = model.projector.register_forward_hook(lambda m, args, out: out + bump_first)
        model(ids, pixel_values=px)
        handle.remove()
    hook.remove()
    assert ((before - captured["h"][0]).abs().amax(-1) > 1e-6)[1 : model.tokens_per_image].all()


def test_saisa_text_before_an_image_does_not_see_it():
    model = tiny_model("saisa")
    ids = torch.tensor([[5, 6, 7, I, 8, 9]])
    with torch.no_grad():
        a = model(ids, pixel_values=images(1, seed=1)).logits[0]
        b = model(ids, pixel_values=images(1, seed=2)).logits[0]
    assert torch.equal(a[:3], b[:3])
    assert (a[4:] - b[4:]).abs().max() > 1e-4


# 7. persistence and gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(arch, tmp_path):
    model = tiny_model(arch, "qwen2")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = SaisaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, I, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=images(1)).logits, loaded(ids, pixel_values=images(1)).logits)


def test_save_load_with_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    config = SaisaConfig(
        text_config=text_config("llama", tie_word_embeddings=True), vision_config=vision_config(), image_token_id=I
    )
    model = SaisaForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    loaded = SaisaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.language_model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[5, I, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=images(1)).logits, loaded(ids, pixel_values=images(1)).logits)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_every_projector_and_the_llm(checkpointing):
    model = tiny_model("saisa").train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.tensor([[5, I, 6, 7, 8], [I, 9, 10, 11, 12]])
    out = model(ids, pixel_values=images(2), labels=ids)
    out.loss.backward()
    for projector in model.layer_projectors:
        assert projector.linear_1.weight.grad is not None and projector.linear_1.weight.grad.abs().sum() > 0
    assert model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.tensor([[5, I, 6, 7, 8], [I, 9, 10, 11, 12]])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("saisa").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, pixel_values=images(2), labels=ids).loss.backward()
        grads.append(model.layer_projectors[1].linear_1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_labels_after_an_image_are_not_trained_in_saisa():
    model = tiny_model("saisa")
    ids = torch.tensor([[5, I, 6, 7]])
    labels = torch.tensor([[-100, -100, 6, 7]])
    with torch.no_grad():
        out = model(ids, pixel_values=images(1), labels=labels)
        logits = out.logits[0]
    # only the prediction of 7 (from 6) counts: 6 follows the image and no query predicts it
    expected = torch.nn.functional.cross_entropy(logits[2:3], torch.tensor([7]))
    torch.testing.assert_close(out.loss, expected)


# 8. clear errors ------------------------------------------------------------------------------------------------------
def test_error_placeholder_count_mismatch():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"2 image placeholder.*1 image"):
        model(torch.tensor([[5, I, I]]), pixel_values=images(1))
    with pytest.raises(ValueError, match=r"1 image placeholder.*0 image"):
        model(torch.tensor([[5, I]]))


def test_error_wrong_image_shape():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 16, 16\)"):
        model(torch.tensor([[5, I]]), pixel_values=torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(torch.tensor([[5, I]]), pixel_values=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("arch", ARCHS)
def test_position_ids_are_checked_against_the_images_places(arch):
    model = tiny_model(arch)  # 16 tokens per image
    ids = torch.tensor([[5, I, 7, 8]])
    with torch.no_grad():
        expected = model(ids, pixel_values=images(1)).logits
        # the image takes positions 1..16 (its placeholder column: the first), so the text after it starts at 17
        given = model(ids, pixel_values=images(1), position_ids=torch.tensor([[0, 1, 17, 18]])).logits
        torch.testing.assert_close(given, expected, atol=0, rtol=0)
        with pytest.raises(ValueError, match="position_ids differ from the positions the model computes"):
            model(ids, pixel_values=images(1), position_ids=torch.arange(4)[None])  # one position per column
        with pytest.raises(ValueError, match=r"position_ids must be \(batch, seq\)"):
            model(ids, pixel_values=images(1), position_ids=torch.arange(3)[None])
        prefill = model(ids, pixel_values=images(1), use_cache=True)
        step = dict(past_key_values=output_cache(prefill), use_cache=True)
        next_ids = torch.tensor([[9]])
        model(next_ids, position_ids=torch.tensor([[19]]), **step)  # counting on from the cache
        with pytest.raises(ValueError, match="position_ids differ"):
            model(next_ids, position_ids=torch.tensor([[4]]), **step)


def test_error_unsupported_backbone():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported LLM backbone 'gpt2'"):
        SaisaForConditionalGeneration(SaisaConfig(text_config=GPT2Config(), vision_config=vision_config()))


def test_error_sequence_too_long():
    model = tiny_model()  # max_position_embeddings 512, 16 tokens per image
    ids = torch.tensor([[5] + [I] * 32])
    with pytest.raises(ValueError, match="sequence too long: 513 positions"):
        model(ids, pixel_values=images(32))


def test_error_unknown_architecture():
    with pytest.raises(ValueError, match="architecture must be one of"):
        SaisaConfig(architecture="flamingo")


@pytest.mark.parametrize("arch", ["saisa", "llava", "naavit"])
@pytest.mark.parametrize("training", [False, True], ids=["prefill+decode", "training"])
def test_every_input_reaches_the_models_device(arch, training):
    """The model on the `meta` device, every input on the CPU (as a user's batch on the host, or generate()'s
    pixel_values): any input left behind makes an op mix devices and raise."""
    model = tiny_model(arch).to("meta").train(training)
    ids = torch.tensor([[3, I, 6, 7, 8], [0, 3, 6, I, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=images(2), labels=ids, use_cache=not training)
    assert out.logits.device.type == "meta" and out.loss.device.type == "meta"
    if not training:
        step = model(
            input_ids=torch.tensor([[5], [5]]),
            attention_mask=torch.cat([mask, mask[:, :1]], 1),
            past_key_values=output_cache(out),
            use_cache=True,
        )
        assert step.logits.shape == (2, 1, 120) and step.logits.device.type == "meta"
