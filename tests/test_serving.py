"""The OpenAI-compatible server (driven by the official `openai` client on loopback) and the chat session."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import tiny_chat_processor, tiny_model
from PIL import Image
from test_images import png_header

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from saisa.model.image_kv_cache import ImageKVCache  # noqa: E402
from saisa.serving.chat import ChatSession  # noqa: E402
from saisa.serving.protocol import ServerLimits  # noqa: E402
from saisa.serving.server import create_app  # noqa: E402

MAX_TOKENS = 8
LONG = 400  # a request this long keeps the tiny model busy for a second or more


def _png(seed: int) -> tuple[Image.Image, str]:
    array = np.random.default_rng(seed).integers(0, 255, (20, 16, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def _running(app):
    """`app` served by uvicorn on a free loopback port, in a thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_model("saisa")
    model.image_kv_cache = ImageKVCache(2**24)
    processor = tiny_chat_processor()
    allowed = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (8, 8)).save(allowed / "ok.png")
    app = create_app(
        model,
        processor,
        model_name="tiny",
        api_key="secret",
        limits=ServerLimits(max_tokens=LONG, allowed_image_dir=allowed),
    )
    with _running(app) as url:
        yield {"model": model, "processor": processor, "url": url, "allowed": allowed, "app": app}


def _client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="secret", max_retries=0, timeout=60)


def _expected_ids(served, question: str, images: list[Image.Image], max_tokens: int = MAX_TOKENS) -> list[int]:
    """The greedy answer of `generate` for the request alone (the reference every served answer is held to)."""
    model, processor = served["model"], served["processor"]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt", images=images or None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return [t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in (0, 2)]


def _expected(served, question: str, images: list[Image.Image], max_tokens: int = MAX_TOKENS) -> str:
    ids = _expected_ids(served, question, images, max_tokens)
    return served["processor"].decode(ids, skip_special_tokens=True).strip()


def _messages(question: str, urls: list[str]):
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
            + [{"type": "text", "text": question}],
        }
    ]


