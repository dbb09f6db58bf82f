"""Serving throughput: requests/s and time to first token at 1, 4 and 16 concurrent clients.

The server (``llavamed_fast.serve``: the engine's batched, cached decoding behind the OpenAI-compatible
API) runs in this process on loopback; the clients run in a child process (their own interpreter, as real
clients would be) and stream ``/v1/chat/completions`` with an image each. Greedy decoding, a fixed
``--max-tokens``; a random-init model seldom stops early, and the tokens actually generated are counted.

Models: ``--model tiny`` (the tiny-v1.5 preset; the CPU case) or ``--model 7b`` (random init with the
shapes of LLaVA-Med v1.5: CLIP-L/14-336 and a Mistral-7B-shaped LLM of ``--layers`` layers, bf16; the GPU
case). Last line: JSON with ``requests_per_s_C`` and ``ttft_ms_C`` (median) for each concurrency C.
``--smoke`` runs a few short requests at 1 and 4 clients to check the script.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import statistics
import time

import torch
from harness import report
from PIL import Image

from llavamed_fast.eval.datasets import shared_data_dir
from llavamed_fast.model import build, get_preset
from llavamed_fast.serve.api import ServerLimits
from llavamed_fast.serve.engine import Engine
from llavamed_fast.serve.server import start_in_thread


def seven_b_shaped(layers: int):
    return get_preset("tiny-v1.5").replace(
        name="serve-7b-shape",
        vision={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        text={
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": layers,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 4096,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
        max_length=4096,
    )


def image_urls(count: int) -> list[str]:
    folder = shared_data_dir() / "vqa-rad" / "images"
    paths = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    urls = []
    for i in range(count):
        if paths:
            data, kind = paths[i % len(paths)].read_bytes(), "jpeg"
        else:  # no shared data: a drawn image of the same kind of size
            buffer = io.BytesIO()
            Image.new("RGB", (512, 512), (i * 7 % 255, 90, 120)).save(buffer, format="PNG")
            data, kind = buffer.getvalue(), "png"
        urls.append(f"data:image/{kind};base64," + base64.b64encode(data).decode())
    return urls


async def _client_load(
    url: str, concurrency: int, requests: int, max_tokens: int, images: list[str]
) -> list[dict]:
    import httpx

    results: list[dict] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                            {"type": "text", "text": f"Describe finding {i} in this image."},
                        ],
                    }
                ],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start = time.perf_counter()
            first = None
            tokens = 0
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
            end = time.perf_counter()
            results.append({"start": start, "end": end, "ttft": (first or end) - start, "tokens": tokens})

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def _client_process(url, concurrency, requests, max_tokens, images, pipe) -> None:
    try:
        pipe.send(asyncio.run(_client_load(url, concurrency, requests, max_tokens, images)))
    except Exception as error:  # reported to the parent, which fails loudly
        pipe.send(f"{type(error).__name__}: {error}")


def run_level(url: str, concurrency: int, requests: int, max_tokens: int, images: list[str]) -> dict:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_client_process, args=(url, concurrency, requests, max_tokens, images, child)
    )
    process.start()
    results = parent.recv()
    process.join()
    if isinstance(results, str):
        raise RuntimeError(f"client load failed: {results}")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] * 1000 for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "latency_s_p50": statistics.median(r["end"] - r["start"] for r in results),
        "mean_completion_tokens": tokens / len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=("tiny", "7b"), default=None, help="default: 7b on a GPU, else tiny"
    )
    parser.add_argument("--layers", type=int, default=32, help="LLM layers of the 7b-shaped model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests", type=int, default=0, help="per level (default: 4 x concurrency, at least 8)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = args.model or ("7b" if device.type == "cuda" else "tiny")
    if args.smoke:
        kind, args.concurrency, args.max_tokens = "tiny", [1, 4], 4
    # Built on the device: random init of billions of parameters on the host would take minutes.
    with torch.device(device):
        if kind == "7b":
            model, processor = build(seven_b_shaped(args.layers), dtype=torch.bfloat16, seed=0)
        else:
            model, processor = build("tiny-v1.5", seed=0)
    engine = Engine(model.to(device), processor, max_batch=args.max_batch)
    images = image_urls(16)
    limits = ServerLimits(max_tokens=max(args.max_tokens, 16), max_concurrent=256)
    rows = []
    began = time.perf_counter()
    with start_in_thread(engine, model_name=kind, limits=limits) as server:
        run_level(server.url, 1, 2, 2, images)  # warm-up: first calls, allocator, kernels
        print(f"warm-up done after {time.perf_counter() - began:.1f} s", flush=True)
        for concurrency in args.concurrency:
            requests = args.requests or max(8, 4 * concurrency)
            if args.smoke:
                requests = concurrency
            rows.append(
                {"model": kind, **run_level(server.url, concurrency, requests, args.max_tokens, images)}
            )
            # Each level as soon as it is measured: a run cut short by a time limit keeps what it measured.
            print(
                "row " + json.dumps({**rows[-1], "after_s": round(time.perf_counter() - began, 1)}),
                flush=True,
            )
    headline = {"model": kind, "max_tokens": args.max_tokens}
    for r in rows:
        headline[f"requests_per_s_{r['concurrency']}"] = round(r["requests_per_s"], 3)
        headline[f"ttft_ms_{r['concurrency']}"] = round(r["ttft_ms_p50"], 1)
        headline[f"tokens_per_s_{r['concurrency']}"] = round(r["tokens_per_s"], 1)
    report("serve", device, rows, headline, save=not args.smoke)


if __name__ == "__main__":
    main()
