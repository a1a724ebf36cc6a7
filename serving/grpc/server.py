"""The gRPC server: grpc.aio on an event loop thread of its own, composing every servicer.

TF Serving's PredictionService and ModelService (``serving.grpc.tfs``), the V2
GRPCInferenceService (``serving.grpc.v2``), grpc.health.v1 and reflection, all
behind one :class:`GuardedRegistry`: a request message that does not parse is
answered INVALID_ARGUMENT by the method's own error path, not dropped by grpc.
Reflection lists every one of them (:data:`SERVED_SERVICES`), the V2 service
included, whose descriptors live in a pool of their own (:class:`PoolChain`).

Predict, the hot path, decodes and queues its rows on the loop and awaits the
batch (``InferenceService.predict_async``): no thread hand-off per request. Every
other RPC, and Predict with batching off, runs the blocking service call in a
worker thread (``--grpc_max_threads`` of them).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from concurrent import futures
from typing import TYPE_CHECKING, Any, Coroutine, Sequence

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving.errors import InvalidArgument
from serving.grpc.status import abort
from serving.grpc.tfs import (
    MODEL_SERVICE,
    PREDICTION_SERVICE,
    ModelServicer,
    PredictionServicer,
)
from serving.grpc.v2 import DESCRIPTOR_POOL as V2_DESCRIPTOR_POOL
from serving.grpc.v2 import SERVICE_NAME as V2_SERVICE
from serving.grpc.v2 import add_inference_servicer
from serving.limits import DEFAULT_MAX_REQUEST_BYTES
from serving.runtime.loop import loop_kind, new_event_loop

if TYPE_CHECKING:
    from serving.service import InferenceService

log = logging.getLogger(__name__)

# Every service the server answers, as reflection lists them.
SERVED_SERVICES = (PREDICTION_SERVICE, MODEL_SERVICE, V2_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)


class PoolChain:
    """Descriptor pools searched in order, with the lookups the reflection servicer makes.

    Reflection takes one pool; V2's descriptors live in a private one (so that
    tritonclient's copies can share the process) and everything else in protobuf's
    default pool. Each lookup answers from the first pool that knows the name.
    """

    def __init__(self, *pools: descriptor_pool.DescriptorPool) -> None:
        self._pools = pools

    def _first(self, lookup: str, *args):
        for pool in self._pools:
            try:
                return getattr(pool, lookup)(*args)
            except KeyError:
                continue
        raise KeyError(args[0] if args else lookup)

    def FindFileByName(self, name: str):
        """The file descriptor called ``name``."""
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str):
        """The file descriptor that defines ``symbol`` (a message, service, enum ...)."""
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name: str):
        """The message descriptor of ``name``."""
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message, number: int):
        """The extension ``number`` of ``message``, from the pool that defines ``message``."""
        return message.file.pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message):
        """Every extension of ``message`` known to the pool that defines it."""
        return message.file.pool.FindAllExtensions(message)


class _Undecodable:
    """What a guarded deserializer returns for bytes that are not the method's request message."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument):
        self.error = error


