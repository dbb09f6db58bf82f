"""The OpenAI-compatible HTTP API (FastAPI) over the engine, and the web page.

``POST /v1/chat/completions`` (messages with ``text`` and ``image_url`` parts, images as base64 ``data:``
URLs; ``stream: true`` as server-sent events), ``GET /v1/models``, ``GET /health``, and ``GET /`` the chat
page. Every refusal is a JSON 4xx ``{"error": {"message", "type", "param", "code"}}`` whose message says
what was wrong; bad input never gets a 5xx or a stack trace. Limits: request body bytes, image bytes and
pixels, images and messages per request, max tokens, and concurrent requests (429 beyond it). With an API
key every ``/v1`` route needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from llavamed_fast.data.templates import IMAGE_TOKEN, ConversationError, Message
from llavamed_fast.serve.engine import Delta, Engine, Failed, Finished, RequestError, SamplingParams
from llavamed_fast.serve.images import ImagePolicy, ImageRequestError, load_request_image

DISCLAIMER = (
    "Research use only: not a medical device, not for diagnosis or treatment. Answers can be wrong; a "
    "qualified professional must check anything that matters."
)

# What a content part looks like, for the errors about one that is not.
PART_SHAPES = '{"type": "text", "text": "..."} or {"type": "image_url", "image_url": {"url": "..."}}'
INT64 = 2**63


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 32 * 2**20
    max_messages: int = 64
    max_images: int = 4
    max_tokens: int = 2048
    default_max_tokens: int = 512
    max_concurrent: int = 64
    max_text_chars: int = 100_000


# ----------------------------------------------------------------------------------------- request schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # torch generators take 64 bits; OpenAI documents the same signed range.
    seed: int | None = Field(default=None, ge=-INT64, le=INT64 - 1)
    n: int = Field(default=1, ge=1, le=1)


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status
    )


class _BodyTooLarge(Exception):
    """Raised into the app by ``_BodyLimit``'s receive, to stop whatever is reading the body."""


