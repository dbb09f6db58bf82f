"""A content-addressed ledger of teacher replies: what has been paid for is on disk before it is used.

Each reply is appended as one JSON line ``{"key", "reply", "usage", "model", "time"[, "served_model"]}``
(``served_model``: the model name the server reported with the reply) and flushed and
fsynced before :meth:`Ledger.record` returns, so a run killed at any moment keeps every reply it received
(at most the line being written is lost, and it is cut off when the ledger is opened again). The key is
the SHA-256 of the request that produced the reply — model, messages and sampling parameters, as
canonical JSON — so a re-run asks only for what is not in the ledger, whatever order it goes in, and a
changed prompt is a new request rather than a stale hit. Nothing else is stored: no API keys, no headers.
Pure Python, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavamed_fast.data.durable import read_log


def request_key(
    model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any] | None = None
) -> str:
    """The ledger key of a chat request: SHA-256 of ``{"model", "messages", "params"}`` as canonical JSON
    (sorted keys, no spaces), so equal requests get equal keys however their dicts were built."""
    canonical = json.dumps(
        {"model": model, "messages": list(messages), "params": dict(params or {})},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Ledger:
    """Replies by request key, loaded from and appended to one JSONL file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.recovered_bytes = 0  # the partial last line cut off on opening, if any
        self._load()
        self._handle = open(self.path, "a", encoding="utf-8")  # kept open: appended and fsynced per reply

    def _load(self) -> None:
        lines, self.recovered_bytes = read_log(self.path)  # a partial last line (a crash) is cut off
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._entries[entry["key"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path}: line {number}: not a ledger entry ({error})") from None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def record(
        self,
        key: str,
        reply: str,
        *,
        model: str,
        usage: Mapping[str, int] | None = None,
        served_model: str | None = None,
    ) -> dict[str, Any]:
        """Append a reply and make it durable before returning. ``served_model`` is the model name the
        server reported (a dated version where the asked-for name is an alias)."""
        entry = {"key": key, "reply": reply, "usage": dict(usage or {}), "model": model, "time": time.time()}
        if served_model:
            entry["served_model"] = served_model
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._entries[key] = entry
        return entry

    def usage(self) -> dict[str, int]:
        """Token usage summed over every reply in the ledger."""
        total: dict[str, int] = {}
        for entry in self._entries.values():
            for name, count in entry.get("usage", {}).items():
                if isinstance(count, int):
                    total[name] = total.get(name, 0) + count
        return total

    def close(self) -> None:
        with self._lock:
            if not self._handle.closed:
                self._handle.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
