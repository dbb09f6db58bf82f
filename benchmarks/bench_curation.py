"""Teacher-client throughput: requests/s against a local OpenAI-compatible server with a set latency.

The server (its own process, as a real one would be; real HTTP on loopback, HTTP/1.1 keep-alive) answers
every chat request after a latency drawn uniformly from ``--latency`` ± 50 %. With ``--concurrency`` requests in flight, the best possible rate is concurrency /
latency; the client (``llavamed_fast.data.teacher``: the ``openai`` SDK, the ledger fsync per reply, the
budgets and retries code) should reach at least 0.9 of it in steady state. Last line: JSON with
``requests_per_s`` (steady state: between the 10th and 90th percentile replies), ``ideal_requests_per_s``,
``fraction_of_ideal``, and the same over the whole run with its ramp-up and tail (``overall_...``). ``--smoke`` runs a few requests to check the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from llavamed_fast.data.ledger import Ledger
from llavamed_fast.data.teacher import TeacherConfig, run_jobs

REPLY = "User: What does the image show?\nAssistant: An axial CT slice of the chest."


def serve(latency: float, port: multiprocessing.connection.Connection) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers
        # Headers and body in one write: two small writes on one connection meet Nagle's algorithm and
        # the client's delayed ACK (~40 ms per reply), which no real server pays.
        wbufsize = 1 << 16

        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            time.sleep(latency * random.uniform(0.5, 1.5))  # real replies take different times
            body = json.dumps(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": REPLY},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 900, "completion_tokens": 150, "total_tokens": 1050},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        request_queue_size = (
            1024  # the listen backlog: 5 by default, too few for 64 clients connecting at once
        )

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port.send(server.server_address[1])
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # A GPT-4-class teacher takes seconds per conversation; 0.5 s keeps the run short while the client's
    # own cost per request (the SDK, JSON, the ledger's fsync: a few ms of CPU) stays a small part of it.
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per request")
    parser.add_argument(
        "--smoke", action="store_true", help="a few requests: checks the script, not the speed"
    )
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.concurrency, args.latency = 16, 4, 0.1
    receive, send = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.Process(target=serve, args=(args.latency, send), daemon=True)
    server.start()
    port = receive.recv()
    os.environ.setdefault("BENCH_TEACHER_KEY", "local")
    config = TeacherConfig(
        model="bench-teacher",
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key_env="BENCH_TEACHER_KEY",
        concurrency=args.concurrency,
    )
    # Caption-sized prompts, all different (distinct ledger keys).
    jobs = [
        (f"job{i}", [{"role": "user", "content": f"Figure Caption:\nAxial CT of case {i}. " + "word " * 150}])
        for i in range(args.requests)
    ]
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder) / "ledger.jsonl")
        # Warm-up, not timed: the SDK builds its request and response models on first use (about a second).
        warm = [(f"warm{i}", [{"role": "user", "content": f"warm-up {i}"}]) for i in range(args.concurrency)]
        asyncio.run(run_jobs(warm, config, ledger))
        done: list[float] = []
        started = time.perf_counter()
        stats = asyncio.run(
            run_jobs(jobs, config, ledger, on_reply=lambda _job: done.append(time.perf_counter()))
        )
        seconds = time.perf_counter() - started
        ledger.close()
    server.terminate()
    rate = stats.sent / seconds
    ideal = args.concurrency / args.latency
    # Steady state: replies between the 10th and the 90th percentile of arrival, leaving out the ramp-up
    # (every slot starts at once) and the tail (the last slots finish one by one), which finite runs add.
    first, last = done[len(done) // 10], done[(len(done) * 9) // 10]
    steady = ((len(done) * 9) // 10 - len(done) // 10) / (last - first)
    print(
        f"{stats.sent} requests in {seconds:.2f} s: {rate:.1f} req/s overall, {steady:.1f} in steady state "
        f"(ideal {ideal:.1f}); retries {stats.retries}"
    )
    print(
        json.dumps(
            {
                "requests_per_s": round(steady, 2),
                "ideal_requests_per_s": round(ideal, 2),
                "fraction_of_ideal": round(steady / ideal, 3),
                "overall_requests_per_s": round(rate, 2),
                "overall_fraction_of_ideal": round(rate / ideal, 3),
                "requests": stats.sent,
                "failed": len(stats.failed),
                "concurrency": args.concurrency,
                "latency_s": args.latency,
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
