"""The one loader and the one generation path: every layout opens with its processor, on the asked device and dtype;
stop strings and every EOS id end a row; the commands answer through them."""

from __future__ import annotations

import numpy as np
import torch
from conftest import hf_llava_with_weights_of, tiny_chat_processor, tiny_model
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from saisa.checkpoints.loading import load_pretrained
from saisa.inference.generation import answer_batch, generate_kwargs, user_prompt
from saisa.inference.sampling import Sampler
from saisa.inference.stopping import cut_at_stop, stop_at, streamable


def _image(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 12, 3), dtype=np.uint8)).save(path)
    return Image.open(path).convert("RGB")


class _Count(BaseStreamer):
    def __init__(self):
        self.calls = 0

    def put(self, value):
        self.calls += 1

    def end(self):
        pass


def test_one_loader_opens_our_folders_and_llava_hf_folders_with_their_processor(tmp_path):
    processor = tiny_chat_processor()
    ours = tiny_model("saisa")
    ours.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    hf = hf_llava_with_weights_of(tiny_model("llava"), image_token_index=processor.image_token_id)
    hf.save_pretrained(tmp_path / "hf")
    processor.tokenizer.save_pretrained(tmp_path / "hf")
    image = _image(tmp_path / "a.png")
    for name in ("ours", "hf"):
        model, loaded = load_pretrained(tmp_path / name, device="cpu", dtype="bfloat16")
        assert not model.training and {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert loaded.image_token_id == model.config.image_token_id
        assert len(answer_batch(model, loaded, ["what is this ?"], [[image]], max_new_tokens=3)) == 1

    from saisa.cli import main

    for name in ("ours", "hf"):  # what `saisa chat` and `saisa serve` open too
        assert (
            main(
                [
                    "ask",
                    str(tmp_path / name),
                    "what is this ?",
                    "--image",
                    str(tmp_path / "a.png"),
                    "--max-new-tokens",
                    "2",
                    "--device",
                    "cpu",
                    "--dtype",
                    "float32",
                ]
            )
            == 0
        )


def test_stop_strings_end_the_row_early_and_are_cut():
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    free = answer_batch(model, processor, ["what is this ?"], [[]], max_new_tokens=12)[0]
    words = free.split()
    assert len(set(words)) >= 2, free
    stop = next(w for w in words[1:] if w != words[0])  # a word that first appears after the start
    counter = _Count()
    cut = answer_batch(model, processor, ["what is this ?"], [[]], max_new_tokens=12, stop=[stop], streamer=counter)[0]
    assert cut == free[: free.index(stop)]
    assert counter.calls - 1 == words.index(stop) + 1 < 12  # the prompt, then tokens up to the stop word only


def test_eos_from_the_generation_config_ends_generation():
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    words = answer_batch(model, processor, ["what is this ?"], [[]], max_new_tokens=6)[0].split()
    end = next(i for i, word in enumerate(words) if word != words[0])  # first position of a new word
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids(words[end])  # e.g. end of turn
    assert answer_batch(model, processor, ["what is this ?"], [[]], max_new_tokens=6)[0].split() == words[: end + 1]


def test_one_stop_rule_cuts_at_the_earliest_stop_string_and_streams_what_no_stop_string_can_claim():
    assert stop_at("a STOP b END", ["END", "STOP"]) == 2
    assert stop_at("nothing here", ["END"]) is None
    assert cut_at_stop("xABy", ["By", "AB"]) == "x"  # the earliest start wins, whatever the order of the strings
    assert cut_at_stop("abc", ["", "z"]) == "abc"  # an empty stop string stops nothing
    assert streamable("hello ST", ["STOP"]) == "hello "  # "ST" may become "STOP"
    assert streamable("hello SX", ["STOP"]) == "hello SX"
    assert streamable("caf\ufffd", []) == "caf"  # half a multi-byte character waits for the rest


def test_generate_and_the_step_sampler_draw_from_temperature_then_top_p_alone():
    """Sampled `generate` and the server's `Sampler` draw from one distribution: the logits over the temperature,
    then the smallest set of likeliest tokens holding top_p of the mass (written out here), nothing else (generate's
    own defaults would add top-k 50)."""
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    temperature, top_p = 0.7, 0.9
    inputs = processor(text=[user_prompt(processor, "what is this ?", 0)], return_tensors="pt")
    kwargs = generate_kwargs(model, processor, max_new_tokens=1, temperature=temperature, top_p=top_p)
    for seed in range(10):
        torch.manual_seed(seed)
        out = model.generate(**inputs, **kwargs, return_dict_in_generate=True, output_logits=True)
        scaled = out.logits[0][0].float() / temperature  # (V,) the first new token's logits
        probs = scaled.softmax(-1)
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(-1) - probs[order]  # mass of the likelier tokens
        support = order[before < top_p]
        masked = torch.full_like(scaled, float("-inf")).index_copy(0, support, scaled[support])
        torch.manual_seed(seed)
        assert int(out.sequences[0, -1]) == int(torch.multinomial(masked.softmax(-1)[None], 1))
        sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed)
        warped = sampler.warpers(inputs["input_ids"], out.logits[0].float()).softmax(-1)[0]
        assert torch.allclose(warped, masked.softmax(-1))
        assert sampler(out.logits[0][0]) in support.tolist()
    assert 50 < len(support) < len(probs)  # top-p cut some tokens, and top-k 50 would have cut more
