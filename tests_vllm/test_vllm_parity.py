"""vLLM (in-process engine, fp32, eager unless a test says otherwise) against our transformers model holding the same
weights: same greedy tokens, same log-probabilities, with images anywhere in the prompt, chunked prefill, prefix
caching, every backbone family and vision encoder, and the LLaVA-1.5 and NAAViT baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_checkpoint, start_llm, stop_llm, tiny_model
from PIL import Image
from vllm import SamplingParams

from saisa.processing import SaisaProcessor

MAX_TOKENS = 6
TOP = 5  # compare the top-5 log-probabilities of every generated position, not only the chosen token's
TOLERANCE = 1e-4


def image(seed: int, size=(20, 16)) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array)  # not square: LLaVA-1.5's pad to square runs


CASES = {
    "one image": ("user: <image> what is this ?\nassistant:", [image(1)]),
    "text image text image": ("user: what is this <image> and this <image> ?\nassistant:", [image(2), image(3)]),
    "text only": ("user: what is this ?\nassistant:", []),
}


def request(prompt: str, images: list) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt}


def reference(model, folder, prompt: str, images: list) -> tuple[list[int], list[torch.Tensor]]:
    """Our model's greedy tokens and, per position, its log-probabilities from the raw logits."""
    inputs = SaisaProcessor.from_pretrained(folder)(prompt, images=images or None)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, [torch.log_softmax(logits[0].double(), -1) for logits in out.logits]


def assert_same(model, folder, output, prompt: str, images: list) -> None:
    tokens, logprobs = reference(model, folder, prompt, images)
    completion = output.outputs[0]
    assert list(completion.token_ids) == tokens
    worst = max(
        abs(entry.logprob - logprobs[step][token].item())
        for step, position in enumerate(completion.logprobs)
        for token, entry in position.items()
    )
    print(f"{prompt!r}: {len(tokens)} tokens equal, max |dlogprob| {worst:.2e}")
    assert worst < TOLERANCE


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP, **kwargs)


@pytest.fixture(scope="module")
def saisa_llama(tmp_path_factory):
    model = tiny_model("saisa", "llama", "clip")
    return model, save_checkpoint(model, tmp_path_factory.mktemp("saisa_llama"))


@pytest.fixture(scope="module")
def plain_llm(saisa_llama):
    llm = start_llm(saisa_llama[1])
    yield llm
    stop_llm(llm)


def test_prompts_expand_each_image_to_its_visual_tokens(saisa_llama, plain_llm):
    model, folder = saisa_llama
    prompt, images = CASES["text image text image"]
    output = plain_llm.generate(request(prompt, images), greedy())[0]
    ids = SaisaProcessor.from_pretrained(folder).tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expanded = [t for i in ids for t in ([i] * model.tokens_per_image if i == model.config.image_token_id else [i])]
    assert output.prompt_token_ids == expanded


def test_one_image_interleaved_images_and_text_only_match_our_model(saisa_llama, plain_llm):
    model, folder = saisa_llama
    outputs = plain_llm.generate([request(*case) for case in CASES.values()], greedy())  # one batch
    for output, (prompt, images) in zip(outputs, CASES.values(), strict=True):
        assert_same(model, folder, output, prompt, images)


def test_another_image_changes_the_answer(saisa_llama, plain_llm):
    prompt, _ = CASES["one image"]
    first, second = plain_llm.generate([request(prompt, [image(1)]), request(prompt, [image(7)])], greedy())
    a = [p[t].logprob for p, t in zip(first.outputs[0].logprobs, first.outputs[0].token_ids, strict=True)]
    b = [p[t].logprob for p, t in zip(second.outputs[0].logprobs, second.outputs[0].token_ids, strict=True)]
    assert first.outputs[0].token_ids != second.outputs[0].token_ids or max(np.abs(np.subtract(a, b))) > 1e-3


def test_a_prompt_ending_with_an_image_is_refused(plain_llm):
    with pytest.raises(ValueError, match="ends with an image"):
        plain_llm.generate(request("user: what is this ? <image>", [image(1)]), greedy())


def test_chunked_prefill_smaller_than_an_image_and_prefix_caching_match(saisa_llama):
    model, folder = saisa_llama
    # 8-token chunks of one request at a time: every 16-token image is split across steps, and some steps hold image
    # rows only (no text row at all); 32-token blocks (the CPU minimum) go to the prefix cache
    llm = start_llm(folder, max_num_batched_tokens=8, enable_prefix_caching=True, block_size=32, max_num_seqs=1)
    try:
        for _ in range(2):  # the second round reads the first round's blocks from the prefix cache
            outputs = llm.generate([request(*case) for case in CASES.values()], greedy())
            for output, (prompt, images) in zip(outputs, CASES.values(), strict=True):
                assert_same(model, folder, output, prompt, images)
        assert outputs[1].num_cached_tokens >= 32, "the second round did not hit the prefix cache"
    finally:
        stop_llm(llm)


@pytest.mark.parametrize(
    "architecture, family, vision",
    [("saisa", "qwen2", "siglip"), ("saisa", "qwen3", "efficientnet"), ("llava", "llama", "clip")],
)
def test_other_backbones_encoders_and_the_llava_baseline_match(tmp_path, architecture, family, vision):
    model = tiny_model(architecture, family, vision)
    size = model.vision_tower.preprocessing.image_size
    folder = save_checkpoint(model, tmp_path)
    prompt = CASES["text image text image"][0]
    images = [image(2, (size + 4, size)), image(3, (size, size))]
    llm = start_llm(folder)
    try:
        assert_same(model, folder, llm.generate(request(prompt, images), greedy())[0], prompt, images)
    finally:
        stop_llm(llm)


def test_naavit_matches_our_model_with_whole_prompt_prefills(tmp_path):
    """NAAViT's visual rows see the text before them and themselves only: vLLM's causal kernel alone would give the
    LLaVA mask, so equal tokens and log-probabilities show the recomputed rows are used (the hook off fails this).
    vLLM's default compiled mode: steps with image rows must leave the compiled decoder, which would skip the hook."""
    model = tiny_model("naavit", "llama", "clip")
    folder = save_checkpoint(model, tmp_path)
    llm = start_llm(folder, enforce_eager=False, enable_chunked_prefill=False, enable_prefix_caching=False)
    try:
        outputs = llm.generate([request(*case) for case in CASES.values()], greedy())  # one batch, several prompts
        for output, (prompt, images) in zip(outputs, CASES.values(), strict=True):
            assert_same(model, folder, output, prompt, images)
    finally:
        stop_llm(llm)


def test_naavit_with_chunked_prefill_or_prefix_caching_is_refused_at_load(tmp_path):
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    folder = save_checkpoint(tiny_model("naavit"), tmp_path)
    try:
        with pytest.raises(Exception, match="whole-prompt prefills"):  # vLLM may wrap the model's ValueError
            stop_llm(start_llm(folder))  # vLLM's defaults: both on
    finally:
        cleanup_dist_env_and_memory()  # the half-started engine's process groups
