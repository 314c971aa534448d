"""Domain errors that export, the runtime and serving share. No HTTP here: serve_app.http.errors maps each
class to a status code and OpenAI's error type in one table."""
from __future__ import annotations


class ServeError(Exception):
    """A request (or the server's state) the caller should hear about; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message, self.param = message, param

    def __str__(self) -> str:
        return self.message


class InvalidRequest(ServeError):
    """The request is malformed or asks for something this model or server does not do."""


class InputTooLong(InvalidRequest):
    """A text or prompt is over the model's token limit."""


class ModelNotFound(ServeError):
    """No served model of the asked task has that id."""


class Unauthorized(ServeError):
    """Missing or wrong API key."""


class PayloadTooLarge(ServeError):
    """The request body is over the server's limit."""


class Overloaded(ServeError):
    """A queue is full: retry shortly."""


class RequestTimeout(ServeError):
    """The request took longer than the server's limit."""


class NotReady(ServeError):
    """A model is not loaded (yet)."""
