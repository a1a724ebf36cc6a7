"""gRPC status of every RPC: one decorator maps errors, one helper reads deadlines.

A ``ServingError`` becomes ``context.abort(grpc.StatusCode[err.code], message)``
(the code from ``serving.errors``' one table); anything else is a bug, answered
INTERNAL with a request id (``serving.errors.unexpected``), never with its text.
No servicer maps errors by itself.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import grpc

from serving.errors import ServingError, unexpected

log = logging.getLogger(__name__)


def rpc(method: Callable) -> Callable:
    """Run one RPC coroutine; map ServingError (and, as a logged bug, anything else) to a gRPC status."""
    return _answering(method, None)


def inference_rpc(method_label: str, model_of: Callable[[Any], str]) -> Callable[[Callable], Callable]:
    """:func:`rpc` for an inference RPC of a servicer with ``_service`` and ``protocol``:
    a refusal the service never saw (a missing model_spec, a bad TensorProto) is
    counted too, as ``method_label`` for the model ``model_of(request)`` names."""
    return lambda method: _answering(method, (method_label, model_of))


def _answering(method: Callable, counting: tuple[str, Callable[[Any], str]] | None) -> Callable:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        start = time.perf_counter()
        try:
            return await method(self, request, context)
        except ServingError as err:
            if counting is not None and not err.counted:
                label, model_of = counting
                self._service.observe_refusal(self.protocol, label, model_of(request), err,
                                              time.perf_counter() - start)
            await abort(context, err)
        except Exception as exc:  # a bug: answer INTERNAL rather than drop the call
            await abort(context, unexpected(exc, log, method.__qualname__))

    return wrapper


async def abort(context: grpc.aio.ServicerContext, err: ServingError) -> None:
    """End the call with the gRPC status of ``err`` (raises, as ``context.abort`` does)."""
    if err.retry_after is not None:
        context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(err.retry_after)))),))
    await context.abort(grpc.StatusCode[err.code], err.message)


# A deadline further away than this (a year) means "none".
NO_DEADLINE_S = 365 * 24 * 3600.0


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the ``time.monotonic()`` clock, or None when the client set none."""
    remaining = context.time_remaining()
    # Without a client deadline grpc reports the time left until a far-future
    # instant, too large for the waits that a deadline feeds.
    if remaining is None or remaining > NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining


