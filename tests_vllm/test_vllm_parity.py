"""vLLM (in-process engine, fp32, eager unless a test says otherwise) against our transformers model holding the same
weights: same greedy tokens, same log-probabilities, with images anywhere in the prompt, chunked prefill, prefix
caching, every backbone family and vision encoder, AnyRes-tiled images and videos, and the LLaVA-1.5 and NAAViT
baselines."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, save_checkpoint, start_llm, stop_llm, tiny_model
from PIL import Image
from vllm import SamplingParams

from saisa.integrations.vllm.processing import SaisaPromptError
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


def request(prompt: str, images: list, videos: list = ()) -> dict:
    data = {"image": images} if images else {}
    if videos:
        data["video"] = list(videos)
    return {"prompt": prompt, "multi_modal_data": data} if data else {"prompt": prompt}


def reference(
    model, folder, prompt: str, images: list, length: int = 0, videos: list = ()
) -> tuple[list[int], list[torch.Tensor]]:
    """Our model's greedy tokens (exactly `length` if given: EOS masked until then) and, per position, its
    log-probabilities from the raw logits."""
    processor = SaisaProcessor.from_pretrained(folder)
    inputs = processor(text=prompt, images=images or None, videos=list(videos) or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=length or MAX_TOKENS,
            min_new_tokens=length,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, [torch.log_softmax(logits[0].double(), -1) for logits in out.logits]


def assert_same(model, folder, output, prompt: str, images: list, length: int = 0, videos: list = ()) -> None:
    tokens, logprobs = reference(model, folder, prompt, images, length, videos)
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


def test_a_tokenizer_without_a_video_token_takes_no_video(plain_llm):
    """Its `<video>` would be several ids, unmatched: vLLM refuses the video (a 400 from its server) before any
    processing, and profiles no video at start-up."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="At most 0 video"):
        plain_llm.generate(request("user: <video> what ?\nassistant:", [], [video(3, 1)]), greedy())
    assert plain_llm.generate(request(*CASES["one image"]), greedy())[0].outputs[0].token_ids


def test_a_prompt_ending_with_an_image_is_refused(plain_llm):
    with pytest.raises(ValueError, match="ends with an image"):
        plain_llm.generate(request("user: what is this ? <image>", [image(1)]), greedy())


@pytest.mark.parametrize(
    "prompt, images, message",
    [
        ("user: <image> hello", 0, "1 <image> token(s) for 0 image(s)"),
        ([3, IMAGE_TOKEN, 6], 0, "1 <image> token(s) for 0 image(s)"),
        ("user: <image> hello", 2, "1 <image> token(s) for 2 image(s)"),  # vLLM's own assert (a 500) at c7ea9dc
        ("user: <image> <image> hello", 1, "2 <image> token(s) for 1 image(s)"),
        ([3, *[IMAGE_TOKEN] * 15, 6], 1, "15 <image> token(s) for 1 image(s)"),
        # already expanded (v = 16): vLLM 0.32 would expand the first again and leave 15 ids past the vocabulary
        ([3, *[IMAGE_TOKEN] * 16, 6], 1, "16 <image> token(s) for 1 image(s)"),
    ],
)
def test_placeholders_and_images_must_match_before_the_engine(plain_llm, prompt, images, message):
    """Refused in the frontend with the plugin's 400 error: at c7ea9dc the unmatched ones reached the engine (the
    <image> id is the LLM's vocabulary size) and stopped it. The engine then still answers."""
    from saisa.integrations.vllm.processing import SaisaPromptError

    key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
    bad = {key: prompt, "multi_modal_data": {"image": [image(i) for i in range(images)]}} if images else {key: prompt}
    with pytest.raises(SaisaPromptError, match=re.escape(message)):
        plain_llm.generate(bad, greedy())
    assert plain_llm.generate(request(*CASES["one image"]), greedy())[0].outputs[0].token_ids


def test_ids_past_the_llm_vocabulary_are_refused_even_where_the_tokenizer_has_them(plain_llm):
    """vLLM's own check lets through any id its tokenizer has; a tokenizer may have more than the LLM's embedding
    rows (added tokens, our <image>). Checked on the API server's processor directly: the tiny tokenizer ends at
    <image>, so vLLM refuses any larger id itself first."""
    from saisa.integrations.vllm.processing import SaisaPromptError

    processor = plain_llm.llm_engine.input_processor.renderer.mm_processor
    processor.check_prompt([3, IMAGE_TOKEN - 1, 6])
    with pytest.raises(SaisaPromptError, match=f"token id {IMAGE_TOKEN + 1} at position 1 is outside"):
        processor.check_prompt([3, IMAGE_TOKEN + 1, 6])
    with pytest.raises(SaisaPromptError, match="token id -1 at position 0"):
        processor.check_prompt([-1, 6])


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