class _BodyLimit:
    """A 413 for a request body over ``max_bytes``, counted as it arrives.

    A declared Content-Length over the limit is refused before a byte is read. A chunked body declares no
    length, so the bytes are counted as the app receives them: past the limit the read fails, so nothing
    holds more than the limit, and whatever the app made of the failed read (FastAPI answers 400 "error
    parsing the body") is replaced by the 413. The rest of the body is then discarded by the HTTP server as
    it arrives, never buffered.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> JSONResponse:  # built only for the requests that get it
        return _error(413, f"the request body is larger than {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large()(scope, receive, send)
            return
        received = 0
        exceeded = started = False

        async def counted() -> ASGIMessage:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def sent(message: ASGIMessage) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to the failed read; the 413 goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sent)
        except _BodyTooLarge:
            if started:
                raise
        if exceeded and not started:
            await self._too_large()(scope, receive, send)


def _explain(errors: Sequence[dict[str, Any]], body: Any) -> tuple[str, str]:
    """The first validation error as (where, what): its place in the request (``messages.1.content.0``)
    and what is wrong there, in plain words.

    Pydantic reports a union (``content``: a string or a list of parts; ``stop``) once per branch and puts
    the branch's label in the place (``content.str``, ``content.list[tagged-union[...]]``, a part's tag). The
    labels are not places in the request, so they are dropped; of the branches' errors at the first error's
    place, the one that got furthest into what was sent is the one that says what is wrong.
    """
    located = [(_place(e.get("loc", ()), body, e.get("type") == "missing"), e) for e in errors]
    if not located:
        return "body", "invalid request"
    first = located[0][0]
    same = [(p, e) for p, e in located if p[: len(first)] == first]
    deepest = max(len(p) for p, _ in same)
    path, chosen = next((p, e) for p, e in same if len(p) == deepest)
    where = ".".join(str(step) for step in path) or "body"
    kinds = {e["type"] for p, e in same if len(p) == deepest}
    if {"string_type", "list_type"} <= kinds:  # neither branch of `str | list[...]` took it
        shape = f"a list of parts, each {PART_SHAPES}" if path[-1:] == ["content"] else "a list of strings"
        return where, f"must be a string or {shape}"
    ctx = chosen.get("ctx") or {}
    kind = chosen["type"]
    if kind == "union_tag_invalid":
        return where, f"unknown part type {ctx.get('tag')!r}; a part is {PART_SHAPES}"
    if kind == "union_tag_not_found":
        return where, f'the part has no "type"; a part is {PART_SHAPES}'
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return where, "must be a JSON object" + (f": {PART_SHAPES}" if _is_part(path) else "")
    if kind == "missing":
        return where, "is required"
    return where, str(chosen.get("msg", "invalid"))


def _place(loc: Sequence[Any], body: Any, missing: bool) -> list[Any]:
    """The steps of ``loc`` that exist in ``body`` (FastAPI's leading "body" and union labels dropped); a
    missing field keeps its own name, the one step that is not there."""
    steps = list(loc)[1:] if tuple(loc[:1]) == ("body",) else list(loc)
    path: list[Any] = []
    node = body
    for number, step in enumerate(steps):
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            path.append(step)
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            path.append(step)
            node = node[step]
        elif missing and number == len(steps) - 1:
            path.append(step)
    return path


def _is_part(path: list[Any]) -> bool:
    return len(path) == 4 and path[0] == "messages" and path[2] == "content"


# ---------------------------------------------------------------------------------------------- the app
def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    images: ImagePolicy | None = None,
) -> FastAPI:
    limits = limits or ServerLimits()
    images = images or ImagePolicy()
    app = FastAPI(title="llavamed-fast", version="1", docs_url=None, redoc_url=None)
    state = {"in_flight": 0}
    created = int(time.time())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # The key for the API routes (the body size is _BodyLimit's, outside this).
        if request.url.path.startswith("/v1/") and api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error"
                )
        return await call_next(request)

    # Added last, so outermost: the size is checked before the key and before anything reads the body.
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error(
                400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
            )
        where, what = _explain(error.errors(), error.body)
        return _error(400, f"{where}: {what}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(
            error.status_code,
            str(error.detail),
            "not_found_error" if error.status_code == 404 else "invalid_request_error",
        )

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return _error(error.status, error.message, error.kind, error.param)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        return _error(
            500, f"internal error ({type(error).__name__}); the server keeps running", "server_error"
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "in_flight": state["in_flight"], "queued": engine.busy}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "llavamed-fast"}],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = resources.files("llavamed_fast.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{DISCLAIMER}}", DISCLAIMER).replace("{{MODEL}}", model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model not in (None, "", model_name):
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {model_name!r}",
                kind="not_found_error",
                param="model",
            )
        if state["in_flight"] >= limits.max_concurrent:
            raise APIError(
                429,
                f"the server is at its limit of {limits.max_concurrent} concurrent requests; retry shortly",
                kind="rate_limit_error",
            )
        state["in_flight"] += 1
        try:
            messages, pictures = await asyncio.to_thread(_convert, body, limits, images)
            params = _params(body, limits)
        except BaseException:
            state["in_flight"] -= 1
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            cancel = engine.submit(
                messages, pictures, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
            )
        except (RequestError, ConversationError, ValueError) as error:
            state["in_flight"] -= 1
            raise APIError(400, str(error)) from None
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(ident, model_name, events, cancel, request, include_usage, state),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                event = await events.get()
                if isinstance(event, Finished):
                    return _completion(ident, model_name, event)
                if isinstance(event, Failed):
                    return _error(503 if event.message != "cancelled" else 499, event.message, "server_error")
        except asyncio.CancelledError:
            cancel()
            raise
        finally:
            state["in_flight"] -= 1

    return app


def _params(body: ChatRequest, limits: ServerLimits) -> SamplingParams:
    asked = body.max_completion_tokens or body.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
    if asked > limits.max_tokens:
        raise APIError(
            400, f"max_tokens is {asked}; this server allows at most {limits.max_tokens}", param="max_tokens"
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    for number, text in enumerate(stop):
        _check_unicode(text, f"stop.{number}")
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
    try:
        return SamplingParams(
            max_new_tokens=asked, temperature=body.temperature, top_p=body.top_p, stop=stop, seed=body.seed
        )
    except RequestError as error:
        raise APIError(400, str(error)) from None


def _check_unicode(text: str, where: str) -> None:
    # JSON may escape a lone UTF-16 surrogate ("\ud800"): a str no tokenizer (or UTF-8) can take. Message
    # text is checked by the conversation template for every caller; stop strings never pass through it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"{where}: the text holds a lone surrogate (not valid Unicode)", param=where
        ) from None


def _convert(body: ChatRequest, limits: ServerLimits, policy: ImagePolicy) -> tuple[list[Message], list]:
    """Our messages (``<image>`` where each image part was) and the decoded images."""
    if len(body.messages) > limits.max_messages:
        raise APIError(
            400, f"messages: {len(body.messages)} messages; at most {limits.max_messages}", param="messages"
        )
    out: list[Message] = []
    pictures = []
    total = 0
    for index, message in enumerate(body.messages):
        parts = (
            [TextPart(type="text", text=message.content)]
            if isinstance(message.content, str)
            else message.content
        )
        pieces = []
        for number, part in enumerate(parts):
            where = f"messages.{index}.content.{number}"
            if isinstance(part, TextPart):
                if IMAGE_TOKEN in part.text:
                    raise APIError(
                        400,
                        f"{where}: text may not contain {IMAGE_TOKEN!r}; send images as image_url parts",
                        param=where,
                    )
                total += len(part.text)
                pieces.append(part.text)
            else:
                if message.role != "user":
                    raise APIError(400, f"{where}: images belong in user messages", param=where)
                if len(pictures) >= limits.max_images:
                    raise APIError(
                        400, f"{where}: at most {limits.max_images} images per request", param=where
                    )
                try:
                    pictures.append(load_request_image(part.image_url.url, where, policy))
                except ImageRequestError as error:
                    raise APIError(400, str(error), param=where) from None
                pieces.append(IMAGE_TOKEN)
        if total > limits.max_text_chars:
            raise APIError(
                400, f"messages: more than {limits.max_text_chars} characters of text", param="messages"
            )
        # An image part and the text after it are separate lines, as in the training records.
        out.append(Message(message.role, "\n".join(p for p in pieces if p != "") if pieces else ""))
    if out[-1].role != "user":
        raise APIError(400, "messages: the last message must be from the user", param="messages")
    return out, pictures


def _completion(ident: str, model: str, event: Finished) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": event.text},
                "finish_reason": event.reason,
            }
        ],
        "usage": _usage(event),
    }


def _usage(event: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _chunk(ident: str, model: str, delta: dict, finish: str | None, usage: dict | None = None) -> str:
    payload: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
    }
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(ident, model, events: asyncio.Queue, cancel, request: Request, include_usage: bool, state):
    try:
        yield _chunk(ident, model, {"role": "assistant", "content": ""}, None)
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _chunk(ident, model, {"content": event.text}, None)
            elif isinstance(event, Finished):
                yield _chunk(ident, model, {}, event.reason)
                if include_usage:
                    yield _chunk(ident, model, {}, None, _usage(event))
                yield "data: [DONE]\n\n"
                return
            else:
                yield f"data: {json.dumps({'error': {'message': event.message, 'type': 'server_error'}})}\n\n"
                return
    finally:
        cancel()  # a no-op when finished; frees the row when the client went away
        state["in_flight"] -= 1
