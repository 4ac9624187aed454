"""The OpenAI-compatible server (driven by the official `openai` client on loopback) and the chat session."""

from __future__ import annotations

import base64
import io
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

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from saisa.modeling.image_kv_cache import ImageKVCache  # noqa: E402
from saisa.serving.chat import ChatSession  # noqa: E402
from saisa.serving.protocol import ServerLimits  # noqa: E402
from saisa.serving.server import create_app  # noqa: E402

MAX_TOKENS = 8


def _png(seed: int) -> tuple[Image.Image, str]:
    array = np.random.default_rng(seed).integers(0, 255, (20, 16, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


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
        limits=ServerLimits(max_tokens=64, allowed_image_dir=allowed),
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"model": model, "processor": processor, "url": f"http://127.0.0.1:{port}", "allowed": allowed}
    server.should_exit = True
    thread.join(timeout=10)


def _client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="secret", max_retries=0, timeout=60)


def _expected(served, question: str, images: list[Image.Image]) -> str:
    model, processor = served["model"], served["processor"]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}])
    inputs = processor(prompt, images=images or None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


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
    content = body if isinstance(body, bytes) else __import__("json").dumps(body).encode()
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
    prompt = processor.apply_chat_template(session.messages[:-1])
    inputs = processor(prompt, images=[image, _png(4)[0]])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() == second
    assert session.last_new_tokens == inputs["input_ids"].shape[1] - first_total  # only the new turn was computed
