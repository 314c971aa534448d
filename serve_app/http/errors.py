"""One error taxonomy, mapped to HTTP status in one place (serve_app.http.routes installs these handlers).

Bodies follow OpenAI's error shape: {"error": {"message", "type", "param", "code"}}. Unknown errors are
a logged 500 whose body leaks no internals.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.errors import (
    InputTooLong,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServeError,
    Unauthorized,
)

logger = logging.getLogger("serve_app")


@dataclass(frozen=True)
class Status:
    """How one domain error goes over HTTP."""

    status: int
    type: str
    code: str | None
    headers: dict[str, str] = field(default_factory=dict)


# The one error -> status table. Looked up along the class's MRO: the most specific entry wins.
STATUS: dict[type[ServeError], Status] = {
    ServeError: Status(500, "server_error", None),
    InvalidRequest: Status(400, "invalid_request_error", "invalid_request"),
    InputTooLong: Status(400, "invalid_request_error", "context_length_exceeded"),
    ModelNotFound: Status(404, "invalid_request_error", "model_not_found"),
    Unauthorized: Status(401, "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"}),
    PayloadTooLarge: Status(413, "invalid_request_error", "payload_too_large"),
    Overloaded: Status(503, "overloaded_error", "overloaded", {"Retry-After": "1"}),
    RequestTimeout: Status(504, "timeout_error", "timeout"),
    NotReady: Status(503, "overloaded_error", "not_ready", {"Retry-After": "5"}),
}


def status_of(exc: ServeError) -> Status:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return STATUS[ServeError]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def body_of(exc: ServeError) -> dict:
    st = status_of(exc)
    return error_body(exc.message, st.type, exc.param, st.code)


def to_response(exc: ServeError) -> JSONResponse:
    st = status_of(exc)
    return JSONResponse(body_of(exc), st.status, headers=st.headers)


def unwrap(exc: BaseException) -> BaseException:
    """An error that carries its cause (Ray's RayTaskError(cause), for one) is served as that cause."""
    return getattr(exc, "cause", None) if isinstance(getattr(exc, "cause", None), BaseException) else exc


def translate(exc: BaseException) -> ServeError | None:
    """The domain error for ``exc``; None for unknown ones (a logged 500). Backends translate the errors of
    their own transport (serve_app.backends.remote)."""
    exc = unwrap(exc)
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return RequestTimeout("the request took longer than the server's limit")
    return None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def install(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        cause = unwrap(exc)
        return to_response(cause if isinstance(cause, ServeError) else exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, None), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unknown(request: Request, exc: Exception) -> JSONResponse:
        mapped = translate(exc)
        if mapped is not None:
            return to_response(mapped)
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error", None, None), 500)
