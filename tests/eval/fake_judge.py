"""An OpenAI-compatible judge on loopback for the chat-benchmark tests: real HTTP, a scripted, known rule.

It reads the caption and the two answers out of the request and scores each answer by how many of the
caption's words (4+ letters) it uses: ``1 + min(8, shared words)``, plus one point for whichever answer is
shown first (a position bias the benchmark must cancel). The first line is ``"S1 S2"``, then a sentence.
``fail[question text]`` makes the next requests about that question get the listed HTTP statuses, and
``malformed`` questions get a reply without scores, and ``scripted[question text]`` is called with the two
answers (Assistant 1's first) for a reply text of the test's own. Requests are counted per question.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "judge-test-key-not-secret"
SERVED_MODEL = "fake-judge-2026-01-01"

_WORD = re.compile(r"[a-z]{4,}")


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def base_score(answer: str, caption: str) -> int:
    return 1 + min(8, len(words(answer) & words(caption)))


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


class FakeJudge:
    def __init__(self) -> None:
        self.fail: dict[str, list[int]] = {}
        self.malformed: set[str] = set()
        self.scripted: dict[str, Callable[[str, str], str]] = {}
        self.requests: Counter[str] = Counter()
        self.keys_seen: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, body: dict) -> tuple[int, dict]:
        prompt = body["messages"][-1]["content"]
        caption = _between(prompt, "Caption (", "\nSentences that cite").split("): ", 1)[1]
        question = _between(prompt, "[Question]\n", "\n\n[Assistant 1]")
        first = _between(prompt, "[Assistant 1]\n", "[End of Assistant 1]")
        second = _between(prompt, "[Assistant 2]\n", "[End of Assistant 2]")
        with self.lock:
            self.requests[question] += 1
            statuses = self.fail.get(question)
            if statuses:
                return statuses.pop(0), {
                    "error": {"message": "scripted failure", "type": "invalid_request_error"}
                }
            bad = question in self.malformed
            script = self.scripted.get(question)
        if script is not None:
            text = script(first, second)
        elif bad:
            text = "Both answers are fine."
        else:
            text = f"{base_score(first, caption) + 1} {base_score(second, caption)}\nScored by caption words."
        return 200, {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": SERVED_MODEL,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": len(prompt) // 4,
                "completion_tokens": 12,
                "total_tokens": len(prompt) // 4 + 12,
            },
        }

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.keys_seen.add(self.headers.get("Authorization", ""))
                if self.path != "/v1/chat/completions":
                    status, payload = 404, {"error": {"message": f"no route {self.path}"}}
                elif self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    status, payload = 401, {"error": {"message": "bad key", "type": "invalid_api_key"}}
                else:
                    status, payload = judge.reply(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
