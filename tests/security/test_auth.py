"""Bearer-token authentication (--auth_token_file, --auth_metrics) over real REST and gRPC servers."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.runtime.auth import INVALID_MESSAGE, MISSING_MESSAGE, AuthInterceptor, TokenAuth, parse_tokens
from serving.errors import Unauthenticated
from serving.runtime.main import main
from serving.protos.inference import grpc_service_pb2 as v2_pb
from serving.protos.inference import grpc_service_pb2_grpc as v2_grpc
from tests.security.conftest import MODEL, expected_y, predict_body, predict_request, running

TOKEN = "A" * 20


# ---- the token file and the check itself ----

def test_token_file_holds_several_tokens_comments_and_blank_lines():
    assert parse_tokens(f"# rotation\n{TOKEN}\n\n  {'b' * 16}==  \n") == (TOKEN, "b" * 16 + "==")


@pytest.mark.parametrize("text, problem", [
    ("", "no token"),
    ("# only a comment\n\n", "no token"),
    ("short\n", "shorter than"),
    (f"{TOKEN} {TOKEN}\n", "only letters"),
    (f"{TOKEN}\n{TOKEN}\u00e9\n", "line 2"),
])
def test_bad_token_files_are_refused(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_tokens(text)


def test_check_accepts_only_a_listed_bearer_token():
    auth = TokenAuth([TOKEN, "c" * 16])
    auth.check(f"Bearer {TOKEN}")
    auth.check(f"bearer   {'c' * 16}")           # the scheme is case-insensitive (RFC 7235)
    for value, message in [(None, MISSING_MESSAGE), ("", MISSING_MESSAGE), (TOKEN, MISSING_MESSAGE),
                           (f"Basic {TOKEN}", MISSING_MESSAGE), (f"Bearer {TOKEN}x", INVALID_MESSAGE),
                           (f"Bearer {TOKEN[:-1]}", INVALID_MESSAGE), ("Bearer ", INVALID_MESSAGE),
                           ("Bearer \u00e9\u00e9", INVALID_MESSAGE)]:
        with pytest.raises(Unauthenticated) as info:
            auth.check(value)
        assert info.value.message == message and info.value.status == 401


def test_open_endpoints_follow_protect_metrics():
    open_metrics, closed_metrics = TokenAuth([TOKEN]), TokenAuth([TOKEN], protect_metrics=True)
    for auth in (open_metrics, closed_metrics):
        assert auth.rest_path_is_open("/healthz") and auth.rest_path_is_open("/v2/health/ready")
        assert auth.grpc_method_is_open("/grpc.health.v1.Health/Check")
        assert not auth.rest_path_is_open("/healthz/") and not auth.rest_path_is_open("/v1/models/m")
        assert not auth.grpc_method_is_open("/tensorflow.serving.PredictionService/Predict")
    assert open_metrics.rest_path_is_open("/metrics")
    assert not closed_metrics.rest_path_is_open("/metrics")
    assert not closed_metrics.rest_path_is_open("/monitoring/prometheus/metrics")
    # The paths --monitoring_config_file chose are the open ones, and no others.
    moved = TokenAuth([TOKEN], metrics_paths=("/metrics", "/ops/prom"))
    assert moved.rest_path_is_open("/ops/prom") and moved.rest_path_is_open("/metrics")
    assert not moved.rest_path_is_open("/monitoring/prometheus/metrics")


@pytest.mark.parametrize("argv, problem", [
    (["--auth_metrics"], "--auth_metrics needs --auth_token_file"),
    (["--rest_tls_cert", "/x.crt"], "--rest_tls_cert and --rest_tls_key go together"),
])
def test_flag_combinations_that_cannot_work_exit_2(argv, problem, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model_base_path", "/m", *argv])
    assert info.value.code == 2
    assert problem in capsys.readouterr().err


def test_unreadable_or_bad_token_file_stops_startup(tmp_path, repo, caplog):
    bad = tmp_path / "tokens"
    bad.write_text("tiny\n")
    common = ["--host", "127.0.0.1", "--port", "0", "--rest_api_port", "0",
              "--model_name", MODEL, "--model_base_path", str(repo / MODEL)]
    assert main([*common, "--auth_token_file", str(bad)]) == 1
    assert "shorter than" in caplog.text
    assert main([*common, "--auth_token_file", str(tmp_path / "missing")]) == 1


# ---- a real server with --auth_token_file ----

@pytest.fixture(scope="module")
def server(repo, tokens):
    with running(repo, auth_token_file=str(tokens[2])) as srv:
        yield srv


def _url(srv, path: str) -> str:
    return f"http://127.0.0.1:{srv.rest_port}{path}"


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_rest_predict_needs_the_token(server, tokens):
    url = _url(server, f"/v1/models/{MODEL}:predict")
    missing = requests.post(url, json=predict_body(), timeout=30)
    assert missing.status_code == 401
    assert missing.json() == {"error": MISSING_MESSAGE}
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = requests.post(url, json=predict_body(), headers=_bearer(tokens[0][:-1] + "?"), timeout=30)
    assert wrong.status_code == 401 and wrong.json() == {"error": INVALID_MESSAGE}
    for token in tokens[:2]:   # either token of the file
        ok = requests.post(url, json=predict_body(), headers=_bearer(token), timeout=30)
        assert ok.status_code == 200, ok.text
        y = np.array([p["y"] for p in ok.json()["predictions"]], dtype=np.float32)
        np.testing.assert_allclose(y, expected_y(), rtol=1e-5)


@pytest.mark.parametrize("method, path", [
    ("GET", f"/v1/models/{MODEL}"), ("GET", f"/v1/models/{MODEL}/metadata"), ("GET", "/v1/models"),
    ("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/ready"),
    ("POST", f"/v2/models/{MODEL}/infer"), ("GET", "/openapi.json"), ("GET", "/no/such/path"),
    ("POST", f"/v1/models/{MODEL}:classify"),
])
def test_every_other_rest_path_is_401_without_the_token(server, tokens, method, path):
    refused = requests.request(method, _url(server, path), json={}, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"] == MISSING_MESSAGE
    allowed = requests.request(method, _url(server, path), json={}, headers=_bearer(tokens[0]), timeout=30)
    assert allowed.status_code != 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready",
                                  "/metrics", "/monitoring/prometheus/metrics"])
def test_health_and_metrics_stay_open(server, path):
    response = requests.get(_url(server, path), timeout=30)
    assert response.status_code == 200, response.text


def _channel(srv) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")


def test_grpc_predict_needs_the_token(server, tokens):
    with _channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for metadata, message in [((), MISSING_MESSAGE),
                                  ((("authorization", f"Bearer {tokens[0]}x"),), INVALID_MESSAGE),
                                  ((("authorization", tokens[0]),), MISSING_MESSAGE)]:
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(predict_request(), metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert info.value.details() == message
        response = stub.Predict(predict_request(), metadata=(("authorization", f"Bearer {tokens[1]}"),),
                                timeout=30)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), expected_y(), rtol=1e-5)


def test_every_grpc_service_but_health_needs_the_token(server, tokens):
    with _channel(server) as channel:
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL
        v2 = v2_grpc.GRPCInferenceServiceStub(channel)
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        unknown = channel.unary_unary("/no.such.Service/Method")
        refused = [
            lambda md: status(request, metadata=md, timeout=30),
            lambda md: v2.ServerMetadata(v2_pb.ServerMetadataRequest(), metadata=md, timeout=30),
            lambda md: v2.ModelReady(v2_pb.ModelReadyRequest(name=MODEL), metadata=md, timeout=30),
            # A bidirectional stream is refused the same way as a unary call.
            lambda md: list(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                    metadata=md, timeout=30)),
            lambda md: unknown(b"", metadata=md, timeout=30),
        ]
        for call in refused:
            with pytest.raises(grpc.RpcError) as info:
                call(())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", f"Bearer {tokens[0]}"),)
        assert status(request, metadata=token, timeout=30).model_version_status[0].state == \
            get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert refused[3](token)[0].list_services_response.service
        with pytest.raises(grpc.RpcError) as info:
            refused[4](token)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED   # authenticated: the truth

        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert v2.ServerLive(v2_pb.ServerLiveRequest(), timeout=30).live
        assert v2.ServerReady(v2_pb.ServerReadyRequest(), timeout=30).ready


def test_interceptor_wraps_streaming_kinds():
    # The refusal must match the method's streaming kind, or grpc could not run it.
    interceptor = AuthInterceptor(TokenAuth([TOKEN]))
    for request_streaming in (False, True):
        for response_streaming in (False, True):
            handler = grpc.unary_unary_rpc_method_handler(lambda r, c: r)._replace(
                request_streaming=request_streaming, response_streaming=response_streaming)
            details = type("Details", (), {"method": "/a.B/C", "invocation_metadata": ()})()
            async def continuation(_details, handler=handler):
                return handler

            refusal = asyncio.run(interceptor.intercept_service(continuation, details))
            assert (refusal.request_streaming, refusal.response_streaming) == (request_streaming,
                                                                               response_streaming)
            assert refusal is not handler


# ---- --auth_metrics ----

def test_auth_metrics_protects_metrics_but_not_health(repo, tokens):
    with running(repo, auth_token_file=str(tokens[2]), auth_metrics=True) as srv:
        for path in ("/metrics", "/monitoring/prometheus/metrics"):
            assert requests.get(_url(srv, path), timeout=30).status_code == 401
            scraped = requests.get(_url(srv, path), headers=_bearer(tokens[0]), timeout=30)
            assert scraped.status_code == 200 and "graft_model_version_state" in scraped.text
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert requests.get(_url(srv, path), timeout=30).status_code == 200
