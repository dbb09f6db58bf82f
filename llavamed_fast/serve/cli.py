"""``llavamed-fast serve`` (the OpenAI-compatible API and the chat page) and ``llavamed-fast chat`` (the
terminal)."""

from __future__ import annotations

import argparse
import os
import sys

from llavamed_fast._argtypes import COUNT, NOT_NEGATIVE_INT, TEMPLATE_HELP

DTYPES = ("bfloat16", "float16", "float32")


def _serve(args: argparse.Namespace) -> int:
    from llavamed_fast.model.checkpoint import CheckpointError, checkpoint_name
    from llavamed_fast.serve.api import ServerLimits
    from llavamed_fast.serve.images import ImagePolicy
    from llavamed_fast.serve.server import is_loopback, load_engine, serve_forever

    api_key = args.api_key or os.environ.get(args.api_key_env) or None
    if not is_loopback(args.host) and not api_key:
        print(
            f"serve: binding to {args.host} (not loopback) needs an API key: set ${args.api_key_env} "
            "(or --api-key)",
            file=sys.stderr,
        )
        return 2
    try:
        engine = load_engine(
            args.model, template=args.template, device=args.device, dtype=args.dtype, max_batch=args.max_batch
        )
    except CheckpointError as error:
        print(f"serve: {error}", file=sys.stderr)
        return 2
    limits = ServerLimits(
        max_body_bytes=args.max_body_mb * 2**20,
        max_tokens=args.max_tokens,
        max_concurrent=args.max_concurrent,
        max_images=args.max_images,
    )
    images = ImagePolicy(
        max_bytes=args.max_image_mb * 2**20,
        max_pixels=args.max_image_pixels,
        allowed_hosts=tuple(h.lower() for h in args.allow_image_host),
        allow_private_networks=args.allow_private_image_hosts,
    )
    name = args.model_name or checkpoint_name(args.model)
    print(f"serving {name} on http://{args.host}:{args.port} (API at /v1, chat page at /)", file=sys.stderr)
    serve_forever(
        engine, model_name=name, host=args.host, port=args.port, api_key=api_key, limits=limits, images=images
    )
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llavamed_fast.model.checkpoint import CheckpointError
    from llavamed_fast.serve.chat import ChatSession
    from llavamed_fast.serve.engine import RequestError, SamplingParams
    from llavamed_fast.serve.server import load_engine

    try:
        params = SamplingParams(
            max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p
        )
    except RequestError as error:
        print(f"chat: {error}", file=sys.stderr)
        return 2
    try:
        engine = load_engine(
            args.model, template=args.template, device=args.device, dtype=args.dtype, max_batch=1
        )
    except CheckpointError as error:
        print(f"chat: {error}", file=sys.stderr)
        return 2
    with engine:
        session = ChatSession(engine, params)
        if args.image and not session.load(args.image):
            return 2
        session.run()
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser("chat", help="talk to a checkpoint about an image in the terminal")
    chat.add_argument("--model", required=True, help="a checkpoint directory (HF layout)")
    chat.add_argument("--image", help="an image or DICOM file (or load one later with /image PATH)")
    chat.add_argument("--template", help=TEMPLATE_HELP)
    chat.add_argument("--device", help="default: cuda if available, else cpu")
    chat.add_argument("--dtype", choices=DTYPES)
    chat.add_argument("--max-tokens", type=COUNT, default=512)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.set_defaults(run=_chat)

    serve = commands.add_parser("serve", help="an OpenAI-compatible API and a chat page for a checkpoint")
    serve.add_argument("--model", required=True, help="a checkpoint directory (HF layout)")
    serve.add_argument(
        "--model-name", help="the id clients use (default: the folder name; RUN for RUN/model)"
    )
    serve.add_argument("--template", help=TEMPLATE_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="default loopback; any other address needs a key")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="prefer the environment variable: a flag shows in the process list")
    serve.add_argument("--api-key-env", default="LLAVAMED_API_KEY")
    serve.add_argument("--device", help="default: cuda if available, else cpu")
    serve.add_argument("--dtype", choices=DTYPES)
    serve.add_argument("--max-batch", type=COUNT, default=8, help="requests decoded together")
    serve.add_argument("--max-concurrent", type=COUNT, default=64, help="requests in flight (429 beyond)")
    serve.add_argument(
        "--max-tokens", type=COUNT, default=2048, help="the largest max_tokens a request may ask"
    )
    serve.add_argument("--max-images", type=NOT_NEGATIVE_INT, default=4, help="images per request")
    serve.add_argument("--max-body-mb", type=COUNT, default=32)
    serve.add_argument("--max-image-mb", type=COUNT, default=10)
    serve.add_argument("--max-image-pixels", type=COUNT, default=4096 * 4096)
    serve.add_argument(
        "--allow-image-host", action="append", default=[], help="fetch image URLs from this host (repeatable)"
    )
    serve.add_argument(
        "--allow-private-image-hosts",
        action="store_true",
        help="allowed image hosts may resolve to private addresses (an image server inside your network)",
    )
    serve.set_defaults(run=_serve)
