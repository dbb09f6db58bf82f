"""Files that survive a crash: whole files replaced atomically, append-only logs whose last line may have
been cut, and directories (checkpoints, exported models) made whole before they are renamed into place.
Pure Python, no torch: the curation steps use it too."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8): a temporary file beside it, fsync, rename, fsync of
    the directory. A reader sees the old file or the new one, never half of one, even after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)  # the rename itself


def complete_lines(path: str | os.PathLike[str]) -> tuple[list[str], int]:
    """The complete lines of an append-only log, and how many bytes follow the last newline (a line cut by
    a crash mid-write, which decided nothing), leaving the file as it is. Lines are split on ``"\\n"``
    only: ``str.splitlines`` would also break at U+2028, U+0085 ... inside a value."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    return data[:complete].decode("utf-8").split("\n")[:-1], len(data) - complete


def read_log(path: str | os.PathLike[str]) -> tuple[list[str], int]:
    """:func:`complete_lines` for the log's writer: a cut last line is also removed from the file, so that
    the next append starts on a fresh line."""
    lines, cut = complete_lines(path)
    if cut:
        with open(path, "r+b") as handle:
            handle.truncate(Path(path).stat().st_size - cut)
            handle.flush()
            os.fsync(handle.fileno())
    return lines, cut


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory (its entries: a file created or renamed in it)."""
    path = Path(path)
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def seal_tree(root: str | os.PathLike[str]) -> None:
    """Make a freshly written directory tree ready to be renamed into place: every file gets the mode a new
    file gets here (0666 less the umask, read off ``root``'s own 0777 less the umask; safetensors writes
    0600, which would hide the files from the rest of a team), and every file and directory, deepest
    first, is fsynced."""
    root = Path(root)
    mode = root.stat().st_mode & 0o666
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            os.chmod(path, mode)
        fsync_path(path)
    fsync_path(root)
