"""Chat templates as data, rendering with supervised character spans, and labels from token spans.

A conversation is rendered once into text, together with the character spans the model is trained to
produce (assistant replies and the marker that ends them). The text is tokenized once, the way inference
tokenizes it, and a token is supervised when the characters it covers are: a token that covers both
supervised and unsupervised (non-whitespace) characters is a :class:`LabelAlignmentError`, never a silently
shifted or zeroed label. The same templates are exported as Jinja chat templates for Hugging Face
processors (``chat_template``), and the tests hold the two renderings equal.

Pure Python; no torch import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


class ConversationError(ValueError):
    """A conversation that the template cannot render (bad roles, empty turns, wrong image count)."""


class LabelAlignmentError(ValueError):
    """A token straddles a supervised/unsupervised boundary: the template and tokenizer disagree."""


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class ConversationTemplate:
    """How one model family lays out a conversation.

    Rendering: ``bos`` + system part + for each turn ``user_prefix + text + user_suffix`` or
    ``assistant_prefix + assistant_format.format(content=text)`` + (``end`` when the conversation ends on an
    assistant turn). The formatted assistant part is supervised; with ``stop_lookahead`` the ``stop``
    string that begins the next turn (or ``end``) is supervised too, so that the model learns to stop.
    ``system_placement`` is ``"prefix"`` (before the first turn) or ``"first_user"`` (inside it).
    """

    name: str
    system: str
    system_format: str
    system_placement: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_format: str
    generation_prompt: str
    end: str
    stop: str
    stop_lookahead: bool = False
    description: str = ""


TEMPLATES: Mapping[str, ConversationTemplate] = MappingProxyType(
    {
        t.name: t
        for t in (
            ConversationTemplate(
                name="v0",
                description="LLaVA-Med v0 / Vicuna v0: '### Human: ... ### Assistant: ...'",
                system=(
                    "A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions."
                ),
                system_format="{system}\n\n",
                system_placement="prefix",
                user_prefix="### Human: ",
                user_suffix="\n",
                assistant_prefix="### Assistant:",
                assistant_format=" {content}\n",
                generation_prompt="### Assistant:",
                end="### ",
                stop="###",
                stop_lookahead=True,
            ),
            ConversationTemplate(
                name="vicuna_v1",
                description="Vicuna v1.1+: 'SYSTEM USER: ... ASSISTANT: ...</s>'",
                system=(
                    "A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions."
                ),
                system_format="{system} ",
                system_placement="prefix",
                user_prefix="USER: ",
                user_suffix=" ",
                assistant_prefix="ASSISTANT:",
                assistant_format=" {content}</s>",
                generation_prompt="ASSISTANT:",
                end="",
                stop="</s>",
            ),
            ConversationTemplate(
                name="mistral_instruct",
                description="LLaVA-Med v1.5 / Mistral-Instruct: '[INST] ... [/INST] ... </s>', no system prompt",
                system="",
                system_format="{system}\n\n",
                system_placement="first_user",
                user_prefix="[INST] ",
                user_suffix=" [/INST]",
                assistant_prefix="",
                assistant_format=" {content} </s>",
                generation_prompt="",
                end="",
                stop="</s>",
            ),
            ConversationTemplate(
                name="llama3",
                description="Llama 3 instruct headers and <|eot_id|>",
                system="",
                system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                system_placement="prefix",
                user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
                user_suffix="<|eot_id|>",
                assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
                assistant_format="{content}<|eot_id|>",
                generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
                end="",
                stop="<|eot_id|>",
            ),
        )
    }
)


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class Rendered:
    """Rendered text and the ``[start, end)`` character spans that are supervised."""

    text: str
    supervised: tuple[tuple[int, int], ...]

    def supervised_text(self) -> list[str]:
        return [self.text[a:b] for a, b in self.supervised]


def render(
    template: ConversationTemplate,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    image_placeholder: str = IMAGE_TOKEN,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Render ``messages`` (an optional leading system message, then user/assistant turns alternating,
    starting with the user) with ``template``. ``<image>`` in a turn becomes ``image_placeholder``.
    """
    system = template.system
    turns = list(messages)
    if turns and turns[0].role == "system":
        system, turns = turns[0].content, turns[1:]
    if not turns:
        raise ConversationError("a conversation needs at least one user turn")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            raise ConversationError(
                f"turn {index} has role {message.role!r}, expected {expected!r} (turns alternate)"
            )
    for index, message in enumerate(messages):
        try:
            message.content.encode("utf-8")
        except UnicodeEncodeError:
            # A lone UTF-16 surrogate (JSON can escape one, and stdin decodes bad bytes into them): no
            # tokenizer takes it, so it is refused here, for every caller, with the message's place.
            raise ConversationError(
                f"message {index} holds a lone surrogate (not valid Unicode text)"
            ) from None
    if add_generation_prompt and turns[-1].role != "user":
        raise ConversationError(
            "a generation prompt follows a user turn, but the conversation ends on the assistant"
        )

    pieces: list[tuple[str, bool]] = [(bos_token, False)]
    system_text = template.system_format.format(system=system) if system else ""
    if template.system_placement == "prefix":
        pieces.append((system_text, False))
    for index, message in enumerate(turns):
        content = message.content.replace(IMAGE_TOKEN, image_placeholder)
        if message.role == "user":
            if index == 0 and template.system_placement == "first_user":
                content = system_text + content
            pieces.append((template.user_prefix + content + template.user_suffix, False))
        else:
            pieces.append((template.assistant_prefix, False))
            pieces.append((template.assistant_format.format(content=content), True))
    if add_generation_prompt:
        pieces.append((template.generation_prompt, False))
    elif turns[-1].role == "assistant":
        pieces.append((template.end, False))

    text, spans, cursor = "", [], 0
    for piece, supervised in pieces:
        if supervised:
            spans.append([cursor, cursor + len(piece)])
        text += piece
        cursor += len(piece)
    if template.stop_lookahead:
        for span in spans:
            if not text.startswith(template.stop, span[1]):
                raise ConversationError(
                    f"template {template.name!r}: no {template.stop!r} after an assistant turn"
                )
            span[1] += len(template.stop)
    return Rendered(text, tuple((a, b) for a, b in spans))


