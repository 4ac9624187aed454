"""`saisa serve` with high resolution and video (`saisa.processing.views`): an image_url of a tiling processor becomes
its base view and tiles, a `{"type": "video", "video": [frames]}` part its sampled frames, and the answer is
`generate`'s on the processor's own inputs for every architecture; hostile videos are refused up front, naming the
problem, and the server goes on serving."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import tiny_chat_processor, tiny_model
from PIL import Image
from test_images import png_header

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_serving import _running  # noqa: E402

from saisa.processing import SaisaProcessor  # noqa: E402
from saisa.processing.views import NUM_FRAMES, anyres_grid_pinpoints  # noqa: E402
from saisa.serving.protocol import ServerLimits  # noqa: E402
from saisa.serving.server import create_app  # noqa: E402

MAX_TOKENS = 8
HEADERS = {"Content-Type": "application/json"}


def _tiling() -> SaisaProcessor:
    base = tiny_chat_processor()
    return SaisaProcessor(
        base.tokenizer,
        base.image_processor,
        chat_template=base.chat_template,
        image_grid_pinpoints=anyres_grid_pinpoints(16, 4),
    )


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8))


def _url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _raw_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


WIDE = _picture(0, (40, 16))  # 1 + 3 views: a row of 3 tiles
FRAMES = [_picture(10 + i, (20, 12)) for i in range(NUM_FRAMES + 3)]  # more than the processor keeps


def _request(parts: list[dict]) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "what is this ?"}]}]


def _expected(model, processor, parts: list[dict]) -> tuple[str, int]:
    """generate's greedy answer on the processor's inputs for the same conversation, and the positions its prompt
    takes (each view v)."""
    inputs = processor.apply_chat_template(
        _request(parts), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    ids = inputs["input_ids"][0]
    positions = len(ids) + int((ids == processor.image_token_id).sum()) * (model.tokens_per_image - 1)
    return processor.decode(out[0, len(ids) :], skip_special_tokens=True).strip(), positions


@pytest.fixture(scope="module")
def tiled():
    model, processor = tiny_model("saisa"), _tiling()
    limits = ServerLimits(max_views=16, max_video_frames=32)
    with _running(create_app(model, processor, model_name="tiny", limits=limits)) as url:
        yield {"model": model, "processor": processor, "url": url}


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=json.dumps(body).encode(), headers=HEADERS, timeout=60)


@pytest.mark.parametrize("architecture", ["saisa", "llava", "naavit"])
def test_a_tiled_image_and_a_video_answer_as_generate(architecture):
    model, processor = tiny_model(architecture), _tiling()
    assert processor.num_views(WIDE.size) == 4 and len(FRAMES) > NUM_FRAMES
    cases = {
        "tiled image": ([{"type": "image", "image": WIDE}], [{"type": "image_url", "image_url": {"url": _url(WIDE)}}]),
        "video": ([{"type": "video", "video": FRAMES}], [{"type": "video", "video": [_url(f) for f in FRAMES]}]),
    }
    cases["video then tiled image"] = tuple(
        video + image for video, image in zip(cases["video"], cases["tiled image"], strict=True)
    )
    with _running(create_app(model, processor, model_name="tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        for name, (reference, sent) in cases.items():
            expected, positions = _expected(model, processor, reference)
            reply = client.chat.completions.create(
                model="tiny", messages=_request(sent), max_tokens=MAX_TOKENS, temperature=0
            )
            assert expected and reply.choices[0].message.content.strip() == expected, name
            views = {"tiled image": 4, "video": NUM_FRAMES, "video then tiled image": 4 + NUM_FRAMES}[name]
            assert positions > views * model.tokens_per_image  # every view is in the reference's prompt
            assert reply.usage.prompt_tokens == positions, name


def test_frames_that_sampling_skips_are_never_decoded(tiled):
    """10 frames keep 8 (round(linspace(0, 9, 8)): frames 2 and 7 are skipped); a frame whose header is fine but
    holds no pixels passes where it is skipped and is a 400 where it is kept."""
    frames = [_url(f) for f in FRAMES[:10]]
    broken = _raw_url(png_header(20, 12))
    skipped = [broken if i == 2 else frame for i, frame in enumerate(frames)]
    reply = _post(tiled["url"], _body([{"type": "video", "video": skipped}]))
    assert reply.status_code == 200, reply.text
    kept = [broken if i == 3 else frame for i, frame in enumerate(frames)]
    reply = _post(tiled["url"], _body([{"type": "video", "video": kept}]))
    assert (
        reply.status_code == 400 and "messages[0].content[0]: cannot decode a frame" in reply.json()["error"]["message"]
    )


def _body(parts: list[dict]) -> dict:
    return {"model": "tiny", "messages": _request(parts), "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("ten_thousand_frames", "10000 frames exceed this server's limit of 32 per video"),
        ("no_frames", "the video has no frames"),
        ("not_a_list", "a video part needs 'video': a list of frames"),
        ("frame_not_a_string", "messages[0].content[0].video[1]: a frame must be an image URL string"),
        ("frame_not_an_image", "cannot decode image messages[0].content[0].video[1]"),
        ("frame_too_large", "refusing image messages[0].content[0].video[0]"),
        ("video_url", "video_url parts (video files) are not decoded by this server; send the frames"),
        ("too_many_views", "make 20 views"),
        ("video_placeholder_typed", "the text holds '<video>'"),
    ],
)
def test_hostile_videos_are_refused_up_front_and_the_server_goes_on(tiled, case, fragment):
    frame = _url(FRAMES[0])
    junk = _raw_url(b"junk")
    parts = {
        "ten_thousand_frames": [{"type": "video", "video": ["x"] * 10_000}],
        "no_frames": [{"type": "video", "video": []}],
        "not_a_list": [{"type": "video", "video": frame}],
        "frame_not_a_string": [{"type": "video", "video": [frame, {"url": frame}]}],
        "frame_not_an_image": [{"type": "video", "video": [frame, junk]}],
        "frame_too_large": [{"type": "video", "video": [_raw_url(png_header(30_000, 30_000))]}],
        "video_url": [{"type": "video_url", "video_url": {"url": "file:///clip.mp4"}}],
        # 8 kept frames + 3 tiled images of 4 views: 20 views against the limit of 16, refused from headers
        "too_many_views": [{"type": "video", "video": [frame] * 9}]
        + [{"type": "image_url", "image_url": {"url": _raw_url(png_header(40, 16))}}] * 3,
        "video_placeholder_typed": [{"type": "text", "text": "what is in <video> ?"}],
    }[case]
    start = time.perf_counter()
    reply = _post(tiled["url"], _body(parts))
    assert reply.status_code == 400, reply.text
    assert fragment in reply.json()["error"]["message"]
    assert time.perf_counter() - start < 2  # refused before any work
    healthy = _post(tiled["url"], _body([{"type": "video", "video": [frame] * 3}]))
    assert healthy.status_code == 200, healthy.text


def test_serve_max_tiles_tiles_a_checkpoint_without_pinpoints(tmp_path, monkeypatch):
    import argparse

    from saisa.cli import serve
    from saisa.serving import http

    model, processor = tiny_model("saisa"), tiny_chat_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    served = []
    monkeypatch.setattr(http, "run_server", lambda app, **kwargs: served.append(app))
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert serve.run(parser.parse_args([str(tmp_path), "--max-tiles", "4", "--max-views", "12"])) == 0
    preparer = served[0].state.preparer
    assert preparer.processor.image_grid_pinpoints == anyres_grid_pinpoints(16, 4)
    assert preparer.processor.num_views(WIDE.size) == 4 and preparer.limits.max_views == 12


def test_a_chat_session_with_tiled_images_reuses_its_cache_and_answers_as_generate():
    from saisa.serving.chat import ChatSession

    model, processor = tiny_model("saisa"), _tiling()
    first, second = WIDE, _picture(1, (32, 32))  # 4 views, then 5
    session = ChatSession(model, processor, max_new_tokens=5)
    session.ask("what is this ?", [first])
    before = session.ids.shape[1]
    answer = session.ask("what ?", [second])
    prompt = processor.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[first, second], return_tensors="pt")
    assert len(inputs["pixel_values"]) == 4 + 5
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() == answer
    assert session.last_new_tokens == inputs["input_ids"].shape[1] - before  # the cache was reused


@pytest.mark.parametrize("architecture", ["saisa", "llava"])
def test_a_pruning_server_answers_as_generate_with_that_pruning(architecture):
    model, processor = tiny_model(architecture, seed=3), _tiling()  # a seed whose answers pruning changes
    parts = ([{"type": "image", "image": WIDE}], [{"type": "image_url", "image_url": {"url": _url(WIDE)}}])
    with _running(create_app(model, processor, model_name="tiny", visual_pruning={"keep_ratio": 0.1})) as url:
        assert model.config.visual_pruning["keep_ratio"] == 0.1
        expected, _ = _expected(model, processor, parts[0])
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="tiny", messages=_request(parts[1]), max_tokens=MAX_TOKENS, temperature=0
        )
        assert expected and reply.choices[0].message.content.strip() == expected
    model.config.visual_pruning = None
    unpruned, _ = _expected(model, processor, parts[0])
    assert unpruned != expected  # the pruning changed the answer: the server did prune


def test_a_pruning_the_model_cannot_take_is_refused_before_serving():
    with pytest.raises(ValueError, match="'per_layer' needs SAISA's per-layer visual K/V"):
        create_app(tiny_model("llava"), _tiling(), visual_pruning={"keep_ratio": 0.5, "method": "per_layer"})
