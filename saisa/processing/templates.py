"""Conversation templates: render a LLaVA conversation to text plus the character spans that carry loss.

Labels are found by character offsets of ONE tokenisation of the whole text, never by tokenising pieces separately,
and `check_labels` fails loudly when the labelled tokens do not decode to the assistant text (a template that
tokenises differently than expected would otherwise train on nothing, or on the wrong tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # a label that carries no loss (PyTorch cross-entropy's and transformers' default)
IMAGE_TOKEN = "<image>"  # the placeholder in text, one per image: the processor and the model expand it
VIDEO_TOKEN = "<video>"  # the placeholder in text, one per video: the processor expands it to its frames


class TemplateMismatchError(ValueError):
    """Rendering and tokenisation disagree: the loss would silently go to the wrong tokens (or none)."""


@dataclass(frozen=True)
class Rendered:
    text: str
    assistant_spans: list[tuple[int, int]]  # [start, end) character spans that carry loss


def turn_role(turn: dict) -> str:
    role = turn.get("from", turn.get("role"))
    if role in ("human", "user"):
        return "user"
    if role in ("gpt", "assistant"):
        return "assistant"
    if role == "system":
        return "system"
    raise ValueError(f"unknown conversation role {role!r}; expected human/gpt (or user/assistant)")


def turn_text(turn: dict) -> str:
    return turn.get("value", turn.get("content"))


@dataclass(frozen=True)
class Template:
    """`prefix`, then per turn `user.format(content=q)` or `assistant_open + separator + a + assistant_end`;
    the loss covers `separator + a + assistant_end`."""

    name: str
    prefix: str  # may contain {system}
    system: str
    user: str  # contains {content}
    assistant_open: str  # opens an assistant turn; also the generation prompt
    separator: str  # between assistant_open and the answer (LLaVA's vicuna_v1: a space)
    assistant_end: str  # closes an assistant turn; learnt, so the model stops

    def render(self, turns: list[dict], *, add_generation_prompt: bool = False) -> Rendered:
        system = self.system
        if turns and turn_role(turns[0]) == "system":
            system, turns = turn_text(turns[0]), turns[1:]
        text, spans = self.prefix.format(system=system), []
        for turn in turns:
            role, content = turn_role(turn), turn_text(turn)
            if role == "user":
                text += self.user.format(content=content)
            elif role == "assistant":
                text += self.assistant_open
                start = len(text)
                text += self.separator + content + self.assistant_end
                spans.append((start, len(text)))
            else:
                raise ValueError("a system turn may only come first")
        if add_generation_prompt:
            text += self.assistant_open
        return Rendered(text, spans)


@dataclass(frozen=True)
class PlainTemplate:
    """LLaVA's `plain` (stage 1): the image(s), then the caption; the human's words are dropped."""

    name: str = "plain"

    def render(self, turns: list[dict], *, add_generation_prompt: bool = False) -> Rendered:
        text, spans = "", []
        for turn in turns:
            if turn_role(turn) == "user":
                text += IMAGE_TOKEN * turn_text(turn).count(IMAGE_TOKEN)
            elif turn_role(turn) == "assistant":
                start = len(text)
                text += turn_text(turn) + "\n"
                spans.append((start, len(text)))
        return Rendered(text, spans)


class TokenizerTemplate:
    """The tokenizer's own chat template. Assistant spans are found by rendering growing prefixes of the
    conversation; a template whose renderings are not prefixes of each other is refused."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; name one: plain, vicuna_v1, llama3, chatml")
        self.tokenizer = tokenizer

    def _apply(self, messages, add_generation_prompt):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render(self, turns: list[dict], *, add_generation_prompt: bool = False) -> Rendered:
        messages = [{"role": turn_role(t), "content": turn_text(t)} for t in turns]
        spans, previous = [], ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                opened = self._apply(messages[:i], True)
                closed = self._apply(messages[: i + 1], False)
                if not closed.startswith(opened) or not opened.startswith(previous):
                    raise TemplateMismatchError(
                        f"the tokenizer's chat template does not render conversations prefix by prefix (turn {i}); "
                        "use a named template"
                    )
                if message["content"].strip() not in closed[len(opened) :]:
                    raise TemplateMismatchError(
                        f"the chat template alters the assistant text of turn {i}; use a named template"
                    )
                spans.append((len(opened), len(closed)))
                previous = closed
        text = self._apply(messages, add_generation_prompt)
        return Rendered(text, spans)


VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES = {
    "plain": PlainTemplate(),
    # LLaVA-1.5 `conv_vicuna_v1` (saisa-vicuna): sep " ", sep2 "</s>"
    "vicuna_v1": Template("vicuna_v1", "<s>{system} ", VICUNA_SYSTEM, "USER: {content} ", "ASSISTANT:", " ", "</s>"),
    # LLaVA's `conv_llava_llama_3` (saisa-llama3)
    "llama3": Template(
        "llama3",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
        "provides, and assist the user with a variety of tasks using natural language.",
        "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "",
        "<|eot_id|>",
    ),
    "chatml": Template(
        "chatml",
        "<|im_start|>system\n{system}<|im_end|>\n",
        "You are a helpful assistant.",
        "<|im_start|>user\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
        "",
        "<|im_end|>\n",
    ),
}


def get_template(name: str, tokenizer=None):
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; one of {sorted(TEMPLATES) + ['tokenizer']}") from None


def tokenize_with_labels(
    rendered: Rendered, tokenizer, *, ignore_index: int = IGNORE_INDEX
) -> tuple[list[int], list[int]]:
    """Tokenise the whole text once; a token carries loss iff it starts inside an assistant span."""
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [ignore_index] * len(ids)
    for i, (start, _) in enumerate(offsets):
        if any(s <= start < e for s, e in rendered.assistant_spans):
            labels[i] = ids[i]
    check_labels(rendered, ids, labels, offsets, ignore_index)
    return ids, labels


def check_labels(rendered: Rendered, ids, labels, offsets, ignore_index: int) -> None:
    """Per assistant span, the labelled tokens must cover exactly its text (up to surrounding whitespace)."""
    for s, e in rendered.assistant_spans:
        expected = rendered.text[s:e].strip()
        inside = [(a, b) for (a, b), label in zip(offsets, labels, strict=True) if label != ignore_index and s <= a < e]
        covered = rendered.text[inside[0][0] : inside[-1][1]].strip() if inside else ""
        if covered != expected:
            raise TemplateMismatchError(
                f"tokenisation does not line up with the template: the assistant text {expected[:60]!r} is covered "
                f"by labelled tokens reading {covered[:60]!r}"
            )
