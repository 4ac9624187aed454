"""The one loader and the one generation path: every layout opens with its processor, on the asked device and dtype;
stop strings and every EOS id end a row; the commands answer through them."""

from __future__ import annotations

import numpy as np
import torch
from conftest import hf_llava_with_weights_of, tiny_chat_processor, tiny_model
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from saisa.generation import answer_batch
from saisa.loading import load_pretrained


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
