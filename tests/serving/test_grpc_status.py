"""serving.grpc.status over a real grpc.aio server: a bug in a servicer reaches the client as
INTERNAL with a request id, never the exception's text, and the log has the traceback
under the same id; the server keeps answering."""

from __future__ import annotations

import logging
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from serving.grpc.server import build_server
from tests.serving.server import BrokenService


@pytest.fixture
def channel():
    server = build_server(BrokenService(), "127.0.0.1", 0, max_threads=2)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan
    server.stop(grace=0)


def test_a_bug_is_internal_with_a_request_id_and_no_exception_text(channel, caplog):
    caplog.set_level(logging.ERROR)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "m"
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelStatus(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    match = re.fullmatch(r"Internal error \(request id ([0-9a-f]{16})\); the server log has the details", details)
    assert match, details
    assert "bug in the service" not in details and "RuntimeError" not in details
    assert f"request id {match.group(1)}" in caplog.text and "bug in the service" in caplog.text
    # The server still answers.
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
