"""The teacher client: chat requests to any OpenAI-compatible server, paid for once.

Built on the ``openai`` SDK (``AsyncOpenAI``; ``AsyncAzureOpenAI`` when an Azure API version is given), so
it talks to OpenAI, Azure OpenAI, vLLM, Ollama, or anything else that serves ``/v1/chat/completions``.

- **Once**: every request's reply goes to a :class:`~llavamed_fast.data.ledger.Ledger` (fsynced) as it
  arrives; a request whose key is already there is not sent. A run killed at any point and started again
  sends no request twice and loses no reply.
- **Bounded**: at most ``concurrency`` requests in flight; optional requests-per-minute and
  tokens-per-minute budgets (prompt characters / 4 + ``max_tokens``, the usual estimate).
- **Retries**: 429, 408, 409, 5xx, timeouts and dropped connections are retried with exponential backoff
  and jitter, waiting at least what a ``retry-after`` / ``retry-after-ms`` header asks; so is a 200 whose
  body is not a chat completion (cut-off JSON, a gateway's HTML page), a transient fault of whatever sits
  in between. Other errors (a bad request, a wrong key) are not retried. The SDK's own retries are off, so
  every attempt is counted here.
- **Secrets**: the API key comes from the environment variable named in the config and is never logged,
  stored or put in an error message; the server's own error text is redacted (:func:`redact`) before it is
  shown, as some servers repeat the key they were sent.
- **Cost**: token usage from the replies, priced from a per-million-token table; Batch API replies at
  :data:`BATCH_PRICE_FACTOR` of it (their ledger usage also counts them as ``batch_*_tokens``).
- **Batch API** (:func:`run_batch`): the requests not yet in the ledger go up as one JSONL file with the
  ledger key as each ``custom_id``; the batch's id is kept next to the ledger, so a run stopped while the
  batch is processed picks the same batch up again instead of paying for a second one; results go to the
  ledger as they are collected.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from llavamed_fast.data.durable import write_atomic
from llavamed_fast.data.ledger import Ledger, request_key

# USD per million tokens (input, output); a user's table or --price overrides it. Public list prices when
# this was written; check the provider's page for current ones.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
}
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
BATCH_PRICE_FACTOR = 0.5  # the Batch API bills half the synchronous price


@dataclass
class TeacherConfig:
    model: str
    base_url: str | None = None  # None: the SDK's default (OpenAI), or OPENAI_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    azure_api_version: str | None = None  # set for Azure OpenAI (base_url is then the resource endpoint)
    concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_retries: int = 6
    backoff_base: float = 1.0  # seconds; attempt n waits about base * 2**n (plus jitter), capped
    backoff_max: float = 60.0
    timeout: float = 120.0
    temperature: float = 0.7
    max_tokens: int = 1024
    price_per_million: tuple[float, float] | None = None  # (input, output) USD; default from PRICES

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.requests_per_minute is not None and self.requests_per_minute < 1:
            raise ValueError(f"requests per minute must be at least 1, got {self.requests_per_minute}")
        if self.tokens_per_minute is not None and self.tokens_per_minute <= 0:
            raise ValueError(f"tokens per minute must be positive, got {self.tokens_per_minute}")

    def params(self) -> dict[str, Any]:
        """The sampling parameters that are part of a request's ledger key."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def prices(self) -> tuple[float, float] | None:
        return self.price_per_million or PRICES.get(self.model)


def config_from_args(args: Any, *, model: str) -> TeacherConfig:
    """A :class:`TeacherConfig` from the command-line options the curation and evaluation commands share
    (``--base-url``, ``--api-key-env``, ``--concurrency``, ``--rpm``, ...); options a command lacks keep
    their defaults."""

    def option(name: str) -> Any:
        return getattr(args, name, None)

    price = option("price")
    return TeacherConfig(
        model=model,
        base_url=option("base_url"),
        api_key_env=args.api_key_env,
        azure_api_version=option("azure_api_version"),
        concurrency=args.concurrency,
        requests_per_minute=option("rpm"),
        tokens_per_minute=option("tpm"),
        max_retries=args.max_retries,
        timeout=args.timeout,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        price_per_million=tuple(price) if price else None,
    )


