"""The one error hierarchy of the serving core.

Every failure the service reports to a client is a ``ServingError``. Each class
carries the gRPC status code *name* and the HTTP status from a single table, so the
REST and gRPC adapters map errors in exactly one place each and never disagree.
Anything else that escapes to an adapter is a bug: :func:`unexpected` turns it
into an ``Internal`` error whose message names only a request id, and logs the
traceback under the same id, so no exception text ever reaches a client.
This module imports neither Starlette nor grpc on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator

# gRPC code name -> HTTP status, as TF Serving's REST layer maps them.
HTTP_STATUS_BY_CODE: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}

# TF Serving truncates long messages; so do we, so a huge bad input cannot echo back.
MAX_MESSAGE_CHARS = 1024


class ServingError(Exception):
    """Base of every error the service returns to a client.

    ``code`` is the gRPC status code name; ``http_status`` the REST status.
    ``retry_after`` (seconds), when set, becomes HTTP ``Retry-After``.
    ``counted`` is set once the request it answers is in the request metrics, so
    that an adapter counts only the refusals the service never saw.
    """

    code = "UNKNOWN"
    http_status: int | None = None
    counted = False

    def __init__(self, message: str, *, retry_after: float | None = None):
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        """The HTTP status for this error (the class override, else the code's)."""
        return self.http_status or HTTP_STATUS_BY_CODE.get(self.code, 500)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ServingError):
    """The request is malformed or does not match the signature."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(ServingError):
    """The request is well formed but the servable cannot answer it (e.g. wrong method)."""

    code = "FAILED_PRECONDITION"


class NotFound(ServingError):
    """Unknown model, version, or signature."""

    code = "NOT_FOUND"


class Unavailable(ServingError):
    """The server cannot take the request now: queue full, draining, or not loaded yet."""

    code = "UNAVAILABLE"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it could run."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(ServingError):
    """A limit was exceeded (message size, tensor size)."""

    code = "RESOURCE_EXHAUSTED"


class PayloadTooLarge(ResourceExhausted):
    """A request body over ``--max_request_bytes``: HTTP 413, gRPC RESOURCE_EXHAUSTED."""

    http_status = 413


class Unauthenticated(ServingError):
    """Missing or wrong credentials."""

    code = "UNAUTHENTICATED"


class PermissionDenied(ServingError):
    """The caller is known but this server does not let it do that."""

    code = "PERMISSION_DENIED"


class Unimplemented(ServingError):
    """The method exists in the protocol but this server does not offer it."""

    code = "UNIMPLEMENTED"


class Cancelled(ServingError):
    """The client went away or the server is shutting down mid-request."""

    code = "CANCELLED"


class Internal(ServingError):
    """A genuine bug or a model that failed at run time; the only source of 5xx besides overload."""

    code = "INTERNAL"


class WarmupFailed(ServingError):
    """A warmup record could not be replayed: the version's load fails with the record's own code."""

    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def located(where: str) -> Iterator[None]:
    """Re-raise an ``InvalidArgument`` from inside with ``where`` in front ("input 'x' item 2: ...")."""
    try:
        yield
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None


def unexpected(exc: BaseException, log: logging.Logger, where: str) -> Internal:
    """The client's answer to a bug: a generic ``Internal`` error carrying a fresh request id.

    The traceback of ``exc`` goes to ``log`` with the same id and ``where`` (the
    RPC or the HTTP method and path), so an operator can find it from the id a
    client reports.
    """
    request_id = uuid.uuid4().hex[:16]
    log.error("unexpected error in %s (request id %s)", where, request_id, exc_info=exc)
    return Internal(f"Internal error (request id {request_id}); the server log has the details")


def metric_code(exc: BaseException) -> str:
    """The status code name a failed request is counted under: the error's own, else INTERNAL."""
    return exc.code if isinstance(exc, ServingError) else Internal.code