def video(frames: int, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames, not square."""
    return np.random.default_rng(seed).integers(0, 255, (frames, 12, 20, 3), dtype=np.uint8)


# a wide image (1 + 3 views), a square one (1 + 4), a video of 11 frames (8 kept), together and apart
VIEWS = {
    "tiled image": ("user: <image> what is this ?\nassistant:", [image(4, (40, 16))], []),
    "video": ("user: what is <video> this ?\nassistant:", [], [video(11, 5)]),
    "video and tiled images": (
        "user: <video> what <image> is <image> this ?\nassistant:",
        [image(6, (32, 32)), image(7, (40, 16))],
        [video(3, 8)],
    ),
}


@pytest.mark.parametrize(
    "architecture, settings",
    [
        ("saisa", {}),
        # 8-token chunks: an item's views x v placeholders split across steps; 32-token blocks to the prefix cache
        ("saisa", dict(max_num_batched_tokens=8, enable_prefix_caching=True, block_size=32, max_num_seqs=1)),
        ("llava", {}),
        ("naavit", dict(enable_chunked_prefill=False, enable_prefix_caching=False)),
    ],
)
def test_tiled_images_and_videos_match_our_model(tmp_path, architecture, settings):
    """Each image is its base view and tiles, each video its sampled frames, views x v positions in vLLM as in our
    model. The tokenizer has `<video>` as one token (LLaVA-NeXT-Video's and OneVision's do)."""
    from saisa.processing.views import anyres_grid_pinpoints

    model = tiny_model(architecture, "llama", "clip")
    size = model.vision_tower.preprocessing.image_size
    folder = save_checkpoint(model, tmp_path, image_grid_pinpoints=anyres_grid_pinpoints(size, 4))
    processor = SaisaProcessor.from_pretrained(folder)
    processor.tokenizer.add_tokens([processor.video_token], special_tokens=True)
    processor.save_pretrained(folder)
    llm = start_llm(folder, **settings)
    try:
        outputs = llm.generate([request(*case) for case in VIEWS.values()], greedy())  # one batch
        for output, (prompt, images, videos) in zip(outputs, VIEWS.values(), strict=True):
            assert_same(model, folder, output, prompt, images, videos=videos)
            expected = processor(text=prompt, images=images or None, videos=videos or None)["input_ids"][0]
            views = expected.count(processor.image_token_id)
            assert output.prompt_token_ids.count(processor.image_token_id) == views * model.tokens_per_image
        assert outputs[1].prompt_token_ids.count(processor.image_token_id) == 8 * model.tokens_per_image  # of 11
        with pytest.raises(SaisaPromptError, match="1 <video> placeholder"):
            llm.generate(request("user: <video> what ?\nassistant:", [], []), greedy())
        with pytest.raises(SaisaPromptError, match="0 <video> placeholder"):
            llm.generate(request("user: what ?\nassistant:", [], [video(3, 1)]), greedy())
    finally:
        stop_llm(llm)


# prompts with 0-3 images: at the start, back to back, between text
CROWD = [
    ("<image> what is this ?\nassistant:", 1),
    ("user: <image><image> and <image> ?\nassistant:", 3),
    ("user: what is this <image> and this <image> ?\nassistant:", 2),
    ("user: tell me\nassistant:", 0),
    ("user: x <image> y <image> z <image> w\nassistant:", 3),
    ("user: a <image> b\nassistant:", 1),
]


def test_naavit_matches_our_model_under_preemption(tmp_path, monkeypatch):
    """NAAViT's visual rows see the text before them and themselves only: vLLM's causal kernel alone would give the
    LLaVA mask, so equal tokens and log-probabilities show the recomputed rows are used (the hook off fails this).
    Six requests at once, 3 running at most and 6 KV blocks of 32: requests are preempted and recomputed, steps mix
    decodes with image prefills. vLLM's default compiled mode: image steps must leave the compiled decoder."""
    from vllm.v1.core.sched.scheduler import Scheduler

    preempted = []
    preempt = Scheduler._preempt_request
    monkeypatch.setattr(
        Scheduler, "_preempt_request", lambda self, req, *a, **k: preempted.append(req) or preempt(self, req, *a, **k)
    )
    model = tiny_model("naavit", "llama", "clip")
    folder = save_checkpoint(model, tmp_path)
    cases = [(prompt, [image(10 * i + j) for j in range(n)]) for i, (prompt, n) in enumerate(CROWD)]
    whole_prompts = dict(enable_chunked_prefill=False, enable_prefix_caching=False)
    tight = dict(max_model_len=128, max_num_batched_tokens=128, max_num_seqs=3, num_gpu_blocks_override=6)
    llm = start_llm(folder, enforce_eager=False, block_size=32, **whole_prompts, **tight)
    try:
        length = 24  # long enough to outgrow the KV blocks
        params = SamplingParams(max_tokens=length, min_tokens=length, temperature=0, logprobs=TOP)
        outputs = llm.generate([request(*case) for case in cases], params)
        for output, (prompt, images) in zip(outputs, cases, strict=True):
            assert_same(model, folder, output, prompt, images, length)
    finally:
        stop_llm(llm)
    assert preempted, "no request was preempted: the test lost its point"


def test_naavit_with_chunked_prefill_or_prefix_caching_is_refused_at_load(tmp_path):
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    folder = save_checkpoint(tiny_model("naavit"), tmp_path)
    try:
        with pytest.raises(Exception, match="whole-prompt prefills"):  # vLLM may wrap the model's ValueError
            stop_llm(start_llm(folder))  # vLLM's defaults: both on
    finally:
        cleanup_dist_env_and_memory()  # the half-started engine's process groups


def test_a_checkpoint_with_visual_pruning_is_refused_unless_overridden(tmp_path):
    """vLLM cannot prune (docs/views.md): serving such a checkpoint unpruned without a word would be a different
    model; overridden off, it is the same model as ours unpruned."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from saisa.model.pruning import VisualPruning

    model = tiny_model("saisa")
    model.config.set_visual_pruning(VisualPruning(0.5))
    folder = save_checkpoint(model, tmp_path)
    try:
        with pytest.raises(Exception, match="cannot apply"):  # vLLM may wrap the model's ValueError
            stop_llm(start_llm(folder))
    finally:
        cleanup_dist_env_and_memory()
    llm = start_llm(folder, hf_overrides={"visual_pruning": None})
    try:
        prompt, images = CASES["one image"]
        model.config.set_visual_pruning(None)
        assert_same(model, folder, llm.generate(request(prompt, images), greedy())[0], prompt, images)
    finally:
        stop_llm(llm)


def _vllm_config(scheduler: dict | None = None, kv_transfer_config=None) -> SimpleNamespace:
    """The parts of a VllmConfig NAAViT's load check reads, set for whole-prompt prefills unless changed."""
    whole = {"enable_chunked_prefill": False, "async_scheduling": False, "long_prefill_token_threshold": 0}
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(**{**whole, **(scheduler or {})}),
        cache_config=SimpleNamespace(enable_prefix_caching=False),
        kv_transfer_config=kv_transfer_config,
    )


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"scheduler": {"async_scheduling": True}}, "--no-async-scheduling"),  # vLLM's GPU default; CPU forces it off
        ({"scheduler": {"long_prefill_token_threshold": 24}}, "--long-prefill-token-threshold 0"),
        ({"kv_transfer_config": object()}, "--kv-transfer-config"),
    ],
)
def test_naavit_refuses_each_setting_that_lets_the_scheduler_split_a_prompt(change, flag):
    """Settings the CPU engine cannot take, checked on the config alone."""
    from saisa.integrations.vllm.model import _require_whole_prompt_prefills

    _require_whole_prompt_prefills(_vllm_config())
    with pytest.raises(ValueError, match=flag):
        _require_whole_prompt_prefills(_vllm_config(**change))


