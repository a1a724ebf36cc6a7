"""TLS on both ports: gRPC from TF Serving's SSLConfig (TLS and mutual TLS), REST over HTTPS (uvicorn).

Certificates come from a CA made in the test (``tests/security/certs.py``).
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.rest.server import MAX_REQUEST_HEADER_BYTES, RestServer
from serving.runtime.main import main
from serving.protos.graft.ssl_config_pb2 import SSLConfig
from serving.runtime.tls import parse_ssl_config, read_ssl_config
from tests.security.conftest import MODEL, expected_y, predict_body, predict_request, running

APP = Starlette()   # RestServer's TLS checks need an app, never called

# The server certificate names localhost and 127.0.0.1; gRPC checks the name we connect to.
TARGET = "localhost"


def _ssl_config_text(pki, *, client_verify: bool, with_ca: bool = True) -> str:
    config = SSLConfig(server_key=pki.server.key_pem.decode(), server_cert=pki.server.cert_pem.decode(),
                       custom_ca=pki.ca.cert_pem.decode() if with_ca else "", client_verify=client_verify)
    # The text form TF Serving users write: PEM contents inline, "\n" escaped.
    return text_format.MessageToString(config)


def _write_ssl_config(tmp_path, pki, **kwargs):
    path = tmp_path / f"ssl-{len(list(tmp_path.iterdir()))}.config"
    path.write_text(_ssl_config_text(pki, **kwargs))
    return path


# ---- parsing and checking the SSLConfig ----

def test_ssl_config_parses_tf_serving_text(pki):
    config = parse_ssl_config(_ssl_config_text(pki, client_verify=True))
    assert config.client_verify and config.server_cert == pki.server.cert_pem.decode()
    assert "\\n" in _ssl_config_text(pki, client_verify=True)   # escaped newlines, one line per field


GARBLED_PEM = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("make, problem", [
    (lambda pki: _ssl_config_text(pki, client_verify=False).replace("server_key", "server_kee", 1),
     "not a SSLConfig text proto"),
    (lambda pki: text_format.MessageToString(SSLConfig(server_cert=pki.server.cert_pem.decode())),
     "server_key must hold"),
    (lambda pki: text_format.MessageToString(SSLConfig(server_key=pki.server.key_pem.decode())),
     "server_cert must hold PEM"),
    (lambda pki: text_format.MessageToString(SSLConfig(server_key=pki.server.key_pem.decode(),
                                                       server_cert=GARBLED_PEM)),
     "server_cert is not valid PEM"),
    (lambda pki: text_format.MessageToString(SSLConfig(server_key=pki.server.key_pem.decode(),
                                                       server_cert=pki.server.cert_pem.decode(),
                                                       custom_ca=GARBLED_PEM)),
     "custom_ca is not valid PEM"),
])
def test_bad_ssl_configs_name_the_problem(pki, tmp_path, make, problem):
    path = tmp_path / "ssl.config"
    path.write_text(make(pki))
    with pytest.raises(ValueError, match=problem) as info:
        read_ssl_config(path)
    assert str(path) in str(info.value)


def test_client_verify_without_a_ca_is_refused(pki):
    with pytest.raises(ValueError, match="client_verify needs custom_ca"):
        parse_ssl_config(_ssl_config_text(pki, client_verify=True, with_ca=False))


def test_mismatched_key_and_certificate_stop_startup(pki, repo, tmp_path, caplog):
    # Both halves are valid PEM, so only gRPC itself can tell they do not belong together.
    config = SSLConfig(server_key=pki.client.key_pem.decode(), server_cert=pki.server.cert_pem.decode())
    path = tmp_path / "ssl.config"
    path.write_text(text_format.MessageToString(config))
    assert main(["--host", "127.0.0.1", "--port", "0", "--rest_api_port", "0", "--model_name", MODEL,
                 "--model_base_path", str(repo / MODEL), "--ssl_config_file", str(path)]) == 1
    assert "server_key belong to server_cert" in caplog.text


def test_rest_tls_with_a_key_of_another_certificate_is_refused(pki):
    with pytest.raises(ValueError, match="--rest_tls_cert/--rest_tls_key"):
        RestServer(APP, "127.0.0.1", 0, certfile=str(pki.server.cert_file), keyfile=str(pki.client.key_file))
    with pytest.raises(ValueError, match="no such file"):
        RestServer(APP, "127.0.0.1", 0, certfile=str(pki.server.cert_file) + ".missing",
                   keyfile=str(pki.server.key_file))


# ---- gRPC TLS (no client certificate) and REST HTTPS ----

@pytest.fixture(scope="module")
def tls_server(repo, pki, tmp_path_factory):
    config = _write_ssl_config(tmp_path_factory.mktemp("ssl"), pki, client_verify=False)
    with running(repo, ssl_config_file=str(config), rest_tls_cert=str(pki.server.cert_file),
                 rest_tls_key=str(pki.server.key_file)) as srv:
        yield srv


def _secure_channel(srv, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(f"{TARGET}:{srv.grpc_port}", credentials)


def _predict(channel: grpc.Channel, **kwargs):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return stub.Predict(predict_request(), timeout=10, **kwargs)


def test_grpc_tls_predict(tls_server, pki):
    with _secure_channel(tls_server, grpc.ssl_channel_credentials(pki.ca.cert_pem)) as channel:
        y = tf.make_ndarray(_predict(channel).outputs["y"])
    np.testing.assert_allclose(y, expected_y(), rtol=1e-5)


def test_grpc_tls_refuses_plaintext_and_untrusted_servers(tls_server, pki):
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            _predict(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client trusting another CA must not accept this server.
    other_ca = (pki.ca.cert_file.parent / "other-ca.crt").read_bytes()
    with _secure_channel(tls_server, grpc.ssl_channel_credentials(other_ca)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _predict(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _https(srv, path: str) -> str:
    return f"https://127.0.0.1:{srv.rest_port}{path}"


def test_rest_https_predict(tls_server, pki):
    response = requests.post(_https(tls_server, f"/v1/models/{MODEL}:predict"), json=predict_body(),
                             verify=str(pki.ca.cert_file), timeout=30)
    assert response.status_code == 200, response.text
    y = np.array([p["y"] for p in response.json()["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(y, expected_y(), rtol=1e-5)
    assert requests.get(_https(tls_server, "/readyz"), verify=str(pki.ca.cert_file), timeout=30).status_code == 200


def test_rest_https_refuses_plain_http_and_untrusted_clients(tls_server, pki):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls_server.rest_port}/healthz", timeout=10)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(_https(tls_server, "/healthz"), verify=str(pki.ca.cert_file.parent / "other-ca.crt"),
                     timeout=10)


def test_https_refuses_oversized_headers(tls_server, pki):
    response = requests.get(_https(tls_server, "/healthz"),
                            headers={"X-Padding": "a" * (MAX_REQUEST_HEADER_BYTES + 1)},
                            verify=str(pki.ca.cert_file), timeout=30)
    assert response.status_code == 431


def test_a_silent_connection_does_not_stall_https(tls_server, pki):
    # A server that shook hands on its accept loop (cheroot's stock adapter did) would let one
    # client that connects and sends nothing hold every new connection for its socket timeout.
    with socket.create_connection(("127.0.0.1", tls_server.rest_port)):
        time.sleep(0.2)
        start = time.monotonic()
        response = requests.get(_https(tls_server, "/healthz"), verify=str(pki.ca.cert_file), timeout=8)
        assert response.status_code == 200
        assert time.monotonic() - start < 3.0


def test_https_serves_concurrent_clients(tls_server, pki):
    results = []

    def call():
        with requests.Session() as session:
            for _ in range(5):
                r = session.post(_https(tls_server, f"/v1/models/{MODEL}:predict"), json=predict_body(),
                                 verify=str(pki.ca.cert_file), timeout=30)
                results.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 20


# ---- gRPC mutual TLS, combined with a bearer token ----

@pytest.fixture(scope="module")
def mtls_server(repo, pki, tokens, tmp_path_factory):
    config = _write_ssl_config(tmp_path_factory.mktemp("mtls"), pki, client_verify=True)
    with running(repo, ssl_config_file=str(config), auth_token_file=str(tokens[2])) as srv:
        yield srv


def _client_credentials(pki, identity=None) -> grpc.ChannelCredentials:
    if identity is None:
        return grpc.ssl_channel_credentials(pki.ca.cert_pem)
    return grpc.ssl_channel_credentials(pki.ca.cert_pem, identity.key_pem, identity.cert_pem)


def test_mtls_accepts_a_client_certificate_from_the_ca(mtls_server, pki, tokens):
    credentials = grpc.composite_channel_credentials(
        _client_credentials(pki, pki.client), grpc.access_token_call_credentials(tokens[0]))
    with _secure_channel(mtls_server, credentials) as channel:
        y = tf.make_ndarray(_predict(channel).outputs["y"])
    np.testing.assert_allclose(y, expected_y(), rtol=1e-5)


def test_mtls_with_a_certificate_still_needs_the_token(mtls_server, pki):
    with _secure_channel(mtls_server, _client_credentials(pki, pki.client)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _predict(channel)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mtls_refuses_clients_without_a_trusted_certificate(mtls_server, pki, tokens, who):
    identity = None if who == "no certificate" else pki.rogue_client
    credentials = grpc.composite_channel_credentials(
        _client_credentials(pki, identity), grpc.access_token_call_credentials(tokens[0]))
    with _secure_channel(mtls_server, credentials) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _predict(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Not even health answers: the handshake itself fails.
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
