"""Property-based fuzzing of the API (hypothesis): whatever the body, the answer is never a 5xx, and every
refusal is a JSON error with a message."""

from __future__ import annotations

import base64
import io
import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llavamed_fast.model import build
from llavamed_fast.serve.api import ServerLimits
from llavamed_fast.serve.engine import Engine
from llavamed_fast.serve.images import ImagePolicy
from llavamed_fast.serve.server import start_in_thread


def _png(size: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 30, 60)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


URLS = [
    _png(32),
    _png(300),  # over the pixel limit below
    "data:,",
    "data:image/png;base64,!!!",
    "data:image/png," + "A" * 10,
    "data:image/png;base64," + base64.b64encode(b"GIF89a broken").decode(),
    "http://127.0.0.1:1/x.png",
    "https://example.org/a.png",
    "ftp://example.org/a.png",
    "file:///etc/passwd",
    "",
    "<image>",
]

text = st.text(max_size=40) | st.sampled_from(
    ["<image>", "What is shown?", "", "\x00", "\ud800 lone surrogate"]
)
odd_floats = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0])
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text | scalars}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries({"url": st.sampled_from(URLS)}) | scalars,
        }
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["audio", "image", None, 3])}),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "tool", "", 3, None]),
            "content": text | st.lists(parts, max_size=3) | scalars,
        }
    ),
    max_size=4,
)
requests = st.one_of(
    st.fixed_dictionaries(
        {"messages": messages},
        optional={
            "model": st.sampled_from(["fuzz", "other", None, 1]),
            "max_tokens": st.integers(-3, 6) | scalars,
            "temperature": st.floats(-1, 3) | odd_floats | scalars,
            "top_p": st.floats(-1, 2) | odd_floats | scalars,
            "stop": st.lists(text, max_size=5) | text | scalars,
            "stream": st.booleans() | scalars,
            "seed": st.integers(-(2**65), 2**65) | scalars,
            "n": st.integers(-1, 3),
        },
    ),
    json_values,
)


@pytest.fixture(scope="module")
def server():
    engine = Engine(*build("tiny-v1.5", seed=9), max_batch=4)
    limits = ServerLimits(max_tokens=6, default_max_tokens=4, max_images=2, max_body_bytes=2**20)
    with start_in_thread(
        engine, model_name="fuzz", limits=limits, images=ImagePolicy(max_pixels=256 * 256)
    ) as running:
        yield running


def _encode(body) -> bytes:
    # Python's json writes NaN/Infinity, which strict JSON parsers refuse: the server must cope either way.
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=requests, raw=st.booleans())
def test_no_request_gets_a_5xx(server, body, raw):
    data = _encode(body) if not raw else _encode(body)[: max(1, len(_encode(body)) // 2)]  # cut JSON too
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=data,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code < 500, (response.status_code, response.text[:300], data[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
    elif "text/event-stream" in response.headers.get("content-type", ""):
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        reply = response.json()
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert not any(isinstance(v, float) and math.isnan(v) for v in reply["usage"].values())


def test_the_server_still_answers_after_the_fuzzing(server):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert response.status_code == 200
