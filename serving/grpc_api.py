"""The gRPC adapter: TF Serving's PredictionService and ModelService, health, reflection.

The servicers only translate protos to service calls and back; every
``ServingError`` becomes ``context.abort(grpc.StatusCode[err.code], message)`` in
one decorator (``_rpc``; ``_inference_rpc`` for the inference RPCs, which also
counts the refusals the service never saw), so no method maps errors by itself.

The server is ``grpc.aio`` on an event loop thread of its own (:class:`GrpcServer`),
uvloop's loop where it is installed (``--grpc_event_loop``). Predict, the hot
path, decodes and queues its rows on the loop and awaits the batch
(``InferenceService.predict_async``): no thread hand-off per request. Every
other RPC, and Predict with batching off, runs the blocking service call in a
worker thread (``--grpc_max_threads`` of them).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Sequence

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
    status_pb2,
)

from serving import codec
from serving.config import model_configs_from_proto
from serving.errors import InvalidArgument, ServingError, located
from serving.loop import loop_kind, new_event_loop, run_blocking
from serving.service import (
    CLASSIFY_METHOD,
    REGRESS_METHOD,
    ClassifyResult,
    ExamplesCall,
    InferenceTask,
    MultiInferenceCall,
    PredictCall,
)

if TYPE_CHECKING:
    from serving.service import InferenceService

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
SIGNATURE_DEF_FIELD = "signature_def"
LINEAGE_FIELD = "graft"

_STATE = get_model_status_pb2.ModelVersionStatus.State
_ERROR_CODE = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type


def _rpc(method: Callable) -> Callable:
    """Run one RPC coroutine; map ServingError (and, as a logged bug, anything else) to a gRPC status."""
    return _answering(method, None)


def _inference_rpc(method_label: str, model_of: Callable[[Any], str]) -> Callable[[Callable], Callable]:
    """:func:`_rpc` for an inference RPC of a servicer with ``_service`` and ``protocol``:
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
            await _abort(context, err)
        except Exception as err:  # a bug: answer INTERNAL rather than drop the call
            log.exception("unhandled error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"Internal error: {type(err).__name__}: {err}")

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, err: ServingError) -> None:
    """End the call with the gRPC status of ``err`` (raises, as ``context.abort`` does)."""
    if err.retry_after is not None:
        context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(err.retry_after)))),))
    await context.abort(grpc.StatusCode[err.code], err.message)


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
            await _abort(context, request.error)
        return await behaviour(request, context)

    return handler._replace(request_deserializer=deserialize, **{kind: guarded})


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


def _version_and_label(spec) -> tuple[int | None, str | None]:
    if not spec.name:
        # TF Serving's wording for an absent model_spec; one without a name is as unusable.
        raise InvalidArgument("Missing ModelSpec: the request must name a model (model_spec.name)")
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def _model_spec(target, name: str, version: int, signature_name: str | None = None) -> None:
    target.name = name
    target.version.value = version
    if signature_name is not None:
        target.signature_name = signature_name


def _examples(input_proto) -> tuple[list[bytes], bytes | None]:
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in input_proto.example_list.examples], None
    if kind == "example_list_with_context":
        listed = input_proto.example_list_with_context
        return [e.SerializeToString() for e in listed.examples], listed.context.SerializeToString()
    raise InvalidArgument("Input is empty")


def _fill_classification(result_proto, result: ClassifyResult) -> None:
    for row in result.classifications:
        classifications = result_proto.classifications.add()
        for label, score in row:
            classifications.classes.add(label=label, score=score)


def _spec_model(request) -> str:
    return request.model_spec.name


