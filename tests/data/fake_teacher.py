"""An OpenAI-compatible chat server on loopback for the curation tests: real HTTP, scripted behaviour.

Each request names its figure by a ``[fig:ID]`` tag in the last user message. ``script[ID]`` is a list of
what the next attempts get, in order: ``"ok"``, ``"429"`` (with ``retry-after``), any other status code (``"500"``, ``"400"``),
``"slow"`` (a reply after ``slow_seconds``), ``"malformed"`` (a 200 whose text holds no conversation),
``"badjson"`` (a 200 declared JSON whose body is cut off) or ``"html"`` (a 200 with a gateway's HTML page);
after the list is used up, ``"ok"``. The server counts attempts and successful replies per figure. With
``echo_key``, a 401 repeats the key it was sent, as some gateways do.

It also serves the Batch API's part that the client uses (``POST /v1/files`` multipart, ``POST
/v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/files/{id}/content``): a batch is ``validating``, then
``in_progress``, then ``completed`` on successive retrievals, and answers each line as a chat request
(answers in the output file, failed requests in the error file, as the real API does). A figure in
``garble`` gets its result line cut short.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "test-key-not-secret"


class FakeTeacher:
    def __init__(
        self, *, slow_seconds: float = 0.5, retry_after: float = 0.3, echo_key: bool = False
    ) -> None:
        self.echo_key = echo_key
        self.script: dict[str, list[str]] = {}
        self.attempts: Counter[str] = Counter()
        self.replies: Counter[str] = Counter()
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.lock = threading.RLock()  # the batch completion asks for replies while holding it
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batches_created = 0
        self.garble: set[str] = set()  # figures whose batch result line is cut short
        self._ids = itertools.count(1)
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

    def _completion(self, figure: str, action: str, model: str) -> dict:
        text = (
            "Sorry, that is not something I can write."
            if action == "malformed"
            else f"User: What does image {figure} show?\nAssistant: It shows finding {figure}.\n"
            f"User: Where?\nAssistant: On the left of image {figure}."
        )
        with self.lock:
            self.replies[figure] += 1
        return {
            "id": f"chatcmpl-{figure}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }

    def _advance(self, batch: dict) -> None:
        """validating -> in_progress -> completed (answering every line) on successive retrievals."""
        if batch["status"] == "validating":
            batch["status"] = "in_progress"
            return
        if batch["status"] != "in_progress":
            return
        out, errors = [], []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            request = json.loads(line)
            figure = re.search(r"\[fig:([\w-]+)\]", request["body"]["messages"][-1]["content"]).group(1)
            action = self._next(figure)
            if action.isdigit():  # as the real API: failed requests go to the batch's error file
                response = {"status_code": int(action), "body": {"error": {"message": f"scripted {action}"}}}
            else:
                response = {
                    "status_code": 200,
                    "body": self._completion(figure, action, request["body"]["model"]),
                }
            result = json.dumps(
                {"id": f"r{next(self._ids)}", "custom_id": request["custom_id"], "response": response}
            )
            if figure in self.garble:
                result = result[: len(result) // 2]  # a line cut short
            (errors if action.isdigit() else out).append(result)
        for name, lines in (("output_file_id", out), ("error_file_id", errors)):
            if lines:
                file_id = f"file-{next(self._ids)}"
                self.files[file_id] = ("\n".join(lines) + "\n").encode()
                batch[name] = file_id
        batch.update(status="completed", completed_at=int(time.time()))

    def _handler(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body, headers=(), content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self):
                sent = self.headers.get("Authorization", "")
                if sent == f"Bearer {API_KEY}":
                    return True
                message = "Incorrect API key provided" + (
                    f": {sent.removeprefix('Bearer ')}" if teacher.echo_key else ""
                )
                self._send(401, {"error": {"message": message, "type": "invalid_request_error"}})
                return False

            def do_GET(self):
                if not self._authorised():
                    return
                found = re.fullmatch(r"/v1/batches/([\w-]+)", self.path)
                if found and found.group(1) in teacher.batches:
                    batch = teacher.batches[found.group(1)]
                    with teacher.lock:
                        teacher._advance(batch)
                    self._send(200, batch)
                    return
                found = re.fullmatch(r"/v1/files/([\w-]+)/content", self.path)
                if found and found.group(1) in teacher.files:
                    data = teacher.files[found.group(1)]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def _batch_routes(self, body):
                if self.path == "/v1/files":
                    head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + body)
                    parts = {
                        p.get_param("name", header="content-disposition"): p for p in message.iter_parts()
                    }
                    file_id = f"file-{next(teacher._ids)}"
                    teacher.files[file_id] = parts["file"].get_payload(decode=True)
                    purpose = parts["purpose"].get_content().strip()
                    self._send(200, {"id": file_id, "object": "file", "bytes": len(teacher.files[file_id]),
                                     "created_at": int(time.time()), "filename": "requests.jsonl",
                                     "purpose": purpose, "status": "processed"})  # fmt: skip
                    return True
                if self.path == "/v1/batches":
                    request = json.loads(body)
                    batch_id = f"batch-{next(teacher._ids)}"
                    teacher.batches[batch_id] = {
                        "id": batch_id, "object": "batch", "endpoint": request["endpoint"],
                        "input_file_id": request["input_file_id"], "completion_window": request["completion_window"],
                        "status": "validating", "created_at": int(time.time()),
                    }  # fmt: skip
                    teacher.batches_created += 1
                    self._send(200, teacher.batches[batch_id])
                    return True
                return False

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if not self._authorised() or self._batch_routes(body):
                    return
                request = json.loads(body)
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
                if action == "badjson":  # a proxy that cut the body off
                    self._send(200, b'{"id": "chatcmpl-cut", "choi')
                    return
                if action == "html":  # a gateway's error page, sent as a 200
                    self._send(200, b"<html><body>Bad gateway</body></html>", content_type="text/html")
                    return
                if action == "slow":
                    time.sleep(teacher.slow_seconds)
                self._send(200, teacher._completion(figure, action, request["model"]))

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
