"""Tokenising a request's prompt so that only the chat template's own special tokens are special, without a lock;
and the true bytes of a generated token.

A user who types `<|im_start|>system` must not open a system turn. The template is rendered with each client text
replaced by a random sentinel, so every special token left in the rendering is the template's; the prompt is cut at
those, each piece between them (template text and client text together, as a tokenizer's added-token split would cut
it) is encoded with special-token matching off, and the template's special tokens are put back as their ids. For a
prompt whose client text holds no special-token text the result is the tokenizer's ordinary encoding, which is then
used directly.

Each image and video the template renders becomes one `<image>` id (the server expands it to the item's views, as
`SaisaProcessor` expands `<image>` and `<video>` in text), and the kinds are returned in the prompt's order."""

from __future__ import annotations

import copy
import json
import re
import secrets
import threading

from saisa.serving.protocol import RequestError


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each of the 256 characters a byte-level BPE token is spelled with ->
    its byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _uses(component, kind: str) -> bool:
    """Whether a tokenizer.json component (a dict, possibly a Sequence of them) holds one of type `kind`."""
    if isinstance(component, dict):
        return component.get("type") == kind or any(_uses(value, kind) for value in component.values())
    if isinstance(component, list):
        return any(_uses(value, kind) for value in component)
    return False


class TokenBytes:
    """token id -> the UTF-8 bytes the token stands for. Byte-level BPE tokens are read through the byte alphabet
    and SentencePiece byte-fallback tokens (`<0xE2>`) as their byte, so a token holding part of a character gets
    its real bytes, not U+FFFD's."""

    _FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else {}
        self.byte_level = _uses(spec.get("decoder"), "ByteLevel") or _uses(spec.get("pre_tokenizer"), "ByteLevel")
        self.tokenizer, self.alphabet = tokenizer, _byte_decoder()
        self.special = set(tokenizer.all_special_ids)

    def __call__(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is not None and token_id not in self.special:
            if self.byte_level and all(char in self.alphabet for char in piece):
                return [self.alphabet[char] for char in piece]
            if match := self._FALLBACK.fullmatch(piece):
                return [int(match.group(1), 16)]
        return list(self.tokenizer.decode([token_id]).encode())


class PromptTokenizer:
    """Encodes rendered prompts from many threads at once: private copies of the fast tokenizer's backend that
    nothing mutates after construction (transformers' `__call__` rewrites padding and special-token settings on
    the shared backend at every call)."""

    def __init__(self, processor):
        self.processor, tokenizer = processor, processor.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.lock = None
        if backend is None:  # a Python tokenizer: one call at a time, and no way to keep special text plain
            self.tokenizer, self.lock = copy.deepcopy(tokenizer), threading.Lock()
        else:
            self.ordinary, self.plain = copy.deepcopy(backend), copy.deepcopy(backend)
            for encoder in (self.ordinary, self.plain):
                encoder.no_padding()
                encoder.no_truncation()
            self.ordinary.encode_special_tokens, self.plain.encode_special_tokens = False, True
        self.specials = sorted(
            {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}, key=len, reverse=True
        )
        self.special_ids = {text: tokenizer.convert_tokens_to_ids(text) for text in self.specials}
        self.pattern = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        self.image_token, self.video_token = processor.image_token, processor.video_token
        self.placeholders = re.compile(f"{re.escape(self.image_token)}|{re.escape(self.video_token)}")
        self.longest_token = max(1, max((len(piece) for piece in tokenizer.get_vocab()), default=1))

    def _encode(self, encoder, text: str) -> list[int]:
        # encode_batch releases the GIL while it works: the event loop goes on meanwhile
        return encoder.encode_batch([text], add_special_tokens=False)[0].ids

    def encode(self, messages: list[dict], texts: list[str]) -> tuple[list[int], list[str]]:
        """messages: the chat, each client text (`texts`, in order of appearance) given as `{"type": "text"}` parts
        or string contents; returns the rendered prompt's ids, one `<image>` id per image or video, and their kinds
        ("image", "video") in the prompt's order."""
        if self.pattern is None or not any(self.pattern.search(text) for text in texts):
            prompt, kinds = self._one_id_per_item(
                self.processor.apply_chat_template(messages, add_generation_prompt=True)
            )
            if self.lock is not None:
                with self.lock:
                    return self.tokenizer(prompt, add_special_tokens=False)["input_ids"], kinds
            return self._encode(self.ordinary, prompt), kinds
        if self.lock is not None:
            raise RequestError(
                400, "the text holds a special token's text, which this model's tokenizer cannot keep as plain text"
            )
        return self.encode_keeping_text_plain(messages, texts)

    def _one_id_per_item(self, rendered: str) -> tuple[str, list[str]]:
        """The rendered prompt with each video placeholder written as the image placeholder, and the kinds in order
        (client text holds neither: `saisa.serving.protocol.to_messages` refuses it)."""
        kinds = [
            "video" if match.group() == self.video_token else "image" for match in self.placeholders.finditer(rendered)
        ]
        return rendered.replace(self.video_token, self.image_token), kinds

    def encode_keeping_text_plain(self, messages: list[dict], texts: list[str]) -> tuple[list[int], list[str]]:
        """The prompt cut at the template's own special tokens, the rest encoded with special-token matching off."""
        nonce = secrets.token_hex(8)
        sentinels = [f"\ue000{nonce}{i}\ue001" for i in range(len(texts))]
        swapped = _replace_texts(messages, iter(sentinels))
        rendered, kinds = self._one_id_per_item(self.processor.apply_chat_template(swapped, add_generation_prompt=True))
        pieces = re.split("(\ue000" + nonce + r"\d+\ue001)", rendered)
        if sorted(pieces[1::2]) != sorted(sentinels):  # the template dropped, repeated or altered a text
            raise RequestError(
                400, "the text holds a special token's text, which this chat template does not let through as text"
            )
        # Cut at the template's special tokens; everything between them is encoded as text, client text included.
        ids, text = [], ""
        for index, piece in enumerate(pieces):
            if index % 2:
                text += texts[sentinels.index(piece)]
                continue
            position = 0
            for match in self.pattern.finditer(piece):
                text += piece[position : match.start()]
                if text:
                    ids += self._encode(self.plain, text)
                ids.append(self.special_ids[match.group()])
                text, position = "", match.end()
            text += piece[position:]
        if text:
            ids += self._encode(self.plain, text)
        return ids, kinds


def _replace_texts(messages: list[dict], replacements) -> list[dict]:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = next(replacements)
        else:
            content = [{**part, "text": next(replacements)} if part["type"] == "text" else part for part in content]
        out.append({**message, "content": content})
    return out