class TeacherError(RuntimeError):
    """A request that failed for good (not retryable, or out of retries); names the job, never the key."""


@dataclass
class RunStats:
    sent: int = 0  # requests that got a reply this run
    cached: int = 0  # requests answered from the ledger
    retries: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # job id -> why
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    batch: bool = False  # the replies came through the Batch API (billed at BATCH_PRICE_FACTOR)

    def cost(self, prices: tuple[float, float] | None) -> float | None:
        return cost_usd(self.prompt_tokens, self.completion_tokens, prices, batch=self.batch)


def cost_usd(
    prompt_tokens: float, completion_tokens: float, prices: tuple[float, float] | None, *, batch: bool = False
) -> float | None:
    """USD for the tokens at ``prices`` (per million, input and output); None without prices."""
    if prices is None:
        return None
    full = (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6
    return full * BATCH_PRICE_FACTOR if batch else full


def estimate_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens, by the usual four characters per token (for budgets and dry-run costs)."""
    return sum(len(str(m.get("content", ""))) for m in messages) // 4 + 4 * len(messages)


def retry_after(error: Exception) -> float | None:
    """Seconds a server asked us to wait (``retry-after-ms``, ``retry-after`` in seconds or as a date)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _retryable(error: Exception) -> bool:
    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(error, openai.APIStatusError) and error.status_code in RETRYABLE_STATUS


# An OpenAI-style secret key ("sk-...", "sk-proj-..."): redacted even when it is not the configured key.
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")


def redact(text: str, secret: str | None = None) -> str:
    """``text`` with ``secret`` (the configured API key) and anything that looks like a secret key replaced
    by ``[redacted]``: servers' error messages may repeat the key they were sent."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _KEY_LIKE.sub("[redacted]", text)


def _describe(error: Exception, secret: str | None = None) -> str:
    if isinstance(error, openai.APIStatusError):
        return redact(f"HTTP {error.status_code}: {error.message}", secret)
    return redact(f"{type(error).__name__}: {error}", secret)


class _BadReply(Exception):
    """A 200 whose body is not a chat completion: cut-off JSON, or a gateway's HTML page. Retried like a
    5xx, as it comes from whatever sits between us and the model, not from the request."""


def _snippet(text: str, secret: str | None) -> str:
    # Redacted before it is cut: a key cut in two would no longer be recognised.
    return repr(redact(" ".join(text.split()), secret)[:120])


def _parse_reply(raw: Any, secret: str | None) -> Any:
    """The chat completion of a raw SDK response; :class:`_BadReply` naming the content type and the first
    characters when the body is not one."""
    content_type = raw.headers.get("content-type", "none")
    try:
        response = raw.parse()
    except ValueError:  # json.JSONDecodeError: declared JSON, but it is not
        raise _BadReply(
            f"HTTP {raw.status_code} reply with content type {content_type} whose body is not JSON: "
            f"{_snippet(raw.text, secret)}"
        ) from None
    if not hasattr(response, "choices"):  # the SDK hands back non-JSON bodies as a str
        raise _BadReply(
            f"HTTP {raw.status_code} reply with content type {content_type}, not a chat completion: "
            f"{_snippet(raw.text, secret)}"
        )
    return response


class _Budget:
    """Sliding one-minute windows for requests and tokens: ``take`` waits until both have room."""

    window = 60.0  # seconds (the budgets are per minute)

    def __init__(self, requests: float | None, tokens: float | None) -> None:
        self.requests, self.tokens = requests, tokens
        self._log: list[tuple[float, int]] = []
        self._lock = asyncio.Lock()

    async def take(self, tokens: int) -> None:
        if self.requests is None and self.tokens is None:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self._log = [(t, n) for t, n in self._log if now - t < self.window]
                over_requests = self.requests is not None and len(self._log) + 1 > self.requests
                used = sum(n for _, n in self._log)
                over_tokens = self.tokens is not None and self._log and used + tokens > self.tokens
                if not over_requests and not over_tokens:
                    self._log.append((now, tokens))
                    return
                await asyncio.sleep(max(0.01, self.window - (now - self._log[0][0])))


def make_client(config: TeacherConfig) -> openai.AsyncOpenAI:
    """The SDK client, its own retries off (this module retries and counts)."""
    key = os.environ.get(config.api_key_env)
    if not key:
        raise TeacherError(
            f"no API key: set the environment variable {config.api_key_env} (a local server that needs no "
            "key accepts any value)"
        )
    common = {"api_key": key, "max_retries": 0, "timeout": config.timeout}
    if config.azure_api_version:
        if not config.base_url:
            raise TeacherError("Azure OpenAI needs the resource endpoint as the base URL")
        return openai.AsyncAzureOpenAI(
            azure_endpoint=config.base_url, api_version=config.azure_api_version, **common
        )
    return openai.AsyncOpenAI(base_url=config.base_url, **common)


Job = tuple[str, list[dict[str, str]]]  # (job id, chat messages)


async def run_jobs(
    jobs: Sequence[Job],
    config: TeacherConfig,
    ledger: Ledger,
    *,
    client: openai.AsyncOpenAI | None = None,
    on_reply: Callable[[str], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> RunStats:
    """Send every job whose request is not in ``ledger``; each reply is in the ledger before the next
    step. Jobs that fail for good are listed in the stats (the others go on); a wrong key or a missing
    model stops the run at once, as every request would fail the same way."""
    own_client = client is None
    client = client or make_client(config)
    secret = os.environ.get(config.api_key_env)  # only to redact it from the server's error messages
    stats = RunStats()
    started = time.monotonic()
    params = config.params()
    gate = asyncio.Semaphore(max(1, config.concurrency))
    budget = _Budget(config.requests_per_minute, config.tokens_per_minute)
    fatal: list[BaseException] = []

    # Jobs with the same request share one: it is sent (and paid for) once.
    by_key: dict[str, tuple[list[dict[str, str]], list[str]]] = {}
    for job_id, messages in jobs:
        by_key.setdefault(request_key(config.model, messages, params), (messages, []))[1].append(job_id)

    def replied(job_ids: list[str]) -> None:
        for job in job_ids:
            if on_reply:
                on_reply(job)

    async def one(key: str, messages: list[dict[str, str]], job_ids: list[str]) -> None:
        job_id = job_ids[0]
        if key in ledger:
            stats.cached += len(job_ids)
            replied(job_ids)
            return
        async with gate:
            for attempt in range(config.max_retries + 1):
                if fatal:
                    return
                await budget.take(estimate_tokens(messages) + config.max_tokens)
                try:
                    # The raw response, to name the content type when the body is not a chat completion.
                    raw = await client.chat.completions.with_raw_response.create(
                        model=config.model, messages=messages, **params
                    )
                    response = _parse_reply(raw, secret)
                except (
                    openai.AuthenticationError,
                    openai.PermissionDeniedError,
                    openai.NotFoundError,
                ) as error:
                    fatal.append(TeacherError(f"{job_id}: {_describe(error, secret)}; stopping the run"))
                    return
                except (openai.OpenAIError, _BadReply) as error:
                    bad_reply = isinstance(error, _BadReply)
                    if not (bad_reply or _retryable(error)) or attempt == config.max_retries:
                        for job in job_ids:
                            stats.failed[job] = str(error) if bad_reply else _describe(error, secret)
                        return
                    stats.retries += 1
                    backoff = min(config.backoff_max, config.backoff_base * 2**attempt)
                    wait = max(retry_after(error) or 0.0, backoff * (0.5 + random.random() / 2))
                    await sleep(wait)
                    continue
                # A JSON body of another shape parses into a completion with odd fields: look, don't assume.
                choices = response.choices
                choice = choices[0] if isinstance(choices, list) and choices else None
                content = getattr(getattr(choice, "message", None), "content", None)
                if not isinstance(content, str):
                    for job in job_ids:
                        stats.failed[job] = (
                            f"reply without content (finish_reason {getattr(choice, 'finish_reason', None)})"
                        )
                    return
                usage = response.usage
                counts = {
                    "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
                    "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
                }
                served = getattr(response, "model", None)
                ledger.record(
                    key,
                    content,
                    model=config.model,
                    usage=counts,
                    served_model=served if isinstance(served, str) else None,
                )
                stats.sent += 1
                stats.prompt_tokens += counts["prompt_tokens"]
                stats.completion_tokens += counts["completion_tokens"]
                stats.cached += len(job_ids) - 1
                replied(job_ids)
                return

    try:
        await asyncio.gather(*(one(key, messages, job_ids) for key, (messages, job_ids) in by_key.items()))
    finally:
        if own_client:
            await client.close()  # inside the loop: httpx cannot close its connections after it
    stats.seconds = time.monotonic() - started
    if fatal:
        raise fatal[0]
    return stats


BATCH_DONE = {"completed", "failed", "expired", "cancelled"}


def batch_state_path(ledger: Ledger) -> Path:
    return ledger.path.with_name(ledger.path.name + ".batch.json")


async def _call(make: Callable[[], Awaitable[Any]], config: TeacherConfig, sleep) -> Any:
    """One Batch API call, retried like a chat request (hours of polling should survive a 5xx)."""
    for attempt in range(config.max_retries + 1):
        try:
            return await make()
        except openai.OpenAIError as error:
            if not _retryable(error) or attempt == config.max_retries:
                secret = os.environ.get(config.api_key_env)
                raise TeacherError(f"Batch API: {_describe(error, secret)}") from None
            backoff = min(config.backoff_max, config.backoff_base * 2**attempt)
            await sleep(max(retry_after(error) or 0.0, backoff * (0.5 + random.random() / 2)))
    raise AssertionError("unreachable")


def _count(value: Any) -> int:
    """A token count from a reply's usage; anything that is not a count is 0 (the cost is then low, not lost)."""
    return value if isinstance(value, int) and value >= 0 else 0


def _result_error(result: dict, response: dict, body: dict) -> str:
    """Why one batch result line holds no answer: the request's HTTP error, or the line's own error."""
    error = body.get("error") if isinstance(body.get("error"), dict) else result.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    status = response.get("status_code")
    if status not in (None, 200):
        return f"HTTP {status}" + (f": {str(message)[:200]}" if message else "")
    if message:
        return str(message)[:200]
    return "a 200 with no message content"


async def run_batch(
    jobs: Sequence[Job],
    config: TeacherConfig,
    ledger: Ledger,
    *,
    client: openai.AsyncOpenAI | None = None,
    poll_seconds: float = 30.0,
    on_status: Callable[[str], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> RunStats:
    """The jobs not in ``ledger`` through the Batch API. A batch recorded next to the ledger (a run that
    stopped while it was processed) is polled to its end and its answers collected first, whatever this
    run's jobs are; then the requests still missing go up as one new batch (id recorded before polling),
    polled to its end, and collected. Every answered line goes to the ledger; requests left unanswered are
    listed in the stats as failed."""
    own_client = client is None
    client = client or make_client(config)
    stats = RunStats(batch=True)
    started = time.monotonic()
    params = config.params()
    keyed: dict[str, tuple[list[dict[str, str]], list[str]]] = {}
    for job_id, messages in jobs:
        keyed.setdefault(request_key(config.model, messages, params), (messages, []))[1].append(job_id)
    state_path = batch_state_path(ledger)
    known = {key for key in keyed if key in ledger}  # answered before this run

    why: dict[str, str] = {}  # request key -> why the batch did not answer it
    notes: list[str] = []  # what went wrong with the batch as a whole

    def collect(text: str, label: str) -> None:
        """Ledger the answered lines of one of the batch's result files; note why the others failed. A
        line that cannot be read is named and skipped: the lines after it still count."""
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                result = json.loads(line)
                if not isinstance(result, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                notes.append(f"{label} line {number} unreadable ({str(error)[:80]})")
                continue
            key = result.get("custom_id")
            if not isinstance(key, str) or not key:
                notes.append(f"{label} line {number} has no custom_id")
                continue
            if key in ledger:
                continue
            response = result.get("response") if isinstance(result.get("response"), dict) else {}
            body = response.get("body") if isinstance(response.get("body"), dict) else {}
            choices = body.get("choices") if isinstance(body.get("choices"), list) else []
            message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
            content_text = message.get("content") if isinstance(message, dict) else None
            if response.get("status_code") != 200 or not isinstance(content_text, str):
                why[key] = _result_error(result, response, body)
                continue
            usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
            counts = {name: _count(usage.get(name)) for name in ("prompt_tokens", "completion_tokens")}
            # Also as batch_*: the ledger's totals then tell which tokens were billed at the batch price.
            counts.update({f"batch_{name}": count for name, count in list(counts.items())})
            ledger.record(key, content_text, model=config.model, usage=counts)
            why.pop(key, None)
            stats.sent += 1
            stats.prompt_tokens += counts["prompt_tokens"]
            stats.completion_tokens += counts["completion_tokens"]

    async def finish(batch: Any) -> Any:
        why.clear()  # reasons are this batch's only
        notes.clear()
        while batch.status not in BATCH_DONE:
            if on_status:
                on_status(batch.status)
            await sleep(poll_seconds)
            batch = await _call(lambda batch_id=batch.id: client.batches.retrieve(batch_id), config, sleep)
        if on_status:
            on_status(batch.status)
        # An expired or cancelled batch may still hold (billed) answers; failed requests are in the error file.
        for kind in ("output", "error"):
            file_id = getattr(batch, f"{kind}_file_id", None)
            if file_id:
                content = await _call(lambda file_id=file_id: client.files.content(file_id), config, sleep)
                collect(content.text, f"batch {batch.id} {kind} file")
        errors = getattr(getattr(batch, "errors", None), "data", None) or []
        for error in errors[:3]:  # a failed batch: its input was refused as a whole
            line = f" (line {error.line})" if getattr(error, "line", None) else ""
            notes.append(f"batch {batch.id}: {error.code or 'error'}{line}: {error.message}")
        state_path.unlink(missing_ok=True)
        return batch

    try:
        batch = None
        if state_path.exists():
            try:
                state = json.loads(state_path.read_text())
                batch_id = state["batch_id"]
            except (json.JSONDecodeError, KeyError) as error:
                raise TeacherError(
                    f"{state_path}: not a batch state file ({error}); check the batch by hand"
                ) from None
            batch = await finish(await _call(lambda: client.batches.retrieve(batch_id), config, sleep))
        missing = {key: value for key, value in keyed.items() if key not in ledger}
        if missing:
            lines = [
                json.dumps(
                    {
                        "custom_id": key,
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"model": config.model, "messages": messages, **params},
                    },
                    ensure_ascii=False,
                )
                for key, (messages, _) in missing.items()
            ]
            data = ("\n".join(lines) + "\n").encode()
            upload = await _call(
                lambda: client.files.create(file=("requests.jsonl", data), purpose="batch"), config, sleep
            )
            batch = await _call(
                lambda: client.batches.create(
                    input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
                ),
                config,
                sleep,
            )
            # Atomic and durable: a batch that exists must never be forgotten (it would be paid for twice).
            write_atomic(state_path, json.dumps({"batch_id": batch.id, "input_file_id": upload.id}))
            batch = await finish(batch)
        for key, (_, job_ids) in keyed.items():
            for job_id in job_ids:
                if key not in ledger:
                    where = f"batch {batch.id if batch else '-'} ({batch.status if batch else '-'})"
                    reason = why.get(key) or "; ".join(["no answer", *notes[:3]])
                    stats.failed[job_id] = redact(f"{where}: {reason}", os.environ.get(config.api_key_env))
                elif key in known:
                    stats.cached += 1
    finally:
        if own_client:
            await client.close()
    stats.seconds = time.monotonic() - started
    return stats