def _first_task_model(request) -> str:
    return request.tasks[0].model_spec.name if request.tasks else ""


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService over an InferenceService."""

    protocol = "grpc"

    def __init__(self, service: InferenceService, max_elements: int):
        self._service = service
        self._max_elements = max_elements

    def _decode(self, inputs) -> dict:
        arrays = {}
        for name, tensor in inputs.items():
            with located(f"input '{name}'"):
                arrays[name] = codec.tensor_proto_to_numpy(tensor, max_elements=self._max_elements)
        return arrays

    @_inference_rpc("predict", _spec_model)
    async def Predict(self, request, context):
        """Run a signature; the response's model_spec names the version that served."""
        version, label = _version_and_label(request.model_spec)
        result = await self._service.predict_async(PredictCall(
            model=request.model_spec.name, version=version, label=label,
            signature_name=request.model_spec.signature_name, inputs=self._decode(request.inputs),
            output_filter=list(request.output_filter), deadline=deadline_of(context), protocol="grpc"))
        response = predict_pb2.PredictResponse()
        _model_spec(response.model_spec, result.model, result.version, result.signature_name)
        for name, value in result.outputs.items():
            response.outputs[name].CopyFrom(codec.numpy_to_tensor_proto(value))
        return response

    def _examples_call(self, request, context) -> ExamplesCall:
        version, label = _version_and_label(request.model_spec)
        examples, example_context = _examples(request.input)
        return ExamplesCall(model=request.model_spec.name, version=version, label=label,
                            signature_name=request.model_spec.signature_name, examples=examples,
                            context=example_context, deadline=deadline_of(context), protocol="grpc")

    @_inference_rpc("classify", _spec_model)
    async def Classify(self, request, context):
        """Run a classify signature over the request's tf.Examples."""
        result = await run_blocking(self._service.classify, self._examples_call(request, context))
        response = classification_pb2.ClassificationResponse()
        _model_spec(response.model_spec, result.model, result.version, result.signature_name)
        _fill_classification(response.result, result)
        return response

    @_inference_rpc("regress", _spec_model)
    async def Regress(self, request, context):
        """Run a regress signature over the request's tf.Examples."""
        result = await run_blocking(self._service.regress, self._examples_call(request, context))
        response = regression_pb2.RegressionResponse()
        _model_spec(response.model_spec, result.model, result.version, result.signature_name)
        for value in result.values:
            response.result.regressions.add(value=value)
        return response

    @_inference_rpc("multi_inference", _first_task_model)
    async def MultiInference(self, request, context):
        """Several classify/regress signatures of one model version over the same examples."""
        if not request.tasks:
            raise InvalidArgument("MultiInferenceRequest has no tasks")
        first = request.tasks[0].model_spec
        for task in request.tasks[1:]:
            if task.model_spec.name != first.name:
                raise InvalidArgument("All ModelSpecs in a MultiInferenceRequest must access the same model name")
            if _version_and_label(task.model_spec) != _version_and_label(first):
                raise InvalidArgument("All ModelSpecs in a MultiInferenceRequest must access the same version")
        version, label = _version_and_label(first)
        examples, example_context = _examples(request.input)
        results = await run_blocking(self._service.multi_inference, MultiInferenceCall(
            model=first.name, version=version, label=label,
            tasks=[InferenceTask(t.model_spec.signature_name, t.method_name) for t in request.tasks],
            examples=examples, context=example_context, deadline=deadline_of(context), protocol="grpc"))
        response = inference_pb2.MultiInferenceResponse()
        for task, result in zip(request.tasks, results):
            out = response.results.add()
            _model_spec(out.model_spec, result.model, result.version, result.signature_name)
            if task.method_name == CLASSIFY_METHOD:
                _fill_classification(out.classification_result, result)
            elif task.method_name == REGRESS_METHOD:
                for value in result.values:
                    out.regression_result.regressions.add(value=value)
        return response

    @_rpc
    async def GetModelMetadata(self, request, context):
        """The version's SignatureDefMap under "signature_def"; its lineage (a Struct) under "graft"."""
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field not in (SIGNATURE_DEF_FIELD, LINEAGE_FIELD):
                raise InvalidArgument(f"Metadata field {field} is not supported")
        version, label = _version_and_label(request.model_spec)
        result = await run_blocking(self._service.model_metadata, request.model_spec.name, version, label)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _model_spec(response.model_spec, result.model, result.version)
        if SIGNATURE_DEF_FIELD in fields:
            response.metadata[SIGNATURE_DEF_FIELD].Pack(result.signature_def_map)
        if LINEAGE_FIELD in fields and result.lineage is not None:
            # Lineage is JSON (assets.extra/graft.json); Struct is its protobuf form.
            response.metadata[LINEAGE_FIELD].Pack(json_format.ParseDict(result.lineage, struct_pb2.Struct()))
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: version status and whole-list config reload."""

    def __init__(self, service: InferenceService):
        self._service = service

    @_rpc
    async def GetModelStatus(self, request, context):
        """The versions of a model and their states, as TF Serving reports them."""
        version, label = _version_and_label(request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in await run_blocking(self._service.model_status, request.model_spec.name, version, label):
            item = response.model_version_status.add(version=status.version)
            item.state = _STATE.Value(status.state) if status.state in _STATE.keys() else _STATE.Value("UNKNOWN")
            code = _ERROR_CODE.values_by_name.get(status.error_code)
            item.status.error_code = code.number if code is not None else _ERROR_CODE.values_by_name["UNKNOWN"].number
            item.status.error_message = status.error_message
        return response

    @_rpc
    async def HandleReloadConfigRequest(self, request, context):
        """Replace the served model list with ``request.config`` (missing models unload)."""
        try:
            configs = model_configs_from_proto(request.config)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        await run_blocking(self._service.reload_config_request, configs)
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose answers follow the service: SERVING once ready, NOT_SERVING while draining.

    The status is refreshed from the service on every Check and Watch, so it can
    never lag behind /readyz.
    """

    SERVICES = (health.OVERALL_HEALTH, PREDICTION_SERVICE, MODEL_SERVICE)

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
    from serving.grpc_v2 import add_inference_servicer  # imports this module: not at the top

    add_inference_servicer(service, registry)
    # Reflection streams its requests (nothing to guard), and picks its asyncio
    # servicer by checking for a grpc.aio.Server: it registers on the server itself.
    reflection.enable_server_reflection(
        (PREDICTION_SERVICE, MODEL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
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
                 max_threads: int = 16, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None,
                 event_loop: str = "auto",
                 channel_arguments: Sequence[tuple[str, int | str]] = ()) -> GrpcServer:
    """A gRPC server (not started) with every servicer, health and reflection, bound to host:port.

    ``interceptors`` run before every handler (``serving.auth.AuthInterceptor``);
    ``credentials`` (``serving.tls.grpc_server_credentials``) make the port TLS.
    ``max_threads`` threads run the blocking RPCs; ``event_loop`` is a kind of
    :func:`serving.loop.new_event_loop`. ``channel_arguments`` (``--grpc_channel_arguments``)
    are gRPC core's server arguments; one that names an argument the server sets itself
    (the message size limits, ``grpc.so_reuseport``) replaces it. Raises ``RuntimeError``
    when the address cannot be bound, ``ValueError`` for an event loop that cannot be made.
    """
    return GrpcServer(service, host, port, max_threads, max_message_bytes, interceptors, credentials,
                      event_loop, channel_arguments)
