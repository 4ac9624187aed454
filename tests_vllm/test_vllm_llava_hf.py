"""Our `llava` model exported with `saisa convert --to llava-hf` runs on vLLM's own `LlavaForConditionalGeneration`
(transformers' llava-hf layout and processor, nothing of this package's plugin) with our model's greedy tokens and
log-probabilities. vLLM's LLaVA imports torchvision's image transforms: scripts/setup.sh --vllm installs torchvision
with its nms/qnms fake-kernel registrations guarded (its C++ ops cannot load beside the CPU torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F
from conftest import save_checkpoint, start_llm, stop_llm, tiny_model
from PIL import Image
from vllm import SamplingParams

from saisa.processing import SaisaProcessor

MAX_TOKENS = 6
TOLERANCE = 1e-4


def test_vllms_own_llava_imports():
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    assert LlavaForConditionalGeneration.__module__ == "vllm.model_executor.models.llava"


def test_our_llava_exported_to_llava_hf_runs_on_vllms_own_llava(tmp_path):
    model = tiny_model("llava", "llama", "clip")
    ours = save_checkpoint(model, tmp_path / "ours")
    exported = tmp_path / "llava-hf"
    command = [sys.executable, "-m", "saisa_cli", "convert", str(ours), str(exported), "--to", "llava-hf"]
    subprocess.run(command, check=True, timeout=300)

    side = model.vision_tower.preprocessing.image_size  # a square image at the encoder's size: no padding, no resize
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (side, side, 3), dtype=np.uint8))
    prompt = "user: <image> what is this ?\nassistant:"
    inputs = SaisaProcessor.from_pretrained(ours)(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    # The export gives the <image> id (outside our LLM's vocabulary here, where SaisaProcessor adds it) a zero
    # embedding and LM-head row, as llava-hf looks the image token up in its embedding table: the exported model's
    # softmax has one more entry, with logit 0. vLLM reports log-probabilities over that vocabulary.
    extra = int(model.config.image_token_id >= model.config.text_config.vocab_size)
    logprobs = [torch.log_softmax(F.pad(logits[0].double(), (0, extra)), -1) for logits in out.logits]

    llm = start_llm(exported)
    try:
        assert type(llm.llm_engine.model_config.hf_config).__name__ == "LlavaConfig"  # not our plugin's model
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
        completion = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [image]}}, params)[0].outputs[0]
    finally:
        stop_llm(llm)
    assert list(completion.token_ids) == tokens
    worst = max(
        abs(position[token].logprob - logprobs[step][token].item())
        for step, (position, token) in enumerate(zip(completion.logprobs, tokens, strict=True))
    )
    print(f"vLLM's LLaVA on the exported folder: {len(tokens)} tokens equal, max |dlogprob| {worst:.2e}")
    assert worst < TOLERANCE
