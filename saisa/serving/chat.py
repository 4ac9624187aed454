"""A multi-turn chat session that keeps its KV cache: each turn feeds only the tokens the cache has not seen (the new
user turn, plus any image), never the earlier conversation again."""

from __future__ import annotations

import torch

from saisa.compat import CACHE_KWARG, output_cache
from saisa.inference.generation import generate_kwargs


class ChatSession:
    def __init__(self, model, processor, *, max_new_tokens: int = 256):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.messages: list[dict] = []
        self.images: list = []
        self.views = 0  # rows of pixel_values the cache holds (an image is one, or with tiling its base view and tiles)
        self.ids: torch.Tensor | None = None  # every token the cache holds, (1, T)
        self.cache = None
        self.last_new_tokens = 0  # prompt tokens the last turn actually computed (for tests and curiosity)

    def reset(self) -> None:
        self.__init__(self.model, self.processor, max_new_tokens=self.max_new_tokens)

    def ask(self, text: str, images: list | None = None, *, streamer=None, do_sample: bool = False) -> str:
        images = images or []
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        turn = {"role": "user", "content": content}  # kept only if the turn succeeds
        prompt = self.processor.apply_chat_template([*self.messages, turn], add_generation_prompt=True)
        full = self.processor(text=prompt, images=self.images + images, return_tensors="pt")
        ids = full["input_ids"]
        reuse = (
            self.ids is not None
            and ids.shape[1] > self.ids.shape[1]
            and torch.equal(ids[:, : self.ids.shape[1]], self.ids)
        )
        if reuse:
            new_images = full["pixel_values"][self.views :] if images else None
            kwargs = {CACHE_KWARG: self.cache, "pixel_values": new_images}
            self.last_new_tokens = ids.shape[1] - self.ids.shape[1]
        else:  # first turn, or the template re-rendered earlier turns differently: start over
            kwargs = {"pixel_values": full.get("pixel_values")}
            self.last_new_tokens = ids.shape[1]
        settings = generate_kwargs(
            self.model,
            self.processor,
            max_new_tokens=self.max_new_tokens,
            temperature=1.0 if do_sample else 0.0,
            streamer=streamer,
        )
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **settings, **kwargs
            )
        self.ids, self.cache = out.sequences, output_cache(out)
        self.images += images
        self.views = len(full["pixel_values"]) if self.images else 0
        answer = self.processor.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True).strip()
        self.messages += [turn, {"role": "assistant", "content": answer}]
        return answer
