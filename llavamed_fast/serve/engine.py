"""The generation engine: one thread runs the model for every request, in batches, with a KV cache.

Requests are submitted from any thread; each gets its events (text deltas, then one finish or failure) by
a callback called on the engine thread. The engine loop, step by step:

1. **Admit** waiting requests up to ``max_batch``: their prompts are embedded together (the vision tower
   runs once for all their images), prefilled as one left-padded batch, and their first token sampled.
   Their KV cache then joins the running batch's: the shorter of the two is padded on the left (masked)
   to the longer's length, and the rows are stacked. So a request never waits for others to finish.
2. **Decode** one token for every running row in one forward pass (positions per row, padding masked).
3. **Retire** rows that hit EOS, a stop string, their token limit or the context, or were cancelled; the
   cache keeps only the live rows, and columns that are padding for every row are cut off.

Sampling is per request: greedy at temperature 0, else temperature and nucleus (top-p) sampling with the
request's own generator (``seed`` makes it repeatable). Replies stream as text deltas; a tail that could
be the start of a stop string, or an incomplete UTF-8 character, is held back until it is resolved.

The cache is transformers' ``DynamicCache``; joining and trimming pad or cut its per-layer key/value
tensors along the sequence dimension (only full-attention layers: a sliding-window cache is refused).
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llavamed_fast.data.templates import Message
from llavamed_fast.model import attention
from llavamed_fast.model.generate import left_padded_prompts
from llavamed_fast.model.llava_med import LlavaMed
from llavamed_fast.model.processor import LlavaMedProcessor


class RequestError(ValueError):
    """A request the engine cannot take (too long for the context, bad sampling values)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 10.0:
            raise RequestError(f"temperature must be between 0 and 10, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            # torch.Generator.manual_seed would fail later with "Overflow when unpacking long long".
            raise RequestError(f"seed must be a 64-bit signed integer, got {self.seed}")


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str  # the whole reply
    reason: str  # "stop" (EOS or a stop string) or "length" (token limit or context)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass(eq=False)
class _Request:
    id: int
    messages: Sequence[Message]
    images: Sequence[Image.Image]
    params: SamplingParams
    on_event: Callable[[Event], None]
    prompt_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    image_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the reply already streamed
    generator: torch.Generator | None = None
    cancelled: bool = False
    done: bool = False


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token from ``logits [V]``: argmax at temperature 0, else from the smallest set of most likely
    tokens whose probability reaches ``top_p`` (always at least the most likely one), renormalised."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        keep = before < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise RuntimeError(f"the engine joins full-attention caches only, not {type(layer).__name__}")
    return layers


class Engine:
    """Batched generation for one model (see the module docstring). Use as a context manager or call
    :meth:`start` / :meth:`close`; :meth:`step` runs one loop iteration by hand (tests)."""

    def __init__(self, model: LlavaMed, processor: LlavaMedProcessor, *, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model.eval()
        self.processor = processor
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.lm = model.language_model
        self.lm.set_attn_implementation("sdpa")  # cached decoding; the packed training attention has no cache
        tokenizer = processor.tokenizer
        self.eos = tokenizer.eos_token_id
        self.template_stop = processor.template.stop
        self.context = processor.max_length
        self._ids = itertools.count(1)
        self._pending: list[_Request] = []
        self._active: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L] 1 for real tokens
        self._positions: torch.Tensor | None = None  # [B] position of the next token fed
        self._last: torch.Tensor | None = None  # [B] last sampled token, not yet in the cache
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0  # forward passes run (prefills + decode steps), for tests and metrics
        self.max_rows_seen = 0

    # ------------------------------------------------------------------------------------------ public
    def submit(
        self,
        messages: Sequence[Message],
        images: Sequence[Image.Image],
        params: SamplingParams,
        on_event: Callable[[Event], None],
    ) -> Callable[[], None]:
        """Queue a conversation (ending with a user turn); returns a function that cancels it.

        Raises :class:`RequestError` at once when the prompt and ``max_new_tokens`` do not fit the context.
        """
        encoded = self.processor.encode(messages, num_images=len(images), add_generation_prompt=True)
        prompt = len(encoded.input_ids)
        if prompt + 1 > self.context:
            raise RequestError(f"the prompt is {prompt} tokens; the model's context is {self.context}")
        request = _Request(next(self._ids), messages, images, params, on_event)
        request.prompt_ids = np.asarray(encoded.input_ids, dtype=np.int64)
        request.image_starts = encoded.image_starts
        if params.seed is not None:
            request.generator = torch.Generator().manual_seed(params.seed)
        elif params.temperature > 0:
            request.generator = torch.Generator().manual_seed(secrets.randbits(63))
        with self._wake:
            self._pending.append(request)
            self._wake.notify()

        def cancel() -> None:
            request.cancelled = True

        return cancel

    def generate(
        self, messages: Sequence[Message], images: Sequence[Image.Image], params: SamplingParams
    ) -> Finished:
        """Submit and wait (the engine thread must be running)."""
        done = threading.Event()
        result: list[Event] = []

        def on_event(event: Event) -> None:
            if isinstance(event, Finished | Failed):
                result.append(event)
                done.set()

        self.submit(messages, images, params, on_event)
        done.wait()
        if isinstance(result[0], Failed):
            raise RuntimeError(result[0].message)
        return result[0]

    def start(self) -> Engine:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llavamed-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the engine thread (requests still queued or running fail) and give the model its packed
        training attention back."""
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.lm.set_attn_implementation(attention.register())

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def busy(self) -> int:
        return len(self._active) + len(self._pending)

    # -------------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._pending and not self._active:
                    self._wake.wait()
                if not self._running:
                    break
            self.step()
        for request in self._active + self._pending:
            self._emit(request, Failed("the server is shutting down"))

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, decode one token for every running one, retire the finished."""
        self._admitting: list[_Request] = []
        try:
            self._admit()
            if self._active:
                self._decode()
        except Exception as error:  # a failure in the model fails the requests in flight, not the engine
            message = f"generation failed: {type(error).__name__}: {error}"
            for request in self._active + self._admitting:
                if not request.done:
                    self._emit(request, Failed(message))
            self._active, self._cache = [], None

    # ---------------------------------------------------------------------------------------- prefill
    def _admit(self) -> None:
        with self._wake:
            room = self.max_batch - len(self._active)
            new, self._pending = self._pending[:room], self._pending[room:]
        new = [r for r in new if not self._drop_cancelled(r)]
        if not new:
            return
        self._admitting = new
        padded, mask, lengths = left_padded_prompts(
            self.model, self.processor, [(r.prompt_ids, r.image_starts, r.images) for r in new]
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(
            inputs_embeds=padded,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.steps += 1
        logits = out.logits[:, -1]
        first = self._next_tokens(logits, new)
        self._join(new, cache, mask, torch.tensor(lengths, device=self.device), first)
        self._after_tokens(list(range(len(self._active) - len(new), len(self._active))))

    def _join(
        self,
        new: list[_Request],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        last: torch.Tensor,
    ) -> None:
        if self._cache is None or not self._active:
            self._active, self._cache, self._mask, self._positions, self._last = (
                new,
                cache,
                mask,
                positions,
                last,
            )
        else:
            old_len, new_len = self._mask.shape[1], mask.shape[1]
            width = max(old_len, new_len)
            for mine, theirs in zip(_layers(self._cache), _layers(cache), strict=True):
                mine.keys = torch.cat([_pad_seq(mine.keys, width), _pad_seq(theirs.keys, width)])
                mine.values = torch.cat([_pad_seq(mine.values, width), _pad_seq(theirs.values, width)])
            self._mask = torch.cat(
                [F.pad(self._mask, (width - old_len, 0)), F.pad(mask, (width - new_len, 0))]
            )
            self._positions = torch.cat([self._positions, positions])
            self._last = torch.cat([self._last, last])
            self._active = self._active + new
        self.max_rows_seen = max(self.max_rows_seen, len(self._active))

    # ----------------------------------------------------------------------------------------- decode
    def _decode(self) -> None:
        self._mask = F.pad(self._mask, (0, 1), value=1)
        embeds = self.lm.get_input_embeddings()(self._last).unsqueeze(1)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=self._mask,
            position_ids=self._positions.unsqueeze(1),
            past_key_values=self._cache,
            use_cache=True,
        )
        self.steps += 1
        self._positions = self._positions + 1
        logits = out.logits[:, -1]
        self._last = self._next_tokens(logits, self._active)
        self._after_tokens(list(range(len(self._active))))

    def _next_tokens(self, logits: torch.Tensor, requests: list[_Request]) -> torch.Tensor:
        """``[B]`` next tokens from ``logits [B, V]``: one argmax for the whole batch (one host sync), and
        a draw for each request that samples."""
        tokens = logits.argmax(-1)
        sampling = [i for i, r in enumerate(requests) if r.params.temperature > 0]
        if sampling:
            tokens = tokens.cpu()
            for i in sampling:
                r = requests[i]
                tokens[i] = sample_token(logits[i], r.params.temperature, r.params.top_p, r.generator)
        return tokens.to(self.device)

    def _after_tokens(self, rows: list[int]) -> None:
        """Record each row's new token, stream what is settled, and retire finished rows."""
        # Both to the host at once: reading a GPU tensor element by element would wait once per row.
        last, positions = self._last.tolist(), self._positions.tolist()
        for row in rows:
            request = self._active[row]
            if self._drop_cancelled(request):
                continue
            request.generated.append(last[row])
            self._progress(request, positions[row] + 1)
        keep = [i for i, r in enumerate(self._active) if not r.done]
        if len(keep) < len(self._active):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._active = [self._active[i] for i in keep]
            if not self._active:
                self._cache = None
                return
            self._cache.batch_select_indices(index)
            self._mask, self._positions, self._last = (
                self._mask[index],
                self._positions[index],
                self._last[index],
            )
            # Columns that are padding in every remaining row are no longer needed.
            unused = int(self._mask.any(0).long().argmax())
            if unused:
                for layer in _layers(self._cache):
                    layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
                self._mask = self._mask[:, unused:]

    def _progress(self, request: _Request, used_context: int) -> None:
        tokenizer = self.processor.tokenizer
        tokens = request.generated
        if tokens[-1] == self.eos:
            self._finish(request, tokenizer.decode(tokens[:-1]).lstrip(), "stop")
            return
        text = tokenizer.decode(tokens).lstrip()
        stops = [s for s in (self.template_stop, *request.params.stop) if s]
        hits = [text.index(s) for s in stops if s in text]
        if hits:
            self._finish(request, text[: min(hits)], "stop")
            return
        if len(tokens) >= request.params.max_new_tokens or used_context >= self.context:
            self._finish(request, text, "length")
            return
        # Stream only what cannot change any more: hold back trailing whitespace (the reply is stripped),
        # an incomplete character, and a tail that may be the start of a stop string.
        settled = len(text.rstrip().rstrip("\ufffd"))
        for stop in stops:
            for cut in range(min(len(stop) - 1, settled), 0, -1):
                if text[settled - cut : settled] == stop[:cut]:
                    settled -= cut
                    break
        if settled > request.sent:
            request.on_event(Delta(text[request.sent : settled]))
            request.sent = settled

    def _finish(self, request: _Request, text: str, reason: str) -> None:
        text = text.strip()
        if len(text) > request.sent:  # what was streamed is always a prefix of the final text
            request.on_event(Delta(text[request.sent :]))
        self._emit(request, Finished(text, reason, len(request.prompt_ids), len(request.generated)))

    def _drop_cancelled(self, request: _Request) -> bool:
        if request.cancelled and not request.done:
            self._emit(request, Failed("cancelled"))
        return request.cancelled

    def _emit(self, request: _Request, event: Event) -> None:
        request.done = True
        try:
            request.on_event(event)
        except Exception:  # a listener that fails (a closed connection) must not stop the engine
            pass


def _pad_seq(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad ``[B, H, L, D]`` along L to ``width`` with zeros (masked out by the attention mask)."""
    return F.pad(tensor, (0, 0, width - tensor.shape[2], 0))
