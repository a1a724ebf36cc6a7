"""TF Serving's gRPC API: PredictionService (Predict, Classify, Regress, MultiInference,
GetModelMetadata) and ModelService (GetModelStatus, HandleReloadConfigRequest).

The servicers only translate protos to service calls and back; errors leave
through ``serving.grpc.status``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from google.protobuf import json_format, struct_pb2
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

from graft.contract import CLASSIFY_METHOD, LINEAGE_METADATA_KEY, REGRESS_METHOD
from serving.codecs import tensor_proto
from serving.config import model_configs_from_proto
from serving.errors import InvalidArgument, located
from serving.grpc.status import deadline_of, inference_rpc, rpc
from serving.runtime.loop import run_blocking
from serving.service import (
    ClassifyResult,
    ExamplesCall,
    InferenceTask,
    MultiInferenceCall,
    PredictCall,
)

if TYPE_CHECKING:
    from serving.service import InferenceService

log = logging.getLogger(__name__)

PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
SIGNATURE_DEF_FIELD = "signature_def"

_STATE = get_model_status_pb2.ModelVersionStatus.State
_ERROR_CODE = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type


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
                arrays[name] = tensor_proto.tensor_proto_to_numpy(tensor, max_elements=self._max_elements)
        return arrays

    @inference_rpc("predict", _spec_model)
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
            response.outputs[name].CopyFrom(tensor_proto.numpy_to_tensor_proto(value))
        return response

    def _examples_call(self, request, context) -> ExamplesCall:
        version, label = _version_and_label(request.model_spec)
        examples, example_context = tensor_proto.examples_from_input(request.input)
        return ExamplesCall(model=request.model_spec.name, version=version, label=label,
                            signature_name=request.model_spec.signature_name, examples=examples,
                            context=example_context, deadline=deadline_of(context), protocol="grpc")

    @inference_rpc("classify", _spec_model)
    async def Classify(self, request, context):
        """Run a classify signature over the request's tf.Examples."""
        result = await run_blocking(self._service.classify, self._examples_call(request, context))
        response = classification_pb2.ClassificationResponse()
        _model_spec(response.model_spec, result.model, result.version, result.signature_name)
        _fill_classification(response.result, result)
        return response

    @inference_rpc("regress", _spec_model)
    async def Regress(self, request, context):
        """Run a regress signature over the request's tf.Examples."""
        result = await run_blocking(self._service.regress, self._examples_call(request, context))
        response = regression_pb2.RegressionResponse()
        _model_spec(response.model_spec, result.model, result.version, result.signature_name)
        for value in result.values:
            response.result.regressions.add(value=value)
        return response

    @inference_rpc("multi_inference", _first_task_model)
    async def MultiInference(self, request, context):
        """Several classify/regress signatures of one model version over the same examples.

        Graft's fan-out: tasks may name other models or versions when they all share one
        loaded trunk (the service refuses any other mix with INVALID_ARGUMENT).
        """
        if not request.tasks:
            raise InvalidArgument("MultiInferenceRequest has no tasks")
        first = request.tasks[0].model_spec
        version, label = _version_and_label(first)
        tasks = []
        for task in request.tasks:
            task_version, task_label = _version_and_label(task.model_spec)
            if task.model_spec.name == first.name and (task_version, task_label) == (version, label):
                tasks.append(InferenceTask(task.model_spec.signature_name, task.method_name))
            else:
                tasks.append(InferenceTask(task.model_spec.signature_name, task.method_name,
                                           task.model_spec.name, task_version, task_label))
        examples, example_context = tensor_proto.examples_from_input(request.input)
        results = await run_blocking(self._service.multi_inference, MultiInferenceCall(
            model=first.name, version=version, label=label, tasks=tasks,
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

    @rpc
    async def GetModelMetadata(self, request, context):
        """The version's SignatureDefMap under "signature_def"; its lineage (a Struct) under "graft"."""
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field not in (SIGNATURE_DEF_FIELD, LINEAGE_METADATA_KEY):
                raise InvalidArgument(f"Metadata field {field} is not supported")
        version, label = _version_and_label(request.model_spec)
        result = await run_blocking(self._service.model_metadata, request.model_spec.name, version, label)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _model_spec(response.model_spec, result.model, result.version)
        if SIGNATURE_DEF_FIELD in fields:
            response.metadata[SIGNATURE_DEF_FIELD].Pack(result.signature_def_map)
        if LINEAGE_METADATA_KEY in fields and result.lineage is not None:
            # Lineage is JSON (assets.extra/graft.json); Struct is its protobuf form.
            response.metadata[LINEAGE_METADATA_KEY].Pack(json_format.ParseDict(result.lineage, struct_pb2.Struct()))
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: version status and whole-list config reload."""

    def __init__(self, service: InferenceService):
        self._service = service

    @rpc
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

    @rpc
    async def HandleReloadConfigRequest(self, request, context):
        """Replace the served model list with ``request.config`` (missing models unload)."""
        try:
            configs = model_configs_from_proto(request.config)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        await run_blocking(self._service.reload_config_request, configs)
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())