def supervised_tokens(
    text: str, spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]], *, where: str = ""
) -> np.ndarray:
    """Which tokens (given their character ``offsets`` in ``text``) are supervised, as a bool array.

    Whitespace decides nothing: a token is supervised when its non-whitespace characters all are, and a
    token of whitespace only when all its characters are. Raises :class:`LabelAlignmentError` when a
    token covers both supervised and unsupervised non-whitespace characters.
    """
    flags = np.zeros(len(text) + 1, dtype=np.int64)
    for a, b in spans:
        flags[a:b] = 1
    blank = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if text else np.zeros(0, np.uint32)
    blank = np.isin(blank, [ord(c) for c in " \t\n\r\f\v"])
    solid = np.concatenate([~blank, [False]])
    cumulative = lambda values: np.concatenate([[0], np.cumsum(values)])  # noqa: E731
    sup_solid = cumulative(flags[:-1] * solid[:-1])
    all_solid = cumulative(solid[:-1])
    sup_any = cumulative(flags[:-1])
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    a, b = offsets[:, 0], offsets[:, 1]
    n_sup = sup_solid[b] - sup_solid[a]
    n_unsup = (all_solid[b] - all_solid[a]) - n_sup
    mixed = (n_sup > 0) & (n_unsup > 0)
    if mixed.any():
        i = int(np.flatnonzero(mixed)[0])
        raise LabelAlignmentError(
            f"{where}token {i} covers {text[a[i] : b[i]]!r} (characters {a[i]}..{b[i]}), which crosses the edge of "
            f"a supervised span; the chat template and the tokenizer disagree about token boundaries"
        )
    width = b - a
    whitespace_only = (n_sup == 0) & (n_unsup == 0) & (width > 0)
    return (n_sup > 0) | (whitespace_only & (sup_any[b] - sup_any[a] == width))


@dataclass(frozen=True)
class ImageTokens:
    """How an image appears in the token sequence: ``count`` copies of ``token_id``."""

    token_id: int
    count: int


