"""Files that survive a crash: whole files replaced atomically, and append-only logs whose last line may
have been cut. Shared by the curation steps (pure Python, no torch)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file beside it, fsync, rename. A reader sees the old file
    or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_log(path: str | os.PathLike[str]) -> tuple[list[str], int]:
    """The complete lines of an append-only log and how many bytes of a cut last line were removed from
    the file (a crash mid-write), so that the next append starts on a fresh line. Lines are split on
    ``"\\n"`` only: ``str.splitlines`` would also break at U+2028, U+0085 ... inside a value."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(complete)
            handle.flush()
            os.fsync(handle.fileno())
    return data[:complete].decode("utf-8").split("\n")[:-1], len(data) - complete