def test_openai_client_non_streaming_and_streaming_equal_generate(served):
    client = _client(served)
    image, url = _png(0)
    expected = _expected(served, "what is this ?", [image])
    assert expected, "the tiny model produced nothing to compare"
    reply = client.chat.completions.create(
        model="tiny", messages=_messages("what is this ?", [url]), max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tiny", messages=_messages("what is this ?", [url]), max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip() == expected
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(served["url"] + "/health").json()["status"] == "ok"


def test_concurrent_load_has_no_failures_and_matches_single_requests(served):
    questions = [("what is this ?", 0), ("this is what ?", 1), ("what ?", None), ("is this ?", 2)]
    expected = {}
    for question, seed in questions:
        expected[question] = _expected(served, question, [_png(seed)[0]] if seed is not None else [])
    client = _client(served)

    def one_client(index: int) -> list[bool]:
        results = []
        for r in range(8):
            question, seed = questions[(index + r) % len(questions)]
            urls = [_png(seed)[1]] if seed is not None else []
            reply = client.chat.completions.create(
                model="tiny", messages=_messages(question, urls), max_tokens=MAX_TOKENS, temperature=0
            )
            results.append(reply.choices[0].message.content.strip() == expected[question])
        return results

    with ThreadPoolExecutor(16) as pool:
        outcomes = [ok for batch in pool.map(one_client, range(16)) for ok in batch]
    assert len(outcomes) == 128 and all(outcomes)
    health = httpx.get(served["url"] + "/health").json()
    assert health["batches_run"] < 128  # requests were batched
    assert health["image_kv_cache"]["hits"] > 0  # repeated images skipped the encoder


@pytest.mark.parametrize(
    "case, status, fragment",
    [
        ("bad_json", 400, "not valid JSON"),
        ("unknown_model", 404, "not found"),
        ("bad_image", 400, "cannot decode image"),
        ("too_many_tokens", 400, "exceeds this server's limit"),
        ("path_not_allowed", 403, "outside the allowed folder"),
        ("no_key", 401, "API key"),
        ("missing_messages", 400, "messages"),
    ],
)
def test_bad_requests_get_the_right_4xx(served, case, status, fragment):
    headers = {"Authorization": "Bearer secret", "Content-Type": "application/json"}
    good = {"model": "tiny", "messages": [{"role": "user", "content": "what ?"}], "max_tokens": 4}
    body = good
    if case == "bad_json":
        body = b"{not json"
    elif case == "unknown_model":
        body = {**good, "model": "gpt-9"}
    elif case == "bad_image":
        body = {
            **good,
            "messages": _messages("what ?", ["data:image/png;base64," + base64.b64encode(b"junk").decode()]),
        }
    elif case == "too_many_tokens":
        body = {**good, "max_tokens": 100000}
    elif case == "path_not_allowed":
        body = {**good, "messages": _messages("what ?", ["/etc/passwd"])}
    elif case == "no_key":
        headers = {"Content-Type": "application/json"}
    elif case == "missing_messages":
        body = {"model": "tiny"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(served["url"] + "/v1/chat/completions", content=content, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_local_image_under_the_allowed_folder_is_read(served):
    client = _client(served)
    reply = client.chat.completions.create(
        model="tiny", max_tokens=2, temperature=0, messages=_messages("what ?", [str(served["allowed"] / "ok.png")])
    )
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_chat_session_reuses_the_kv_of_earlier_turns():
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    image, _ = _png(3)
    session = ChatSession(model, processor, max_new_tokens=5)
    session.ask("what is this ?", [image])
    first_total = session.ids.shape[1]
    second = session.ask("what ?", [_png(4)[0]])
    # recomputing the whole conversation from scratch gives the same second answer
    prompt = processor.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt", images=[image, _png(4)[0]])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() == second
    assert session.last_new_tokens == inputs["input_ids"].shape[1] - first_total  # only the new turn was computed


# --- isolation, limits and the honest API (issue 13) ---------------------------------------------------------------

HEADERS = {"Authorization": "Bearer secret", "Content-Type": "application/json"}
LONG_QUESTION = ("is this ?", [1, 2])  # the tiny model's greedy answer to it runs to LONG tokens without an EOS


def _post(url: str, body, headers=HEADERS, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/v1/chat/completions", content=content, headers=headers, timeout=timeout)


def _body(question: str, seeds: list[int], **fields) -> dict:
    urls = [_png(seed)[1] for seed in seeds]
    return {
        "model": "tiny",
        "messages": _messages(question, urls),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **fields,
    }


def _sse(response: httpx.Response) -> list[dict]:
    events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def _png_header(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_header(width, height)).decode()


def test_image_placeholder_in_one_request_fails_only_that_request(served):
    """A literal <image> in one request's text fails that request alone: its batch-mates are not told the batch's
    image counts, nor refused."""
    healthy = [("what is this ?", [0]), ("what ?", []), ("this is what ?", [1, 2])]
    expected = [_expected(served, q, [_png(s)[0] for s in seeds]) for q, seeds in healthy]
    poisoned = _body("In HTML, what is the <image> tag ?", [3])
    with ThreadPoolExecutor(8) as pool:  # sent together, so the engine batches them
        futures = [pool.submit(_post, served["url"], _body(q, seeds)) for q, seeds in healthy * 2]
        bad = pool.submit(_post, served["url"], poisoned).result()
        replies = [f.result() for f in futures]
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["param"] == "messages[0].content[1]" and "<image>" in error["message"]
    assert "image(s) were given" not in error["message"]  # nothing about other requests
    assert [r.status_code for r in replies] == [200] * 6
    assert [r.json()["choices"][0]["message"]["content"].strip() for r in replies] == expected * 2


@pytest.fixture(scope="module")
def strict(served):
    """A second server over the same model with small limits and a short timeout."""
    limits = ServerLimits(
        max_body_bytes=100_000,
        max_images=2,
        max_image_pixels=100 * 100,
        max_aspect_ratio=10,
        max_tokens=LONG,
        request_timeout_s=0.2,
        allowed_image_dir=served["allowed"],
    )
    app = create_app(served["model"], served["processor"], model_name="tiny", limits=limits)
    with _running(app) as url:
        yield {**served, "url": url, "app": app}


def _nested(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    "case, status, fragment",
    [
        ("body_too_large", 413, "request body larger than"),
        ("body_too_large_chunked", 413, "request body larger than"),
        ("too_many_images_before_decoding", 400, "3 images exceed"),  # junk images: never decoded
        ("pixels_from_header", 400, "pixels exceed the limit of 10000"),
        ("decompression_bomb", 400, "refusing image messages[0].content[0]"),
        ("aspect_ratio", 400, "times as long as wide"),
        ("nul_in_path", 400, "NUL byte"),
        ("deep_json", 400, "nested too deeply"),
        ("tools", 400, "tools is not supported"),
        ("response_format", 400, "response_format is not supported"),
        ("presence_penalty", 400, "presence_penalty is not supported"),
        ("logit_bias", 400, "logit_bias is not supported"),
        ("unknown_field", 400, "best_of"),
        ("top_logprobs_alone", 400, "top_logprobs needs logprobs"),
        ("five_stops", 400, "at most 4"),
    ],
)
def test_limits_are_checked_before_the_work(strict, case, status, fragment):
    good = {"model": "tiny", "messages": [{"role": "user", "content": "what ?"}], "max_tokens": 4}
    junk = "data:image/png;base64," + base64.b64encode(b"junk").decode()
    body = {
        "body_too_large": {**good, "user": "x" * 200_000},
        "too_many_images_before_decoding": {**good, "messages": _messages("what ?", [junk] * 3)},
        "pixels_from_header": {**good, "messages": _messages("what ?", [_png_header(10_000, 10_000)])},
        "decompression_bomb": {**good, "messages": _messages("what ?", [_png_header(30_000, 30_000)])},
        "aspect_ratio": {**good, "messages": _messages("what ?", [_png_header(1, 5_000)])},
        "nul_in_path": {**good, "messages": _messages("what ?", [str(strict["allowed"] / "ok.png") + "\x00"])},
        "deep_json": _nested(40_000),
        "tools": {**good, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "response_format": {**good, "response_format": {"type": "json_object"}},
        "presence_penalty": {**good, "presence_penalty": 0.5},
        "logit_bias": {**good, "logit_bias": {"5": 10}},
        "unknown_field": {**good, "best_of": 2},
        "top_logprobs_alone": {**good, "top_logprobs": 2},
        "five_stops": {**good, "stop": ["a", "b", "c", "d", "e"]},
    }.get(case, good)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    if case == "body_too_large_chunked":  # no Content-Length: refused while it arrives
        content = iter([json.dumps(good).encode()[:-1], b', "user": "' + b"x" * 200_000 + b'"}'])
    start = time.perf_counter()
    response = httpx.post(strict["url"] + "/v1/chat/completions", content=content, headers=HEADERS, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert time.perf_counter() - start < 2  # refused up front, not after minutes of work


def test_pad_to_square_is_bounded_for_a_one_pixel_strip(served):
    """A 243-byte 1x40000 PNG would ask pad-to-square for a 40000² canvas (gigabytes); it is shrunk first."""
    from saisa.processing.images import MAX_PAD_SIDE, expand_to_square

    strip = Image.new("RGB", (1, 40_000), "white")
    square = expand_to_square(strip, (0, 0, 0))
    assert square.size == (MAX_PAD_SIDE, MAX_PAD_SIDE)
    small = Image.new("RGB", (30, 10), "white")  # anything up to MAX_PAD_SIDE is padded exactly as LLaVA-1.5
    padded = np.asarray(expand_to_square(small, (0, 0, 0)))
    assert padded.shape == (30, 30, 3) and padded[10:20].min() == 255 and padded[:10].max() == 0
    assert served["processor"].preprocess_images([strip]).shape == (1, 3, 16, 16)


def test_a_full_queue_gets_503_with_retry_after(served):
    """max_batch_size 1 and a one-request queue: 2 requests decode at once, 1 waits, a fourth is refused at once."""
    limits = ServerLimits(max_tokens=LONG, max_queue=1)
    app = create_app(served["model"], served["processor"], model_name="tiny", limits=limits, max_batch_size=1)
    question, seeds = LONG_QUESTION
    body = {**_body(question, seeds, max_tokens=LONG), "stream": True}
    with _running(app) as url, httpx.Client(timeout=60) as client, contextlib.ExitStack() as streams:

        def load() -> tuple[int, int]:
            health = client.get(url + "/health").json()
            return health["running"], health["waiting"]

        for expected in [(1, 0), (2, 0), (2, 1)]:  # each admitted before the next comes (the queue holds one)
            response = streams.enter_context(client.stream("POST", url + "/v1/chat/completions", json=body))
            assert response.status_code == 200
            assert _wait_for(lambda expected=expected: load() == expected)
        start = time.perf_counter()
        refused = client.post(url + "/v1/chat/completions", json=body)
        assert time.perf_counter() - start < 1
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["error"]["message"]


def test_a_request_past_its_timeout_gets_504_and_stops(strict):
    """request_timeout_s 0.2 against a request that decodes for a second or more."""
    question, seeds = LONG_QUESTION
    before = httpx.get(strict["url"] + "/health").json()
    reply = _post(strict["url"], _body(question, seeds, max_tokens=LONG), {"Content-Type": "application/json"})
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["code"] == "timeout" and "longer than 0.2 s" in reply.json()["error"]["message"]
    assert _wait_for(lambda: httpx.get(strict["url"] + "/health").json()["running"] == 0)
    assert httpx.get(strict["url"] + "/health").json()["steps_run"] - before["steps_run"] < LONG  # it did not run on


def test_health_answers_fast_while_the_largest_request_is_prepared(tmp_path):
    """The largest request the default limits accept: 4096x4096 images (the per-image limit) up to the per-request
    pixel limit (2 of them; 8 before that limit existed) in one body. On a
    machine shared with other work one scheduler hiccup can delay a probe past 100 ms, so a second run is allowed;
    a server that prepared requests on its event loop would miss both (each preparation takes seconds)."""
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    limits = ServerLimits()
    gradient = np.linspace(0, 255, 4096, dtype=np.uint8)
    channels = np.broadcast_arrays(gradient[None, :], gradient[:, None], np.uint8(128))
    image = Image.fromarray(np.stack(channels, -1).astype(np.uint8))
    assert image.width * image.height == limits.max_image_pixels
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    count = min(limits.max_images, limits.max_request_pixels // limits.max_image_pixels)
    body = {"model": "tiny", "messages": _messages("what ?", [url] * count), "max_tokens": 4}
    worst = []
    with _running(create_app(model, processor, model_name="tiny", limits=limits)) as base, httpx.Client() as probe:
        for _ in range(2):
            with ThreadPoolExecutor(1) as pool:
                big = pool.submit(_post, base, body, {"Content-Type": "application/json"}, 300)
                latencies = []
                while not big.done():
                    start = time.perf_counter()
                    assert probe.get(base + "/health", timeout=10).status_code == 200
                    latencies.append(time.perf_counter() - start)
                    time.sleep(0.02)
                assert big.result().status_code == 200, big.result().text
            assert len(latencies) >= 5  # the preparation took a while: the probes saw it
            worst.append(max(latencies))
            median = sorted(latencies)[len(latencies) // 2]
            print(
                f"/health while preparing {count} x 4096² images ({len(buffer.getvalue())} bytes each): "
                f"{len(latencies)} probes, max {max(latencies) * 1000:.1f} ms, median {median * 1000:.1f} ms"
            )
            if worst[-1] < 0.1:
                break
    assert min(worst) < 0.1, worst


def test_stop_strings_logprobs_and_usage(served):
    model, processor = served["model"], served["processor"]
    image = _png(0)[0]
    ids = _expected_ids(served, "what is this ?", [image], 12)
    words = processor.decode(ids, skip_special_tokens=True).split()
    assert len(words) >= 4, words
    stop = words[3]
    expected = processor.decode(ids, skip_special_tokens=True)
    expected = expected[: expected.index(stop)]  # the answer ends before the stop string, which is not returned
    body = _body("what is this ?", [0], max_tokens=12, stop=[stop, "never said"], logprobs=True, top_logprobs=3)
    reply = _post(served["url"], body).json()
    choice = reply["choices"][0]
    assert choice["message"]["content"] == expected and choice["finish_reason"] == "stop"
    # usage: the prompt's text tokens plus every visual token (v per image), independently counted
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=prompt, return_tensors="pt", images=[image])
    v = (16 // 4) ** 2  # the tiny CLIP: 16x16 images in 4x4 patches
    assert reply["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1] - 1 + v
    # logprobs: each token's log-probability from one forward over prompt + answer
    entries = choice["logprobs"]["content"]
    assert len(entries) == reply["usage"]["completion_tokens"]
    chosen = ids[: len(entries)]
    with torch.no_grad():
        full = torch.cat([inputs["input_ids"], torch.tensor([chosen])], 1)
        logits = model(full, pixel_values=inputs["pixel_values"]).logits[0, inputs["input_ids"].shape[1] - 1 : -1]
    reference = torch.log_softmax(logits, -1)
    for position, (entry, token) in enumerate(zip(entries, chosen, strict=True)):
        assert entry["logprob"] == pytest.approx(reference[position, token].item(), abs=1e-4)
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["token"] == entry["token"]  # greedy
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)
    # the same request streamed: the same text, logprobs and, asked for, a last chunk with the usage
    with httpx.stream(
        "POST",
        served["url"] + "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        headers=HEADERS,
        timeout=60,
    ) as response:
        chunks = _sse(response)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected
    streamed = [e for c in chunks if c["choices"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in entries], abs=1e-6)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == reply["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_seeded_sampling_is_the_same_alone_and_batched(served):
    def sampled(seed: int, question: str = "what is this ?") -> dict:
        return _body(question, [0], max_tokens=16, temperature=1.0, seed=seed)

    def text(response: httpx.Response) -> str:
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    alone = text(_post(served["url"], sampled(7)))
    assert text(_post(served["url"], sampled(7))) == alone
    assert text(_post(served["url"], sampled(8))) != alone  # the seed matters
    # batch-mates with the very same settings (an engine that batches by settings puts them in one batch and draws
    # every row from one generator), with other seeds, and greedy
    others = [sampled(7, "what ?")] * 3 + [sampled(seed, "what ?") for seed in range(3)]
    others += [_body("this is what ?", [2], max_tokens=16)] * 2
    for _ in range(2):
        with ThreadPoolExecutor(9) as pool:
            futures = [pool.submit(_post, served["url"], body) for body in others[:3]]
            batched = pool.submit(_post, served["url"], sampled(7))
            futures += [pool.submit(_post, served["url"], body) for body in others[3:]]
            assert text(batched.result()) == alone
            assert all(f.result().status_code == 200 for f in futures)


def _health(served) -> dict:
    return httpx.get(served["url"] + "/health").json()


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_disconnected_client_stops_its_generation(served):
    question, seeds = LONG_QUESTION
    body = {**_body(question, seeds, max_tokens=LONG), "stream": True}
    before = _health(served)
    with httpx.stream("POST", served["url"] + "/v1/chat/completions", json=body, headers=HEADERS) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if '"content": "w' in line)  # generating
    # the stream is closed after one token of LONG
    assert _wait_for(lambda: _health(served)["cancelled"] == before["cancelled"] + 1)
    assert _wait_for(lambda: _health(served)["running"] == 0)
    steps = _health(served)["steps_run"]
    assert steps - before["steps_run"] < LONG // 2  # it did not run on to max_tokens
    # a non-streaming client that gives up is noticed too
    with pytest.raises(httpx.ReadTimeout):
        _post(served["url"], _body(question, seeds, max_tokens=LONG), timeout=0.3)
    assert _wait_for(lambda: _health(served)["cancelled"] == before["cancelled"] + 2)


@pytest.mark.parametrize("arrival", ["with", "after"])
def test_a_short_request_does_not_wait_for_a_long_one(served, arrival):
    """The short request arrives with the long one (one group) or while it decodes; it is answered long before the
    long one ends."""
    question, seeds = LONG_QUESTION
    with ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        long_reply = pool.submit(_post, served["url"], _body(question, seeds, max_tokens=LONG))
        if arrival == "after":
            assert _wait_for(lambda: _health(served)["running"] == 1)
            time.sleep(0.1)
        short_start = time.perf_counter()
        short = _post(served["url"], _body("what ?", [], max_tokens=2))
        short_latency = time.perf_counter() - short_start
        long_done = long_reply.result()
        long_latency = time.perf_counter() - start
    assert short.status_code == 200 and long_done.status_code == 200
    assert long_done.json()["choices"][0]["finish_reason"] == "length"  # the long one really ran LONG tokens
    assert short.json()["choices"][0]["message"]["content"] == _expected(served, "what ?", [], 2)
    print(
        f"short request sent {arrival} a {LONG}-token one: {short_latency * 1000:.0f} ms; "
        f"the long one {long_latency * 1000:.0f} ms"
    )
    assert short_latency < long_latency / 4


def test_load_with_one_poisoned_request(served):
    """16 clients x 8 mixed requests (0-2 images, 2-24 tokens, streamed or not), one poisoned with a literal
    <image>: every healthy one succeeds with the greedy answer of the same request alone."""
    questions = [("what is this ?", [0]), ("this is what ?", [1]), ("what ?", []), ("is this ?", [2, 3])]
    lengths = [2, 8, 24]
    expected = {(q, n): _expected(served, q, [_png(s)[0] for s in seeds], n) for q, seeds in questions for n in lengths}
    client = _client(served)

    def one_client(index: int) -> list[bool]:
        outcomes = []
        for r in range(8):
            (question, seeds), n = questions[(index + r) % 4], lengths[(index * 3 + r) % 3]
            if (index, r) == (5, 3):
                with pytest.raises(openai.BadRequestError, match="<image>"):
                    client.chat.completions.create(
                        model="tiny", messages=_messages("what <image> ?", []), max_tokens=n, temperature=0
                    )
                continue
            kwargs = dict(model="tiny", messages=_messages(question, [_png(s)[1] for s in seeds]), max_tokens=n)
            if r % 2:
                stream = client.chat.completions.create(**kwargs, temperature=0, stream=True)
                text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            else:
                text = client.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
            outcomes.append(text.strip() == expected[question, n])
        return outcomes

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        outcomes = [ok for batch in pool.map(one_client, range(16)) for ok in batch]
    print(f"16 clients x 8 requests: {time.perf_counter() - start:.1f} s, {_health(served)['batches_run']} groups")
    assert len(outcomes) == 127 and all(outcomes)


@pytest.mark.parametrize("architecture", ["saisa", "llava"])
def test_step_decoder_rows_that_leave_early_leave_the_others_as_generate_makes_them(architecture):
    """The server's decoding loop against `generate` on each request alone: three rows of 3, 12 and 30 tokens in one
    batch, each dropped from the batch (and its cache) when done."""
    from saisa.inference.decoding import StepDecoder
    from saisa.inference.generation import user_prompt

    model, processor = tiny_model(architecture), tiny_chat_processor()
    requests = [("what is this ?", [_png(0)[0]], 3), ("what ?", [], 12), ("is this ?", [_png(1)[0], _png(2)[0]], 30)]
    prompts = [user_prompt(processor, question, len(images)) for question, images, _ in requests]
    inputs = processor(
        text=prompts, return_tensors="pt", images=[image for _, images, _ in requests for image in images]
    )
    decoder = StepDecoder(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    rows, answers = [0, 1, 2], [[], [], []]
    while rows:
        chosen = decoder.logits.argmax(-1).tolist()
        keep = []
        for i, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            if token == 2:  # EOS
                continue
            answers[row].append(token)
            if len(answers[row]) < requests[row][2]:
                keep.append(i)
        if keep and len(keep) < len(rows):
            decoder.keep(keep)
        rows = [rows[i] for i in keep]
        if rows:
            decoder.step([answers[row][-1] for row in rows])
    assert [len(answer) for answer in answers] == [3, 12, 30]  # no EOS: rows really left at steps 3 and 12
    served = {"model": model, "processor": processor}
    for (question, images, length), answer in zip(requests, answers, strict=True):
        assert answer == _expected_ids(served, question, images, length)
