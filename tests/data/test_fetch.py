"""Image fetching against a real HTTP server on loopback: 404s, slow and truncated bodies, non-images,
licence exclusion, article packages with hostile member names and links, and resuming."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from llavamed_fast.data.fetch import FetchConfig, fetch


def _jpeg(seed: int) -> bytes:
    image = Image.new("RGB", (24, 16), (seed * 40 % 256, 100, 200))
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def _package() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, data in [
            ("PMC1/fig1.jpg", _jpeg(1)),
            ("PMC1/fig2.jpg", _jpeg(2)),
            ("../../evil.jpg", _jpeg(3)),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("PMC1/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return out.getvalue()


class Server:
    """Routes: /img/<n>.jpg a JPEG; /slow/<n>.jpg the same after a delay on its first request; /cut/ a body
    shorter than its Content-Length; /text/ not an image; /pkg/1.tar.gz a package; anything else 404."""

    def __init__(self, delay: float) -> None:
        self.hits: Counter[str] = Counter()
        self.delay = delay
        package = _package()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits[self.path] += 1
                body, length = None, None
                if self.path.startswith("/img/"):
                    body = _jpeg(int(self.path[5:-4]))
                elif self.path.startswith("/slow/"):
                    if server.hits[self.path] == 1:
                        time.sleep(server.delay)
                    body = _jpeg(7)
                elif self.path.startswith("/cut/"):
                    body, length = _jpeg(8)[:100], len(_jpeg(8))
                elif self.path.startswith("/text/"):
                    body = b"<html>not an image</html>"
                elif self.path == "/pkg/1.tar.gz":
                    body = package
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(length or len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow reply
                    pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server():
    running = Server(delay=1.5)
    yield running
    running.close()


def _manifest(folder):
    entries = {}
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        entries[entry["pair_id"]] = entry
    return entries


def _config(server, folder, **overrides):
    settings = {
        "url_template": server.url + "/{kind}/{graphic}.jpg",
        "timeout": 0.5,
        "retries": 2,
        "backoff": 0.05,
    }
    return FetchConfig(out=folder, **{**settings, **overrides})


CC_BY = {"code": "CC BY", "commercial_use": True}
RECORDS = [
    {"pair_id": "1_F1", "kind": "img", "graphic": "1", "licence": CC_BY},
    {"pair_id": "1_F2", "kind": "missing", "graphic": "2", "licence": CC_BY},
    {"pair_id": "1_F3", "kind": "cut", "graphic": "3", "licence": CC_BY},
    {"pair_id": "1_F4", "kind": "text", "graphic": "4", "licence": CC_BY},
    {"pair_id": "1_F5", "kind": "slow", "graphic": "5", "licence": CC_BY},
    {
        "pair_id": "2_F1",
        "kind": "img",
        "graphic": "6",
        "licence": {"code": "CC BY-NC", "commercial_use": False},
    },
]


def test_per_file_statuses_checksums_and_resume(tmp_path, server):
    folder = tmp_path / "images"
    counts = fetch(RECORDS, _config(server, folder, licence="commercial"))
    assert counts == {"ok": 2, "not_found": 1, "corrupt": 2, "licence_excluded": 1}
    entries = _manifest(folder)
    statuses = {k: v["status"] for k, v in entries.items()}
    assert statuses == {
        "1_F1": "ok", "1_F2": "not_found", "1_F3": "corrupt", "1_F4": "corrupt", "1_F5": "ok",
        "2_F1": "licence_excluded",
    }  # fmt: skip
    assert (
        "truncated body" in entries["1_F3"]["detail"] and "not a readable image" in entries["1_F4"]["detail"]
    )
    assert server.hits["/img/6.jpg"] == 0  # excluded by licence: never downloaded
    assert server.hits["/missing/2.jpg"] == 1  # a 404 is not retried
    assert server.hits["/slow/5.jpg"] == 2  # timed out once, then fetched
    assert server.hits["/cut/3.jpg"] == 3  # a truncated body is retried, then called corrupt
    assert server.hits["/text/4.jpg"] == 1  # a complete body that is no image is not
    for pair in ("1_F1", "1_F5"):
        data = (folder / entries[pair]["file"]).read_bytes()
        assert (
            hashlib.sha256(data).hexdigest() == entries[pair]["sha256"]
            and entries[pair]["file"] == f"{pair}.jpg"
        )
    # Again: the two good files are skipped, the rest is tried again; a deleted file is fetched again.
    (folder / "1_F5.jpg").unlink()
    before = sum(server.hits.values())
    counts = fetch(RECORDS, _config(server, folder, licence="commercial"))
    assert counts == {"skipped": 1, "ok": 1, "not_found": 1, "corrupt": 2, "licence_excluded": 1}
    assert server.hits["/img/1.jpg"] == 1 and server.hits["/slow/5.jpg"] == 3
    assert sum(server.hits.values()) - before == 1 + 3 + 1 + 1  # F2, F3 (with retries), F4, F5


def test_packages_read_members_by_name_and_refuse_links(tmp_path, server):
    folder = tmp_path / "out" / "images"
    url = server.url + "/pkg/1.tar.gz"
    records = [
        {"pair_id": "9_F1", "pmc_tar_url": url, "image_file_path": "PMC1/fig1.jpg"},
        {
            "pair_id": "9_F2",
            "pmc_tar_url": url,
            "image_file_path": "fig2.jpg",
        },  # the package's top folder left out
        {"pair_id": "9_F3", "pmc_tar_url": url, "image_file_path": "../../evil.jpg"},
        {"pair_id": "9_F4", "pmc_tar_url": url, "image_file_path": "PMC1/link.jpg"},
        {"pair_id": "9_F5", "pmc_tar_url": url, "image_file_path": "PMC1/none.jpg"},
        {"pair_id": "9_F6", "pmc_tar_url": server.url + "/pkg/2.tar.gz", "image_file_path": "a.jpg"},
    ]
    counts = fetch(records, _config(server, folder))
    assert counts == {"ok": 3, "corrupt": 1, "not_found": 2}
    assert server.hits["/pkg/1.tar.gz"] == 1  # one download per package
    statuses = {k: v["status"] for k, v in _manifest(folder).items()}
    assert statuses == {
        "9_F1": "ok",
        "9_F2": "ok",
        "9_F3": "ok",
        "9_F4": "corrupt",
        "9_F5": "not_found",
        "9_F6": "not_found",
    }
    assert (folder / "9_F1.jpg").read_bytes() == _jpeg(1) and (folder / "9_F2.jpg").read_bytes() == _jpeg(2)
    # The member named "../../evil.jpg" was read, and written under its pair id inside the folder only.
    assert (folder / "9_F3.jpg").read_bytes() == _jpeg(3)
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {
        folder.relative_to(tmp_path) / n for n in ("9_F1.jpg", "9_F2.jpg", "9_F3.jpg", "manifest.jsonl")
    }
    assert "link" in _manifest(folder)["9_F4"]["detail"]


def test_cli_images(tmp_path, server):
    source = tmp_path / "figures.jsonl"
    bad_licence = {"pair_id": "7_F1", "kind": "img", "graphic": "7", "licence": "CC BY"}
    source.write_text("".join(json.dumps(r) + "\n" for r in [*RECORDS[:2], RECORDS[0], bad_licence]))

    def run():
        args = ["curate", "images", "--input", str(source), "--out", str(tmp_path / "img"), "--retries", "0",
                "--url-template", server.url + "/{kind}/{graphic}.jpg"]  # fmt: skip
        script = "import sys; from llavamed_fast.cli import main; code = main(sys.argv[1:]); "
        script += "assert 'torch' not in sys.modules; sys.exit(code)"
        return subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path
        )

    # A 404 and a record with a licence of the wrong type are failures: exit 1, the manifest kept. The
    # repeated line is left out with a warning (fetched and counted once).
    done = run()
    assert done.returncode == 1, done.stderr
    manifest = tmp_path / "img" / "manifest.jsonl"
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "manifest": str(manifest), "ok": 1, "not_found": 1, "invalid_record": 1,
    }  # fmt: skip
    assert done.stderr.splitlines() == [
        f"curate images: {source}: line 3: pair_id '1_F1' repeats line 1; left out",
        f"curate images: skipped {source}: line 4: field 'licence' must be an object (or null), got str 'CC BY'",
    ]
    assert server.hits["/img/1.jpg"] == 1 and len(manifest.read_text().splitlines()) == 2
    # Only what is done already: nothing failed, exit 0.
    source.write_text(json.dumps(RECORDS[0]) + "\n")
    done = run()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"manifest": str(manifest), "skipped": 1}


def test_every_download_failing_is_a_failed_run(tmp_path, server):
    source = tmp_path / "figures.jsonl"
    source.write_text("".join(json.dumps({**r, "kind": "missing"}) + "\n" for r in RECORDS[:3]))
    args = ["curate", "images", "--input", str(source), "--out", str(tmp_path / "img"), "--retries", "0",
            "--url-template", server.url + "/{kind}/{graphic}.jpg"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "llavamed_fast.cli", *args], capture_output=True, text=True)
    assert done.returncode == 1 and json.loads(done.stdout)["not_found"] == 3
    assert len((tmp_path / "img" / "manifest.jsonl").read_text().splitlines()) == 3


def test_a_repeated_pair_id_is_fetched_once(tmp_path, server):
    counts = fetch([RECORDS[0], RECORDS[0]], _config(server, tmp_path / "images"))
    assert counts == {"ok": 1, "duplicate": 1} and server.hits["/img/1.jpg"] == 1
    counts = fetch([{**RECORDS[0], "licence": "CC BY"}], _config(server, tmp_path / "other"))
    assert counts == {"error": 1}
    assert "licence must be an object" in _manifest(tmp_path / "other")["1_F1"]["detail"]


def test_unknown_licences_and_file_name_collisions(tmp_path, server):
    folder = tmp_path / "images"
    records = [
        {"pair_id": "3/F1", "kind": "img", "graphic": "1"},  # no licence: excluded under "commercial"
        {"pair_id": "4/F1", "kind": "img", "graphic": "2", "licence": CC_BY},
        {"pair_id": "4_F1", "kind": "img", "graphic": "3", "licence": CC_BY},  # same file name as 4/F1
        {"pair_id": "5_F1", "kind": "img", "graphic": "bad name", "licence": CC_BY},  # not a valid URL
    ]
    counts = fetch(records, _config(server, folder, licence="commercial"))
    assert counts == {"licence_excluded": 1, "ok": 1, "error": 2}
    entries = _manifest(folder)
    assert entries["4/F1"]["file"] == "4_F1.jpg" and "is 4/F1's" in entries["4_F1"]["detail"]
    assert "bad URL" in entries["5_F1"]["detail"]
    # The manifest survives a line cut by a crash: the cut line goes, later entries stay readable.
    with open(folder / "manifest.jsonl", "a") as handle:
        handle.write('{"pair_id": "6_F1", "sta')
    counts = fetch(records[1:2], _config(server, folder))
    assert counts == {"skipped": 1} and all(
        line.startswith("{") for line in (folder / "manifest.jsonl").read_text().splitlines()
    )
