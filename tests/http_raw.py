"""HTTP a client library will not send: a chunked upload that stops once answered."""

from __future__ import annotations

import select
import socket


def post_chunked(url: str, path: str, total: int, headers: dict[str, str]) -> tuple[int, str, int]:
    """POST ``total`` bytes with ``Transfer-Encoding: chunked`` (no Content-Length) over a raw
    socket, stopping as soon as the server answers. Returns (status, body, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"A" * 65536
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode())
        try:
            while sent < total and not select.select([s], [], [], 0)[0]:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
            if sent >= total:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: read its answer
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            part = s.recv(65536)
            if not part:
                break
            data += part
    status = int(data.split(b" ", 2)[1]) if data else -1
    return status, data.partition(b"\r\n\r\n")[2].decode(errors="replace"), sent


def _length(response: bytes) -> int:
    for line in response.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30
