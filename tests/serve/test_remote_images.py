"""Remote image URLs: allowlisted hosts only, every redirect hop checked again, private addresses refused,
bodies capped. A real HTTP server on loopback serves the images."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from llavamed_fast.serve.images import ImagePolicy, ImageRequestError, decode_data_url, fetch_image


@pytest.fixture(scope="module")
def image_server(vqa_rad_images):
    scan = vqa_rad_images[3].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            port = self.server.server_address[1]
            routes = {
                "/scan.jpg": (200, scan, {}),
                "/to-scan": (302, b"", {"Location": "/scan.jpg"}),
                "/to-other-host": (302, b"", {"Location": f"http://localhost:{port}/scan.jpg"}),
                "/loop": (302, b"", {"Location": "/loop"}),
                "/big": (200, b"\0" * (3 * 2**20), {}),
                "/missing": (404, b"no", {}),
            }
            status, body, headers = routes.get(self.path, (404, b"", {}))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Image.open(io.BytesIO(scan)).convert("RGB")
    server.shutdown()


def test_no_allowlist_means_no_remote_images(image_server):
    base, _ = image_server
    with pytest.raises(ImageRequestError, match="remote image URLs are not accepted"):
        fetch_image(f"{base}/scan.jpg", "part 0", ImagePolicy())


def test_an_allowlisted_host_on_a_private_address_is_still_refused(image_server):
    base, _ = image_server
    with pytest.raises(ImageRequestError, match="private or local address"):
        fetch_image(f"{base}/scan.jpg", "part 0", ImagePolicy(allowed_hosts=("127.0.0.1",)))


def test_fetch_follows_checked_redirects_and_caps_bodies(image_server):
    base, expected = image_server
    inside = ImagePolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=True, max_bytes=2 * 2**20)
    got = fetch_image(f"{base}/to-scan", "part 0", inside)
    assert got.size == expected.size and got.tobytes() == expected.tobytes()
    with pytest.raises(ImageRequestError, match="'localhost' is not on this server's image allowlist"):
        fetch_image(f"{base}/to-other-host", "part 0", inside)
    with pytest.raises(ImageRequestError, match="more than 3 redirects"):
        fetch_image(f"{base}/loop", "part 0", inside)
    with pytest.raises(ImageRequestError, match="larger than"):
        fetch_image(f"{base}/big", "part 0", inside)
    with pytest.raises(ImageRequestError, match="HTTP 404"):
        fetch_image(f"{base}/missing", "part 0", inside)
    with pytest.raises(ImageRequestError, match="only http"):
        fetch_image("ftp://127.0.0.1/scan.jpg", "part 0", inside)


def test_a_host_is_checked_on_every_address_it_resolves_to():
    policy = ImagePolicy(allowed_hosts=("images.example",))
    for addresses in (
        ["93.184.216.34", "10.0.0.5"],
        ["169.254.169.254"],
        ["::1"],
        ["::ffff:127.0.0.1"],
        ["fe80::1"],
    ):
        with pytest.raises(ImageRequestError, match="private or local address"):
            fetch_image(
                "http://images.example/a.png", "part 0", policy, resolve=lambda _h, _p, a=addresses: a
            )


def test_data_urls():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buffer, format="PNG")
    import base64

    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert decode_data_url(url, "p", ImagePolicy()).size == (8, 6)
    with pytest.raises(ImageRequestError, match="only base64"):
        decode_data_url("data:image/png,abc", "p", ImagePolicy())
    with pytest.raises(ImageRequestError, match="larger than 10 bytes"):
        decode_data_url(url, "p", ImagePolicy(max_bytes=10))
    with pytest.raises(ImageRequestError, match="too many pixels"):
        decode_data_url(url, "p", ImagePolicy(max_pixels=20))