@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "PIECEWISE", "FULL_DECODE_ONLY", "NONE"])
def test_full_cuda_graphs_for_prefill_steps_are_refused(mode):
    """A full graph captured on a text-only batch would replay it for an image step, skipping the image code."""
    from vllm.config import CUDAGraphMode

    from saisa.integrations.vllm.model import _refuse_full_cuda_graphs_for_image_steps

    config = SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode]))
    if mode == "FULL":
        with pytest.raises(ValueError, match="full CUDA graphs"):
            _refuse_full_cuda_graphs_for_image_steps(config)
    else:
        _refuse_full_cuda_graphs_for_image_steps(config)


def test_prompt_spans_come_from_positions_and_a_split_prompt_is_caught():
    from saisa.integrations.vllm.model import _prompts_with_visual_rows

    # a decode row (position 9), a whole prompt [text, img, img, text], a decode row, a whole prompt [img, text]
    positions = torch.tensor([9, 0, 1, 2, 3, 30, 0, 1])
    is_visual = torch.tensor([False, False, True, True, False, False, True, False])
    assert _prompts_with_visual_rows(is_visual, positions) == [(1, 3), (6, 1)]  # up to each prompt's last image row
    split = torch.tensor([9, 4, 5, 6, 7, 30, 0, 1])  # the first prompt resumes at position 4: its text is elsewhere
    with pytest.raises(RuntimeError, match="not prefilled whole"):
        _prompts_with_visual_rows(is_visual, split)
