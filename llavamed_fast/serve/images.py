"""Images in API requests: base64 ``data:`` URLs, and remote URLs only from allowed hosts.

A remote URL is refused unless its host is on the server's allowlist. An allowed one is fetched with
redirects followed by hand (at most :data:`MAX_REDIRECTS`), every hop checked again: http(s) only, the host
on the allowlist, and every address the host resolves to a public one (private, loopback, link-local,
multicast and reserved addresses are refused, so a URL cannot reach the server's own network), the body
read up to the byte limit and no further. The connection is pinned to the address that was checked, so a
second DNS answer cannot swap it for a private one.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from llavamed_fast.data.images import ImageError, load_image_bytes

MAX_REDIRECTS = 3


class ImageRequestError(ValueError):
    """An image in a request that cannot be used; the message says which and why (a 400 for the client)."""


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    allowed_hosts: tuple[str, ...] = ()  # remote URLs from these hosts only; empty: none
    allow_private_networks: bool = False  # for image servers inside the deployment's own network
    timeout: float = 10.0


def decode_data_url(url: str, where: str, policy: ImagePolicy) -> Image.Image:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:"):
        raise ImageRequestError(f"{where}: a data URL must look like data:image/png;base64,<data>")
    if not header.endswith(";base64"):
        raise ImageRequestError(f"{where}: only base64 data URLs are accepted")
    if len(payload) > (policy.max_bytes * 4) // 3 + 4:
        raise ImageRequestError(f"{where}: the image is larger than {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRequestError(f"{where}: the data URL is not valid base64") from None
    return _load(data, where, policy)


def _load(data: bytes, where: str, policy: ImagePolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise ImageRequestError(f"{where}: the image is larger than {policy.max_bytes} bytes")
    try:
        return load_image_bytes(data, source=where, max_pixels=policy.max_pixels)
    except ImageError as error:
        raise ImageRequestError(str(error)) from None


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback)


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def fetch_image(
    url: str,
    where: str,
    policy: ImagePolicy,
    *,
    resolve: Callable[[str, int], Sequence[str]] = _resolve,
) -> Image.Image:
    """Fetch a remote image under ``policy`` (see the module docstring)."""
    if not policy.allowed_hosts:
        raise ImageRequestError(
            f"{where}: remote image URLs are not accepted by this server; send the image as a base64 data: URL"
        )
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise ImageRequestError(f"{where}: only http(s) image URLs are accepted")
        if host not in policy.allowed_hosts:
            raise ImageRequestError(f"{where}: host {host!r} is not on this server's image allowlist")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = list(resolve(host, port))
        except OSError as error:
            raise ImageRequestError(f"{where}: cannot resolve {host!r} ({error})") from None
        if not addresses:
            raise ImageRequestError(f"{where}: {host!r} has no address")
        if not policy.allow_private_networks and not all(_public(a) for a in addresses):
            raise ImageRequestError(f"{where}: {host!r} resolves to a private or local address; refused")
        response = _get(url, addresses[0], policy, where)
        if isinstance(response, str):  # a redirect: the next hop is checked like the first
            url = response
            continue
        return _load(response, where, policy)
    raise ImageRequestError(f"{where}: more than {MAX_REDIRECTS} redirects")


def _get(url: str, address: str, policy: ImagePolicy, where: str) -> bytes | str:
    """The body of ``url`` fetched from ``address`` (the checked one), or the next URL of a redirect."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # Connect to the checked address; the Host header (and TLS SNI) keep the name.
    host = f"[{address}]" if ":" in address else address
    pinned = parts._replace(netloc=f"{host}:{port}")
    headers = {"Host": parts.netloc, "Accept": "image/*"}
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    try:
        with httpx.Client(timeout=policy.timeout, follow_redirects=False) as client:
            request = client.build_request("GET", pinned.geturl(), headers=headers, extensions=extensions)
            response = client.send(request, stream=True)
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise ImageRequestError(f"{where}: a redirect without a Location")
                    return urljoin(url, location)
                if response.status_code != 200:
                    raise ImageRequestError(f"{where}: the image URL answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise ImageRequestError(f"{where}: the image is larger than {policy.max_bytes} bytes")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > policy.max_bytes:
                        raise ImageRequestError(f"{where}: the image is larger than {policy.max_bytes} bytes")
                return bytes(body)
            finally:
                response.close()
    except httpx.HTTPError as error:
        raise ImageRequestError(f"{where}: fetching the image failed ({type(error).__name__})") from None


def load_request_image(url: str, where: str, policy: ImagePolicy) -> Image.Image:
    if url.startswith("data:"):
        return decode_data_url(url, where, policy)
    return fetch_image(url, where, policy)
