"""Warmup: the records of ``<version>/assets.extra/tf_serving_warmup_requests`` replayed on a
version before it is AVAILABLE, as TF Serving does.

Each PredictionLog record becomes the call a gRPC client's request would make
(a PredictCall, or an ExamplesCall per classify, regress or multi-inference
task) and runs through ``InferenceService.warm``: the request path's own
validation, so a warmup file cannot pass a check that a request would fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from graft import contract
from serving.codecs import tensor_proto
from serving.errors import InvalidArgument, WarmupFailed
from serving.servable import Servable, status_code, tf_error_message
from serving.service import ExamplesCall, InferenceService, PredictCall

# TF Serving's limit; more is an error, as there.
MAX_WARMUP_RECORDS = 1000


def replay(service: InferenceService, servable: Servable) -> int:
    """Replay the version's warmup file on ``servable``; the number of records (0 without a file).

    Raises ``WarmupFailed`` (with the failing request's status code) on a bad
    record, a failing call, or more than MAX_WARMUP_RECORDS records.
    """
    path = os.fspath(contract.warmup_path(servable.path))
    if not os.path.isfile(path):
        return 0
    count = 0
    try:
        for raw in tf.data.TFRecordDataset(path):
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise WarmupFailed(f"{path} has more than {MAX_WARMUP_RECORDS} warmup records", "INVALID_ARGUMENT")
            record = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
            for call, method in calls(record, servable.name, max_elements=len(raw.numpy()) + 1):
                service.warm(servable, call, method)
    except WarmupFailed:
        raise
    except Exception as exc:
        raise WarmupFailed(f"warmup record {count} of {path} failed: {tf_error_message(exc)}",
                           status_code(exc)) from exc
    return count


def calls(record: prediction_log_pb2.PredictionLog, model: str,
          max_elements: int) -> Iterator[tuple[PredictCall | ExamplesCall, str]]:
    """The (call, signature method) pairs one PredictionLog stands for, in order."""
    kind = record.WhichOneof("log_type")
    if kind == "predict_log":
        request = record.predict_log.request
        inputs = {k: tensor_proto.tensor_proto_to_numpy(v, max_elements=max_elements)
                  for k, v in request.inputs.items()}
        yield (PredictCall(model=model, signature_name=request.model_spec.signature_name, inputs=inputs,
                           output_filter=list(request.output_filter), protocol="warmup"),
               contract.PREDICT_METHOD)
    elif kind in ("classify_log", "regress_log"):
        request = getattr(record, kind).request
        examples, context = tensor_proto.examples_from_input(request.input)
        method = contract.CLASSIFY_METHOD if kind == "classify_log" else contract.REGRESS_METHOD
        yield (ExamplesCall(model=model, signature_name=request.model_spec.signature_name, examples=examples,
                            context=context, protocol="warmup"), method)
    elif kind == "multi_inference_log":
        request = record.multi_inference_log.request
        examples, context = tensor_proto.examples_from_input(request.input)
        for task in request.tasks:
            yield (ExamplesCall(model=model, signature_name=task.model_spec.signature_name, examples=examples,
                                context=context, protocol="warmup"), task.method_name)
    else:
        raise InvalidArgument(f"unsupported warmup record type {kind!r}")
