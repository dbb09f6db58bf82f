"""``llavamed-fast chat``: talk to a checkpoint about an image in the terminal, replies streamed.

Commands: ``/image PATH`` loads another image (and starts a new conversation about it), ``/clear`` starts
the conversation again with the same image, ``/help``, ``/quit`` (or end of input). DICOM files are
windowed as their header says (``data/dicom.py``); nothing patient-identifying is printed.
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Callable
from typing import TextIO

from PIL import Image

from llavamed_fast.data.dicom import is_dicom, load_dicom
from llavamed_fast.data.images import ImageError, load_image
from llavamed_fast.data.templates import IMAGE_TOKEN, Message
from llavamed_fast.serve.api import DISCLAIMER
from llavamed_fast.serve.engine import Delta, Engine, Failed, Finished, RequestError, SamplingParams

HELP = "Commands: /image PATH (another image, new conversation), /clear (start over), /help, /quit"


def open_image(path: str) -> tuple[Image.Image, str]:
    """The image and a line that describes it (for DICOM: modality, size, window; no patient data)."""
    if is_dicom(path):
        image, info = load_dicom(path)
        return image, f"{path}: {info.describe()}"
    image = load_image(path)
    return image, f"{path}: {image.width}x{image.height}"


class ChatSession:
    """One terminal conversation over an engine (which must be running)."""

    def __init__(
        self, engine: Engine, params: SamplingParams, out: TextIO = sys.stdout, err: TextIO = sys.stderr
    ) -> None:
        self.engine, self.params, self.out, self.err = engine, params, out, err
        self.image: Image.Image | None = None
        self.messages: list[Message] = []

    def load(self, path: str) -> bool:
        try:
            image, description = open_image(path)
        except ImageError as error:
            print(f"error: {error}", file=self.err)
            return False
        self.image, self.messages = image, []
        print(f"[loaded {description}; new conversation]", file=self.out)
        return True

    def ask(self, text: str) -> str | None:
        if IMAGE_TOKEN in text:
            print(f"error: {IMAGE_TOKEN!r} is reserved; load images with /image", file=self.err)
            return None
        first = not self.messages and self.image is not None
        turn = Message("user", f"{IMAGE_TOKEN}\n{text}" if first else text)
        messages = [*self.messages, turn]
        images = [self.image] if self.image is not None else []
        events: queue.Queue = queue.Queue()
        try:
            self.engine.submit(messages, images, self.params, events.put)
        except (RequestError, ValueError) as error:
            print(f"error: {error}", file=self.err)
            return None
        while True:
            event = events.get()
            if isinstance(event, Delta):
                self.out.write(event.text)
                self.out.flush()
            elif isinstance(event, Finished):
                self.out.write("\n")
                self.messages = [*messages, Message("assistant", event.text)]
                return event.text
            elif isinstance(event, Failed):
                print(f"\nerror: {event.message}", file=self.err)
                return None

    def run(self, read: Callable[[str], str] = input) -> None:
        print(DISCLAIMER, file=self.out)
        print(HELP, file=self.out)
        while True:
            try:
                line = read("> ").strip()
            except EOFError:
                print(file=self.out)
                return
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return
            if line == "/help":
                print(HELP, file=self.out)
            elif line == "/clear":
                self.messages = []
                print("[conversation cleared]", file=self.out)
            elif line.startswith("/image"):
                path = line[len("/image") :].strip()
                if not path:
                    print("error: /image needs a path", file=self.err)
                else:
                    self.load(path)
            elif line.startswith("/"):
                print(f"error: unknown command {line.split()[0]!r}. {HELP}", file=self.err)
            else:
                self.ask(line)