class DecodeGuard(grpc.GenericRpcHandler):
    """Another generic handler's methods, answering request bytes that do not parse
    with INVALID_ARGUMENT naming the message type.

    grpc.aio would otherwise report the parse error as UNKNOWN and log a traceback
    per bad call. Applies to unary-request methods, i.e. everything but reflection.
    The handlers are wrapped once, where they are registered
    (:class:`GuardedRegistry`), not by an interceptor: grpc.aio runs every
    interceptor as one more coroutine on every call (2.5% of the event loop's
    CPU on the benchmark, docs/benchmarks.md).
    """

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        # method -> (its handler, the guarded handler): wrapped once, not on every call.
        self._guarded: dict[str, tuple[object, object]] = {}

    def service(self, handler_call_details):
        """The inner handler for the call's method, guarded; None for a method it does not serve."""
        handler = self._inner.service(handler_call_details)
        if handler is None:  # an unknown method (not cached: clients choose those names)
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = guard_handler(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded


class GuardedRegistry:
    """Stands in for a server while generated ``add_*Servicer_to_server`` functions
    register on it: every handler they add reaches the server guarded (:class:`DecodeGuard`)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register each generic handler behind a :class:`DecodeGuard`."""
        self._server.add_generic_rpc_handlers(tuple(DecodeGuard(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        """Register a service's method handlers, each guarded."""
        self._server.add_registered_method_handlers(
            service_name, {name: guard_handler(h, f"/{service_name}/{name}") for name, h in handlers.items()})


def guard_handler(handler, method: str):
    """``handler`` with a deserializer that turns a parse failure into INVALID_ARGUMENT
    (itself where none applies: streaming requests, raw bytes, async generators)."""
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    parse = handler.request_deserializer

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a parser raises
            return _Undecodable(InvalidArgument(
                f"request bytes are not a valid request message for {method}: {exc}"))

    kind = "unary_stream" if handler.response_streaming else "unary_unary"
    behaviour = getattr(handler, kind)
    if inspect.isasyncgenfunction(behaviour):  # would need an async generator wrapper; none here
        return handler

    async def guarded(request, context):
        if isinstance(request, _Undecodable):
            await abort(context, request.error)
        return await behaviour(request, context)

    return handler._replace(request_deserializer=deserialize, **{kind: guarded})


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose answers follow the service: SERVING once ready, NOT_SERVING while draining.

    The status is refreshed from the service on every Check and Watch, so it can
    never lag behind /readyz.
    """

    SERVICES = (health.OVERALL_HEALTH, PREDICTION_SERVICE, MODEL_SERVICE, V2_SERVICE)

    def __init__(self, service: InferenceService):
        super().__init__()
        self._service = service
        self._status = None

    async def refresh(self) -> None:
        """Set every served name's status from the service's readiness (watchers hear changes only)."""
        status = (health_pb2.HealthCheckResponse.SERVING if self._service.ready()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status == self._status:
            return
        self._status = status
        for name in self.SERVICES:
            await self.set(name, status)

    async def Check(self, request, context):
        """Answer from the service's current readiness."""
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request, context):
        """Stream status changes, starting from the current readiness."""
        await self.refresh()
        return await super().Watch(request, context)


class GrpcServer:
    """The gRPC server: ``grpc.aio`` on an event loop thread of its own, driven from plain threads.

    Built bound (so a port conflict fails before anything starts), then
    :meth:`start` and :meth:`stop`. ``port`` is the port actually bound;
    ``event_loop`` the kind of loop it runs on ("uvloop" or "asyncio").
    """

    def __init__(self, service: InferenceService, host: str, port: int, max_threads: int,
                 max_message_bytes: int, interceptors: Sequence[grpc.aio.ServerInterceptor],
                 credentials: grpc.ServerCredentials | None, event_loop: str = "auto",
                 channel_arguments: Sequence[tuple[str, int | str]] = ()):
        self._loop = new_event_loop(event_loop)
        self.event_loop = loop_kind(self._loop)
        # Blocking RPCs (everything but batched Predict) run here, as the sync server's pool did.
        self._workers = futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc")
        self._loop.set_default_executor(self._workers)
        self._thread = threading.Thread(target=self._loop.run_forever, name="graft-grpc", daemon=True)
        self._thread.start()
        try:
            self._server, self.port = self._call(_bind(service, host, port, max_message_bytes,
                                                       interceptors, credentials, channel_arguments))
        except BaseException:
            self._close_loop()
            raise

    def _call(self, coroutine: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> None:
        """Start serving."""
        self._call(self._server.start())

    def stop(self, grace: float | None = None) -> None:
        """Stop: refuse new RPCs, give running ones ``grace`` seconds, then cancel them."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._server.stop(grace))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._workers.shutdown(wait=False, cancel_futures=True)


async def _bind(service: InferenceService, host: str, port: int, max_message_bytes: int,
                interceptors: Sequence[grpc.aio.ServerInterceptor],
                credentials: grpc.ServerCredentials | None,
                channel_arguments: Sequence[tuple[str, int | str]]) -> tuple[grpc.aio.Server, int]:
    options = {
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.max_send_message_length": max_message_bytes,
        # One process per pod: refuse a second server on the same port, not share it.
        "grpc.so_reuseport": 0,
    }
    options.update(channel_arguments)
    # No interceptor unless one is asked for (auth): each costs a coroutine per call.
    server = grpc.aio.server(interceptors=list(interceptors) or None, options=list(options.items()))
    registry = GuardedRegistry(server)
    # A tensor needs at least one byte per element on the wire except when a single
    # value is broadcast; capping elements at the message size stops that abuse.
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(service, max_elements=max_message_bytes), registry)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(service), registry)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(service), registry)
    add_inference_servicer(service, registry)
    # Reflection streams its requests (nothing to guard), and picks its asyncio
    # servicer by checking for a grpc.aio.Server: it registers on the server itself.
    reflection.enable_server_reflection(
        SERVED_SERVICES, server, pool=PoolChain(V2_DESCRIPTOR_POOL, descriptor_pool.Default()))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    except RuntimeError:
        bound = 0  # grpc raises, with its reason only in its own log
    if bound == 0:
        hint = (" (the port is taken, or gRPC refused the SSL config: does server_key belong to "
                "server_cert?)" if credentials is not None else "")
        raise RuntimeError(f"cannot bind gRPC to {address}{hint}")
    return server, bound


def build_server(service: InferenceService, host: str = "0.0.0.0", port: int = 8500,
                 max_threads: int = 16, max_message_bytes: int = DEFAULT_MAX_REQUEST_BYTES, *,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None,
                 event_loop: str = "auto",
                 channel_arguments: Sequence[tuple[str, int | str]] = ()) -> GrpcServer:
    """A gRPC server (not started) with every servicer, health and reflection, bound to host:port.

    ``interceptors`` run before every handler (``serving.runtime.auth.AuthInterceptor``);
    ``credentials`` (``serving.runtime.tls.grpc_server_credentials``) make the port TLS.
    ``max_threads`` threads run the blocking RPCs; ``event_loop`` is a kind of
    :func:`serving.runtime.loop.new_event_loop`. ``channel_arguments`` (``--grpc_channel_arguments``)
    are gRPC core's server arguments; one that names an argument the server sets itself
    (the message size limits, ``grpc.so_reuseport``) replaces it. Raises ``RuntimeError``
    when the address cannot be bound, ``ValueError`` for an event loop that cannot be made.
    """
    return GrpcServer(service, host, port, max_threads, max_message_bytes, interceptors, credentials,
                      event_loop, channel_arguments)
