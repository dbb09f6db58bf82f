"""The HTTP API on loopback with a tiny checkpoint, through the ``openai`` SDK and raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from PIL import Image

from llavamed_fast.data.templates import Message
from llavamed_fast.model import build
from llavamed_fast.model.generate import greedy_generate
from llavamed_fast.serve.api import ServerLimits
from llavamed_fast.serve.engine import Engine
from llavamed_fast.serve.images import ImagePolicy
from llavamed_fast.serve.server import start_in_thread

KEY = "serve-test-key-not-secret"
NEW = 10


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served(vqa_rad_images):
    model, processor = build("tiny-v1.5", seed=4)
    reference = (model, processor)
    engine = Engine(*build("tiny-v1.5", seed=4), max_batch=8)
    limits = ServerLimits(max_body_bytes=3 * 2**20, max_tokens=64, max_images=2, max_messages=8)
    images = ImagePolicy(max_bytes=2 * 2**20, max_pixels=2048 * 2048)
    with start_in_thread(engine, model_name="tiny-test", api_key=KEY, limits=limits, images=images) as server:
        yield server, reference


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(question: str, image: Image.Image) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": question},
            ],
        }
    ]


def reference_reply(served, question, image, max_new_tokens=NEW):
    _, (model, processor) = served
    return greedy_generate(
        model, processor, [Message("user", f"<image>\n{question}")], [image], max_new_tokens=max_new_tokens
    )


def test_plain_and_streamed_completion_with_an_image(served, client, vqa_rad_images):
    image = Image.open(vqa_rad_images[5]).convert("RGB")
    expected = reference_reply(served, "What does this scan show?", image)
    reply = client.chat.completions.create(
        model="tiny-test", messages=ask("What does this scan show?", image), max_tokens=NEW
    )
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == len(expected.token_ids)
    stream = client.chat.completions.create(
        model="tiny-test",
        messages=ask("What does this scan show?", image),
        max_tokens=NEW,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        reply.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_multi_turn_and_text_only(served, client, vqa_rad_images):
    image = Image.open(vqa_rad_images[9]).convert("RGB")
    messages = [
        *ask("Is this a chest X-ray?", image),
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Anything abnormal?"},
    ]
    _, (model, processor) = served
    expected = greedy_generate(
        model,
        processor,
        [
            Message("user", "<image>\nIs this a chest X-ray?"),
            Message("assistant", "Yes."),
            Message("user", "Anything abnormal?"),
        ],
        [image],
        max_new_tokens=NEW,
    )
    reply = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=NEW)
    assert reply.choices[0].message.content == expected.text
    plain = client.chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert plain.choices[0].message.content is not None


def test_concurrent_clients_are_batched_and_each_gets_its_reply(served, client, vqa_rad_images):
    server, _ = served
    jobs = [
        (f"Question number {i}: what is seen?", Image.open(vqa_rad_images[20 + i]).convert("RGB"))
        for i in range(8)
    ]
    expected = [reference_reply(served, q, im).text for q, im in jobs]
    got: dict[int, str] = {}

    def one(i: int) -> None:
        question, image = jobs[i]
        got[i] = (
            client.chat.completions.create(model="tiny-test", messages=ask(question, image), max_tokens=NEW)
            .choices[0]
            .message.content
        )

    before = server.engine.max_rows_seen
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [got[i] for i in range(len(jobs))] == expected
    assert server.engine.max_rows_seen > 1 or before > 1  # requests shared forward passes


def test_models_health_and_the_page(served, client):
    server, _ = served
    assert [m.id for m in client.models.list()] == ["tiny-test"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-test"
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "Research use only" in page.text and "tiny-test" in page.text


def post(
    server, body, *, key=KEY, raw: bytes | Iterator[bytes] | None = None, headers=None
) -> httpx.Response:
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    if raw is not None:
        all_headers["Content-Type"] = "application/json"
        return httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers=all_headers, timeout=60)
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=all_headers, timeout=60)


def test_bad_requests_get_a_4xx_that_says_what_is_wrong(served, vqa_rad_images):
    server, _ = served
    image = Image.open(vqa_rad_images[0]).convert("RGB")
    good = {"messages": ask("What is it?", image), "max_tokens": 2}
    small = image.resize((64, 64))
    huge = Image.new("RGB", (2100, 2100), (40, 40, 40))  # 4.4 M pixels > 4.2 M, a small PNG
    noise = Image.frombytes("RGB", (850, 850), os.urandom(850 * 850 * 3))  # ~2.2 MB as PNG > 2 MB
    cases = [
        (post(server, None, raw=b'{"messages": [}'), 400, "not valid JSON"),
        (
            post(server, None, raw=b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
            400,
            "lone surrogate",
        ),
        (post(server, {"messages": "hello"}), 400, "messages"),
        (post(server, {}), 400, "messages"),
        (post(server, {"messages": [{"role": "doctor", "content": "hi"}]}), 400, "messages.0.role"),
        (
            post(server, {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
            400,
            "messages.0.content",
        ),
        (post(server, {**good, "max_tokens": "many"}), 400, "max_tokens"),
        (post(server, {**good, "max_tokens": 10_000}), 400, "at most 64"),
        (post(server, {**good, "temperature": 7}), 400, "temperature"),
        (post(server, {**good, "n": 3}), 400, "n"),
        (post(server, {**good, "model": "gpt-4"}), 404, "not served here"),
        (post(server, {"messages": ask("Big?", huge)}), 400, "pixels"),
        (post(server, {"messages": ask("Heavy?", noise)}), 400, "larger than"),
        (post(server, {"messages": [{"role": "user", "content": "x" * (4 * 2**20)}]}), 413, "larger than"),
        (post(server, _with_url("https://example.org/scan.png")), 400, "not accepted"),
        (post(server, _with_url("file:///etc/passwd")), 400, "not accepted"),
        (post(server, _with_url("data:image/png;base64,@@@@")), 400, "not valid base64"),
        (
            post(
                server,
                _with_url("data:image/png;base64," + base64.b64encode(b"not a recognised image").decode()),
            ),
            400,
            "not a recognised image",
        ),
        (post(server, {"messages": [{"role": "user", "content": "look: <image>"}]}), 400, "may not contain"),
        (post(server, {"messages": [{"role": "assistant", "content": "hi"}]}), 400, "last message"),
        (
            post(server, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            400,
            "alternate",
        ),
        (
            post(
                server,
                {
                    "messages": [
                        *ask("1", small),
                        {"role": "assistant", "content": "x"},
                        *ask("2", small),
                        {"role": "assistant", "content": "y"},
                        *ask("3", small),
                    ]
                },
            ),
            400,
            "at most 2 images",
        ),
        (post(server, good, key=None), 401, "API key"),
        (post(server, good, key="wrong"), 401, "API key"),
        (
            httpx.get(f"{server.url}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}),
            404,
            "Not Found",
        ),
    ]
    for number, (response, status, words) in enumerate(cases):
        assert response.status_code == status, (number, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert words.lower() in error["message"].lower(), (number, error)
        assert "Traceback" not in response.text
    # The server keeps serving.
    assert post(server, good).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413_as_soon_as_it_passes_the_limit(served):
    server, _ = served
    limit = 3 * 2**20
    # A chunked body declares no length. Sent whole (by httpx, 8 MB of text), it gets the 413 a declared
    # length would get, not an answer about its content.
    sent = 0

    def chunks():
        nonlocal sent
        yield b'{"messages": [{"role": "user", "content": "'
        while sent < 8 * 2**20:
            sent += 2**16
            yield b"x" * 2**16
        yield b'"}], "max_tokens": 1}'

    response = post(server, None, raw=chunks())  # httpx streams a generator as Transfer-Encoding: chunked
    assert response.request.headers["transfer-encoding"] == "chunked" and sent == 8 * 2**20
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"]["message"] == f"the request body is larger than {limit} bytes"
    # A body that never ends: 4 MB, then nothing more and no last chunk. The server must answer once the
    # limit is passed, not wait for the rest (which never comes) to read it all.
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        piece = b"x" * 2**16
        for _ in range(64):
            connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, body = _read_response(connection)
    assert status == 413 and json.loads(body)["error"]["message"].startswith("the request body is larger")
    assert post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200


def _read_response(connection: socket.socket) -> tuple[int, bytes]:
    """The status and body of one HTTP/1.1 response with a Content-Length (a socket.timeout if none comes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = connection.recv(65536)
        assert more, "the server closed the connection without a response"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        body += connection.recv(65536)
    return int(lines[0].split()[1]), body[:length]


def test_malformed_parts_and_seeds_say_where_and_what_in_plain_words(served, client):
    server, _ = served
    hello = {"role": "user", "content": "hello"}
    reply = {"role": "assistant", "content": "hi"}

    def turn(*parts) -> dict:
        return {
            "messages": [hello, reply, {"role": "user", "content": [{"type": "text", "text": "?"}, *parts]}]
        }

    cases = [
        (turn({"type": "audio", "audio": "..."}), "messages.2.content.1", "unknown part type 'audio'"),
        (turn({"text": "no type"}), "messages.2.content.1", 'has no "type"'),
        (turn("just a string"), "messages.2.content.1", "must be a JSON object"),
        (turn({"type": "text"}), "messages.2.content.1.text", "is required"),
        (turn({"type": "text", "text": 3}), "messages.2.content.1.text", "valid string"),
        (turn({"type": "image_url", "image_url": {}}), "messages.2.content.1.image_url.url", "is required"),
        (turn({"type": "image_url", "image_url": "data:,"}), "messages.2.content.1.image_url", "JSON object"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "a string or a list of parts"),
        ({"messages": [hello], "stop": 5}, "stop", "a string or a list of strings"),
        ({"messages": [hello], "seed": 2**64}, "seed", "less than or equal to 9223372036854775807"),
        (
            {"messages": [hello], "seed": -(2**63) - 1},
            "seed",
            "greater than or equal to -9223372036854775808",
        ),
    ]
    for number, (body, param, words) in enumerate(cases):
        response = post(server, body)
        assert response.status_code == 400, (number, response.text[:300])
        error = response.json()["error"]
        assert error["param"] == param, (number, error)
        assert error["message"].startswith(f"{param}: ") and words in error["message"], (number, error)
        # No pydantic internals: union branches ("content.str", "list[tagged-union[...]]") or tags.
        assert not any(noise in error["message"] for noise in (".str", "tagged-union", "list[")), error
    # The SDK sees the parameter by name; the extremes of the range are seeds like any other.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-test", messages=[hello], max_tokens=1, seed=2**63)
    assert refused.value.param == "seed"
    for seed in (2**63 - 1, -(2**63)):
        done = client.chat.completions.create(
            model="tiny-test", messages=[hello], max_tokens=2, temperature=1.0, seed=seed
        )
        assert done.choices[0].finish_reason in ("stop", "length")


def _with_url(url: str) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ]
    }


def test_sdk_errors_are_the_sdks_own(served):
    server, _ = served
    unauthorised = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauthorised.models.list()
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        good.chat.completions.create(
            model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000
        )
