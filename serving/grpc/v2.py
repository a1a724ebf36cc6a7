"""The V2 gRPC adapter: ``inference.GRPCInferenceService`` over an InferenceService.

Served by the same ``grpc.aio.Server`` as TF Serving's services (``serving.grpc.server.build_server``
calls :func:`add_inference_servicer`). Inputs arrive as typed ``contents`` or as
``raw_input_contents``; outputs always leave as ``raw_output_contents``, as Triton
sends them. Errors leave through ``serving.grpc.status``.

Triton's statistics, model repository and model configuration extensions are
answered with the JSON shapes ``serving.codecs.v2`` builds for REST, parsed into
the messages (whose field names are Triton's), so both protocols say the same.

The message classes come from ``serving.protos.inference``, which lives in a
descriptor pool of its own (see ``serving/protos/generate.py``), so this module
and ``tritonclient.grpc`` can share a process. Server reflection finds them
through :data:`DESCRIPTOR_POOL` (``serving.grpc.server``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from google.protobuf import json_format

from serving.codecs import v2
from serving.errors import InvalidArgument, NotFound
from serving.grpc.status import deadline_of, inference_rpc, rpc
from serving.protos.inference import grpc_service_pb2 as pb
from serving.protos.inference import grpc_service_pb2_grpc as pb_grpc
from serving.runtime.loop import run_blocking

if TYPE_CHECKING:
    from serving.service import InferenceService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The private descriptor pool that holds this service's messages (see the module docstring).
DESCRIPTOR_POOL = pb.DESCRIPTOR.pool
PROTOCOL = "grpc_v2"


def _parameter_value(param: pb.InferParameter | pb.ModelRepositoryParameter):
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def _parameters(params) -> dict:
    return {key: _parameter_value(value) for key, value in params.items()}


def decode_inputs(request: pb.ModelInferRequest) -> list[v2.InferInput]:
    """The request's input tensors, from typed contents or from raw_input_contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} inputs")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input '{tensor.name}' sets contents although raw_input_contents is used")
            array = v2.raw_to_array(tensor.name, tensor.datatype, shape, raw[index])
        else:
            array = v2.contents_to_array(tensor.name, tensor.datatype, shape, tensor.contents)
        inputs.append(v2.InferInput(tensor.name, tensor.datatype, array))
    return inputs


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService: health, metadata and inference."""

    protocol = PROTOCOL

    def __init__(self, service: InferenceService):
        self._service = service

    @rpc
    async def ServerLive(self, request, context):
        """Whether the server can answer at all."""
        return pb.ServerLiveResponse(live=self._service.live())

    @rpc
    async def ServerReady(self, request, context):
        """Whether every configured model has a version loaded (false while draining)."""
        return pb.ServerReadyResponse(ready=self._service.ready())

    @rpc
    async def ModelReady(self, request, context):
        """Whether the model (version) is loaded; an unknown model or version is simply not ready."""
        try:
            ready = await run_blocking(v2.model_ready, self._service, request.name, request.version)
        except NotFound:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    @rpc
    async def ServerMetadata(self, request, context):
        """Server name, version and extensions."""
        return pb.ServerMetadataResponse(**v2.server_metadata())

    @rpc
    async def ModelMetadata(self, request, context):
        """The model's tensors and versions; lineage as JSON text in ``properties["graft"]``."""
        meta = await run_blocking(v2.model_metadata, self._service, request.name, request.version)
        response = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
        for target, tensors in ((response.inputs, meta.inputs), (response.outputs, meta.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if meta.lineage is not None:
            response.properties[v2.LINEAGE_KEY] = json.dumps(meta.lineage, sort_keys=True)
        return response

    @inference_rpc("predict", lambda request: request.model_name)
    async def ModelInfer(self, request, context):
        """Run the model; every output is returned in raw_output_contents."""
        infer_request = v2.InferRequest(
            model=request.model_name, version=request.model_version, id=request.id,
            inputs=decode_inputs(request),
            outputs=[v2.RequestedOutput(o.name, _parameters(o.parameters)) for o in request.outputs],
            parameters=_parameters(request.parameters), deadline=deadline_of(context), protocol=PROTOCOL)
        result = await v2.infer_async(self._service, infer_request)
        response = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=result.id)
        for out in result.outputs:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            response.raw_output_contents.append(v2.array_to_raw(out.array))
        return response

    @rpc
    async def ModelConfig(self, request, context):
        """The model's configuration, for the version asked (empty: the newest loaded one)."""
        config = await run_blocking(v2.model_config, self._service, request.name, request.version)
        return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

    @rpc
    async def ModelStatistics(self, request, context):
        """Statistics of the loaded versions of one model (or of every model, without a name)."""
        stats = await run_blocking(v2.model_statistics, self._service, request.name, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    @rpc
    async def RepositoryIndex(self, request, context):
        """Every configured model and the state of each of its versions."""
        entries = await run_blocking(v2.repository_index, self._service, request.ready)
        return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse())

    @rpc
    async def RepositoryModelLoad(self, request, context):
        """Load a configured model (again); answers once a version is AVAILABLE."""
        await run_blocking(v2.load_model, self._service, request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        """Unload a model; its in-flight requests finish first."""
        await run_blocking(v2.unload_model, self._service, request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def add_inference_servicer(service: InferenceService, server) -> None:
    """Register the V2 servicer on ``server``: a ``grpc.aio.Server`` or anything with its
    ``add_generic_rpc_handlers`` (graft's own server passes a ``GuardedRegistry``)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
