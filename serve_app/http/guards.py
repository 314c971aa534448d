"""ASGI guards in front of the routes: request body size cap and optional bearer-token auth."""
from __future__ import annotations

import hashlib
import hmac
import json

from contract.errors import PayloadTooLarge, ServeError, Unauthorized

from .errors import body_of, status_of


async def _reply(send, exc: ServeError) -> None:
    status = status_of(exc)
    body = json.dumps(body_of(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in status.headers.items()]
    await send({"type": "http.response.start", "status": status.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


GUARDED = ("/v1/", "/tokenize", "/detokenize")  # with api_keys set; /health, /ready stay open


class GuardMiddleware:
    """Refuses oversized bodies (413) before they are parsed and unauthenticated API calls (401)."""

    def __init__(self, app, max_body_bytes: int, api_keys: tuple[str, ...] = ()):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.key_digests = tuple(_digest(key.encode()) for key in api_keys)

    def _authorized(self, scope) -> bool:
        if not self.key_digests or not scope["path"].startswith(GUARDED):
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        token = _digest(auth[7:] if auth[:7].lower() == b"bearer " else b"")
        # Every key is compared, in constant time over equal-length digests: the reply time tells neither
        # which key came close nor how long the keys are.
        matched = False
        for key in self.key_digests:
            matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await _reply(send, Unauthorized("missing or invalid API key (Authorization: Bearer ...)"))
        headers = dict(scope.get("headers") or [])
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _reply(send, PayloadTooLarge(f"request body over {limit} bytes"))
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _BodyTooLarge:
            await _reply(send, PayloadTooLarge(f"request body over {limit} bytes"))


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class _BodyTooLarge(Exception):
    pass