@dataclass(frozen=True)
class Encoded:
    """Token ids, labels (``-100`` where not supervised) and where each image's tokens start."""

    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64
    image_starts: np.ndarray  # [N] int64


def encode(
    rendered: Rendered,
    tokenizer,
    image: ImageTokens | None,
    *,
    num_images: int,
    where: str = "",
) -> Encoded:
    """Tokenize ``rendered`` once (no extra special tokens: the text carries BOS) and build labels.

    Each image token the tokenizer produces is expanded into ``image.count`` copies; there must be
    exactly ``num_images`` of them. ``where`` prefixes error messages (e.g. ``"file.json record 12 (id x): "``).
    """
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    supervised = supervised_tokens(
        rendered.text, rendered.supervised, encoding["offset_mapping"], where=where
    )
    labels = np.where(supervised, ids, IGNORE_INDEX)
    if rendered.supervised and not supervised.any():
        raise LabelAlignmentError(f"{where}the conversation has assistant text but no supervised token")
    if image is None:
        if num_images:
            raise ConversationError(f"{where}{num_images} image(s) given but this model takes none")
        return Encoded(ids, labels, np.zeros(0, dtype=np.int64))
    positions = np.flatnonzero(ids == image.token_id)
    if len(positions) != num_images:
        raise ConversationError(
            f"{where}the text has {len(positions)} image placeholder(s) but the record has {num_images} image(s)"
        )
    if supervised[positions].any():
        raise ConversationError(f"{where}an image placeholder is inside an assistant reply")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[positions] = image.count
    starts = positions + np.arange(len(positions)) * (image.count - 1)
    return Encoded(np.repeat(ids, repeats), np.repeat(labels, repeats), starts.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Jinja export for Hugging Face processors (content as a string, or a list of {"type": "image"} and
# {"type": "text", "text": ...} parts joined with "\n").


def chat_template(template: ConversationTemplate, image_placeholder: str = IMAGE_TOKEN) -> str:
    """The Jinja chat template that renders exactly what :func:`render` renders."""
    j = json.dumps
    return (
        "{%- set ns = namespace(system=" + j(template.system) + ", text='') -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "{%- set first = 1 -%}"
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}\n"
        "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('\\n') -%}{%- endif -%}\n"
        "{%- else -%}{%- set first = 0 -%}{%- endif -%}\n"
        "{%- set system_text = (" + j(template.system_format) + ".replace('{system}', ns.system)) "
        "if ns.system else '' -%}\n"
        "{{- bos_token -}}\n"
        + ("{{- system_text -}}\n" if template.system_placement == "prefix" else "")
        + "{%- for message in messages[first:] -%}\n"
        "{%- if message['content'] is string -%}\n"
        "{%- set ns.text = message['content'].replace('<image>', " + j(image_placeholder) + ") -%}\n"
        "{%- else -%}{%- set ns.text = '' -%}\n"
        "{%- for part in message['content'] -%}\n"
        "{%- if not loop.first -%}{%- set ns.text = ns.text + '\\n' -%}{%- endif -%}\n"
        "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + " + j(image_placeholder) + " -%}\n"
        "{%- else -%}{%- set ns.text = ns.text + part['text'].replace('<image>', "
        + j(image_placeholder)
        + ") -%}"
        "{%- endif -%}\n"
        "{%- endfor -%}{%- endif -%}\n"
        "{%- if message['role'] == 'user' -%}\n"
        + (
            "{%- if loop.first -%}{%- set ns.text = system_text + ns.text -%}{%- endif -%}\n"
            if template.system_placement == "first_user"
            else ""
        )
        + "{{- "
        + j(template.user_prefix)
        + " + ns.text + "
        + j(template.user_suffix)
        + " -}}\n"
        "{%- else -%}\n"
        "{{- "
        + j(template.assistant_prefix)
        + " + "
        + j(template.assistant_format)
        + ".replace('{content}', ns.text) -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- " + j(template.generation_prompt) + " -}}\n"
        "{%- elif messages and messages[-1]['role'] == 'assistant' -%}{{- "
        + j(template.end)
        + " -}}{%- endif -%}\n"
    )
