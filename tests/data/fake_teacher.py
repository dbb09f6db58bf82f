"""An OpenAI-compatible chat server on loopback for the curation tests: real HTTP, scripted behaviour.

Each request names its figure by a ``[fig:ID]`` tag in the last user message. ``script[ID]`` is a list of
what the next attempts get, in order: ``"ok"``, ``"429"`` (with ``retry-after``), any other status code (``"500"``, ``"400"``),
``"slow"`` (a reply after ``slow_seconds``) or ``"malformed"`` (a 200 whose text holds no conversation);
after the list is used up, ``"ok"``. The server counts attempts and successful replies per figure.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "test-key-not-secret"


class FakeTeacher:
    def __init__(self, *, slow_seconds: float = 0.5, retry_after: float = 0.3) -> None:
        self.script: dict[str, list[str]] = {}
        self.attempts: Counter[str] = Counter()
        self.replies: Counter[str] = Counter()
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeTeacher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next(self, figure: str) -> str:
        with self.lock:
            self.attempts[figure] += 1
            steps = self.script.get(figure, [])
            return steps.pop(0) if steps else "ok"

    def _handler(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    self._send(
                        401,
                        {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}},
                    )
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                last = request["messages"][-1]["content"]
                figure = re.search(r"\[fig:([\w-]+)\]", last).group(1)
                action = teacher._next(figure)
                if action == "429":
                    self._send(
                        429,
                        {"error": {"message": "Rate limit reached"}},
                        [("retry-after", str(teacher.retry_after))],
                    )
                    return
                if action.isdigit():  # "500", "502", "400", ...
                    self._send(int(action), {"error": {"message": f"scripted {action}"}})
                    return
                if action == "slow":
                    time.sleep(teacher.slow_seconds)
                text = (
                    "Sorry, that is not something I can write."
                    if action == "malformed"
                    else f"User: What does image {figure} show?\nAssistant: It shows finding {figure}.\n"
                    f"User: Where?\nAssistant: On the left of image {figure}."
                )
                with teacher.lock:
                    teacher.replies[figure] += 1
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{figure}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": request["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                    },
                )

        return Handler


def figures(count: int, *, prefix: str = "f") -> list[dict]:
    return [
        {
            "pair_id": f"1_{prefix}{i}",
            "caption": f"Axial CT of case {i} [fig:{prefix}{i}].",
            "domain": {"ct_scan": True},
        }
        for i in range(count)
    ]
