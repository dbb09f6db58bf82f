"""Figure images: download, check, record. Resumable; pure Python (urllib, tarfile, Pillow), no torch.

Two kinds of source:

- **per file**: a figure record from ``curate pmc`` (``pmcid``, ``graphic``) and a URL template such as
  ``https://europepmc.org/articles/{pmcid}/bin/{graphic}.jpg``;
- **article packages**: LLaVA-Med's URL list (``{"pair_id", "pmc_tar_url", "image_file_path"}``): each
  package (``.tar.gz``) is downloaded once and the listed images are read out of it.

Every item ends with a status in ``DIR/manifest.jsonl`` (appended and fsynced as it is decided):
``ok`` (with the file's SHA-256 and size), ``not_found`` (HTTP 404/410, or the image not in its package),
``licence_excluded`` (the licence policy said no; nothing downloaded), ``corrupt`` (a truncated body or
bytes Pillow cannot decode) or ``error`` (still failing after the retries: timeouts, 5xx). A second run
skips every item whose ``ok`` file is still there with its checksum, and tries the others again.

Package members are never extracted by path: the image is read from the archive and written under a name
made from its ``pair_id``, inside the output folder, so no member name ("../..", an absolute path, a
link) can place a file anywhere else; links and other non-files are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import IncompleteRead, InvalidURL
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from llavamed_fast.data import selection
from llavamed_fast.data.alignment import image_file_name
from llavamed_fast.data.durable import read_log

STATUSES = ("ok", "not_found", "licence_excluded", "corrupt", "error")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class FetchConfig:
    out: Path
    url_template: str | None = None  # per-file source, formatted with the record's string fields
    concurrency: int = 8
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    licence: str = "any-including-unknown"  # see selection.licence_allows
    user_agent: str = "llavamed-fast (research data curation)"


class _Failure(Exception):
    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class Manifest:
    """``manifest.jsonl``: one line per decided item, last line per pair id wins; appended and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        for line in read_log(path)[0]:  # a line cut by a crash is cut off, so the next one starts clean
            if line.strip():
                try:
                    entry = json.loads(line)
                    self.entries[entry["pair_id"]] = entry
                except (json.JSONDecodeError, KeyError):
                    continue  # not an entry: that item is simply tried again
        self._lock = threading.Lock()
        self._handle = open(path, "a", encoding="utf-8")  # kept open: appended and fsynced per item

    def done(self, pair_id: str, folder: Path) -> bool:
        entry = self.entries.get(pair_id)
        if not entry or entry["status"] != "ok":
            return False
        path = folder / entry["file"]
        return path.is_file() and _sha256(path.read_bytes()) == entry["sha256"]

    def write(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self.entries[entry["pair_id"]] = entry

    def close(self) -> None:
        self._handle.close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(url: str, config: FetchConfig) -> bytes:
    """The body at ``url``, retried on timeouts, dropped connections and 5xx; 404/410 are not retried."""
    last = ""
    for attempt in range(config.retries + 1):
        if attempt:
            time.sleep(config.backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, headers={"User-Agent": config.user_agent})
        try:
            with urllib.request.urlopen(request, timeout=config.timeout) as response:
                return response.read()  # IncompleteRead when the body is shorter than Content-Length
        except urllib.error.HTTPError as error:
            if error.code in (404, 410):
                raise _Failure("not_found", f"HTTP {error.code} for {url}") from None
            last = f"HTTP {error.code} for {url}"
            if error.code < 500 and error.code not in (408, 429):
                break
        except IncompleteRead as error:
            last = f"truncated body from {url}: {len(error.partial)} bytes, {error.expected} more expected"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            last = f"{type(error).__name__} for {url}: {getattr(error, 'reason', error)}"
        except (ValueError, InvalidURL) as error:  # a space in the URL, an unknown scheme: no retry helps
            raise _Failure("error", f"bad URL {url!r}: {error}") from None
    status = "corrupt" if last.startswith("truncated") else "error"
    raise _Failure(status, last)


def _check_image(data: bytes, where: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: a cut file fails here, not later in training
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _Failure("corrupt", f"{where}: not a readable image ({error})") from None


def _save(data: bytes, folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    temporary = path.with_name(path.name + ".part")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return {"file": name, "sha256": _sha256(data), "bytes": len(data)}


def _member(archive: tarfile.TarFile, wanted: str) -> bytes:
    """The bytes of member ``wanted`` (matched on its normalised path, or on its final part when the
    package has a top folder the list leaves out); only regular files are read."""
    wanted = wanted.strip("/")
    candidates = [m for m in archive.getmembers() if m.name.strip("/") == wanted]
    if not candidates:
        candidates = [m for m in archive.getmembers() if m.name.strip("/").endswith("/" + wanted)]
    if not candidates:
        raise _Failure("not_found", f"{wanted} is not in the package")
    member = candidates[0]
    if not member.isfile():
        raise _Failure(
            "corrupt",
            f"{wanted} in the package is a {'link' if member.issym() or member.islnk() else 'non-file'}, refused",
        )
    handle = archive.extractfile(member)
    if handle is None:
        raise _Failure("corrupt", f"{wanted} cannot be read from the package")
    return handle.read()


def fetch(records: Iterable[Mapping[str, Any]], config: FetchConfig) -> dict[str, int]:
    """Fetch every record's image into ``config.out``; returns the count per status (``skipped`` for items
    already done, ``duplicate`` for a pair id seen earlier in ``records``: only its first record is used)."""
    selection.licence_allows(None, config.licence)  # an unknown policy is an error before anything is done
    folder = Path(config.out)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(folder / "manifest.jsonl")
    counts: Counter[str] = Counter()
    per_file: list[Mapping[str, Any]] = []
    packages: dict[str, list[Mapping[str, Any]]] = {}
    owners = {entry["file"]: pid for pid, entry in manifest.entries.items() if entry.get("file")}
    seen: set[str] = set()
    for record in records:
        pair_id = record.get("pair_id")
        if not pair_id:
            raise ValueError(f"a record without a pair_id: {dict(record)!r:.200}")
        if str(pair_id) in seen:  # one file per pair id: a repeat would be fetched and counted twice
            counts["duplicate"] += 1
            continue
        seen.add(str(pair_id))
        try:
            name = image_file_name(str(pair_id))
        except ValueError as error:
            manifest.write({"pair_id": pair_id, "status": "error", "detail": str(error)})
            counts["error"] += 1
            continue
        licence = record.get("licence")
        try:
            allowed = selection.licence_allows(licence, config.licence)
        except ValueError as error:  # a licence of the wrong type in a hand-made record
            manifest.write({"pair_id": pair_id, "status": "error", "detail": str(error)})
            counts["error"] += 1
            continue
        if owners.setdefault(name, pair_id) != pair_id:  # "1/F1" and "1_F1" would share one file
            manifest.write(
                {"pair_id": pair_id, "status": "error", "detail": f"file {name} is {owners[name]}'s"}
            )
            counts["error"] += 1
        elif manifest.done(pair_id, folder):
            counts["skipped"] += 1
        elif not allowed:
            code = licence.get("code") if isinstance(licence, Mapping) else None
            manifest.write({"pair_id": pair_id, "status": "licence_excluded", "detail": f"licence {code}"})
            counts["licence_excluded"] += 1
        elif record.get("pmc_tar_url"):
            packages.setdefault(record["pmc_tar_url"], []).append(record)
        else:
            per_file.append(record)

    def one(record: Mapping[str, Any]) -> str:
        pair_id = record["pair_id"]
        if not config.url_template:
            raise ValueError("per-file records need a URL template (--url-template)")
        fields = {k: v for k, v in record.items() if isinstance(v, str)}
        try:
            url = config.url_template.format(**fields)
        except KeyError as missing:
            manifest.write(
                {
                    "pair_id": pair_id,
                    "status": "error",
                    "detail": f"record has no field {missing} for the URL",
                }
            )
            return "error"
        try:
            data = _download(url, config)
            _check_image(data, url)
            saved = _save(data, folder, image_file_name(pair_id))
        except _Failure as failure:
            manifest.write(
                {"pair_id": pair_id, "status": failure.status, "detail": failure.detail, "url": url}
            )
            return failure.status
        manifest.write({"pair_id": pair_id, "status": "ok", "url": url, **saved})
        return "ok"

    def package(url: str, items: list[Mapping[str, Any]]) -> list[str]:
        try:
            data = _download(url, config)
        except _Failure as failure:
            for item in items:
                manifest.write(
                    {
                        "pair_id": item["pair_id"],
                        "status": failure.status,
                        "detail": failure.detail,
                        "url": url,
                    }
                )
            return [failure.status] * len(items)
        statuses = []
        with tempfile.TemporaryFile() as spool:  # packages can be large: not kept in memory twice
            spool.write(data)
            del data
            spool.seek(0)
            try:
                archive = tarfile.open(fileobj=spool, mode="r:*")
            except (tarfile.TarError, EOFError, OSError) as error:
                for item in items:
                    manifest.write(
                        {
                            "pair_id": item["pair_id"],
                            "status": "corrupt",
                            "detail": f"{url}: not a readable package ({error})",
                            "url": url,
                        }
                    )
                return ["corrupt"] * len(items)
            with archive:
                for item in items:
                    inner = str(item.get("image_file_path", ""))
                    try:
                        image = _member(archive, inner)
                        _check_image(image, f"{url}!{inner}")
                        saved = _save(image, folder, image_file_name(item["pair_id"]))
                    except (_Failure, tarfile.TarError, EOFError) as failure:
                        status = getattr(failure, "status", "corrupt")
                        manifest.write(
                            {"pair_id": item["pair_id"], "status": status, "detail": str(failure), "url": url}
                        )
                        statuses.append(status)
                        continue
                    manifest.write(
                        {"pair_id": item["pair_id"], "status": "ok", "url": url, "member": inner, **saved}
                    )
                    statuses.append("ok")
        return statuses

    try:
        with ThreadPoolExecutor(max_workers=max(1, config.concurrency)) as pool:
            futures = [pool.submit(one, record) for record in per_file]
            futures += [pool.submit(package, url, items) for url, items in packages.items()]
            for future in futures:
                result = future.result()
                for status in result if isinstance(result, list) else [result]:
                    counts[status] += 1
    finally:
        manifest.close()
    return dict(counts)
