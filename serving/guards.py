"""ASGI middleware in front of the API: ``Guard`` checks the API key (401) and the body size
(413) before any parsing; ``JsonErrors`` turns any unhandled exception into a JSON 500, so no
answer is ever Starlette's plain-text "Internal Server Error".

API keys (``read_api_keys``) come from the environment of the ingress replica, not from the
Serve config (which the dashboard shows): ``UNCLIP_API_KEY`` (one key, or several separated
by commas, for rotation) and the file named by ``UNCLIP_API_KEY_FILE`` (one key per line, e.g.
a mounted Kubernetes Secret). Keys are stripped, so a key file's trailing newline is no part
of the key.

The body is counted on the bytes actually received, not on ``Content-Length`` (a chunked
upload has none): the request is answered 413 as soon as the limit is passed and the rest of
the body is never read, so one client cannot make the ingress hold more than
``max_body_bytes``. The body read so far is then handed to the app in one message.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers

from unclip.config import ConfigError

logger = logging.getLogger("ray.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# routes that need no API key: the page, liveness and readiness for probes, the API docs
OPEN_PATHS = frozenset(
    {"/", "/v1/health", "/v1/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)

API_KEY_ENV = "UNCLIP_API_KEY"
API_KEY_FILE_ENV = "UNCLIP_API_KEY_FILE"
# set by `unclip serve` when it was given a key: the ingress then refuses to start without one
API_KEY_REQUIRED_ENV = "UNCLIP_API_KEY_REQUIRED"


def read_api_keys(
    configured: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The accepted API keys: ``configured`` (the application's ``args.api_key``), then
    ``$UNCLIP_API_KEY`` (comma-separated), then the lines of ``$UNCLIP_API_KEY_FILE``; each
    stripped of surrounding whitespace, empty ones dropped. Raises ``ConfigError`` if the key
    file cannot be read, or if ``$UNCLIP_API_KEY_REQUIRED`` is set and no key was found."""
    env = os.environ if env is None else env
    texts = [configured or "", env.get(API_KEY_ENV, "")]
    path = env.get(API_KEY_FILE_ENV, "").strip()
    if path:
        try:
            texts.append(Path(path).read_text())
        except OSError as e:
            raise ConfigError(
                f"{API_KEY_FILE_ENV}={path!r}: cannot read the API key file ({e.strerror})"
            ) from None
    keys = [k for text in texts for k in (p.strip() for p in re.split(r"[,\n]", text)) if k]
    if not keys and env.get(API_KEY_REQUIRED_ENV):
        raise ConfigError(
            f"an API key is required here but none was found: set {API_KEY_ENV} or "
            f"{API_KEY_FILE_ENV} in the environment of the Ray cluster"
        )
    return tuple(dict.fromkeys(keys))


class Guard:
    """ASGI middleware: ``app`` sees only authorised requests with a body within the limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_keys: Sequence[str] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_keys = tuple(k.encode() for k in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_keys and not _open(_path(scope)) and not self._authorized(headers):
            detail = (
                "authorization: missing or wrong API key; send the header "
                "'Authorization: Bearer <key>'"
            )
            await send_json(send, 401, {"detail": detail}, {"WWW-Authenticate": "Bearer"})
            return
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await send_json(send, 400, {"detail": f"content-length: not a number: {length!r}"})
            return
        if length is not None and int(length) > self.max_body_bytes:
            await self._too_large(send, f"{length} bytes")
            return
        body = await self._read_body(receive)
        if body is None:
            await self._too_large(send, "more than that")
            return
        if isinstance(body, dict):  # the client went away before sending its body
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | Message | None:
        """The whole body; None as soon as it passes the limit; the disconnect message if
        the client left."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send, what: str) -> None:
        detail = f"body: {what}, over the limit of {self.max_body_bytes} bytes"
        await send_json(send, 413, {"detail": detail}, {"Connection": "close"})

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare with every key (no early exit), so timing does not tell which one matched
        matches = [hmac.compare_digest(given, key) for key in self.api_keys]
        return scheme.lower() == "bearer" and any(matches)


class JsonErrors:
    """ASGI middleware: an exception no handler took becomes a logged JSON 500 (if no answer
    was started yet; else the connection is closed, as a server would)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:  # noqa: BLE001 - the last line of defence: answer, then log
            logger.exception("unhandled error in %s %s", scope.get("method"), scope["path"])
            if started:
                raise
            detail = f"internal error ({type(e).__name__}); the request may be retried"
            await send_json(send, 500, {"detail": detail})


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/docs/static/")


def _path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body read so far, then defers to the server's."""
    done = False

    async def replay() -> Message:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    """Send a whole JSON response from ASGI middleware."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
