"""graft-serve's command line, wiring and graceful shutdown (a real subprocess gets SIGTERM)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2

from serving.runtime.compat import INERT_FLAGS
from serving.runtime.main import build_parser, config_from_args, main, parse_config
from serving.runtime.preflight import batching_config
from serving.runtime.server import GraftServer
from serving.runtime.settings import ServerConfig
from serving.config import parse_monitoring_config
from serving.servable import _FrozenCall
from serving.rest.body import DECODE_ON_LOOP_BYTES
from tests import models
from tests.ports import free_port
from tests.models import write_model_config
from tests.serving.server import Client, Subprocess, serving

X = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], dtype=np.float32)


def test_defaults_are_tf_servings():
    args = build_parser().parse_args([])
    assert (args.port, args.rest_api_port, args.host) == (8500, 8501, "0.0.0.0")
    assert args.model_name == "default"
    assert args.file_system_poll_wait_seconds == 1.0
    assert args.model_config_file_poll_wait_seconds == 0.0
    assert args.rest_api_timeout_in_ms == 30000
    assert args.enable_batching is None  # not given: false, unless a batching parameters file is


def test_every_setting_is_a_flag_with_the_settings_default():
    args = vars(build_parser().parse_args(["--model_base_path", "/m"]))
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig) if f.name != "inert_flags"}
    # Beside the settings: --version, and TF Serving's flags without effect (None: not given).
    assert set(args) == set(defaults) | {"version"} | set(INERT_FLAGS)
    assert {name: args[name] for name in INERT_FLAGS} == dict.fromkeys(INERT_FLAGS)
    assert {name: args[name] for name in defaults} == {**defaults, "model_base_path": "/m"}
    assert config_from_args(build_parser().parse_args(["--model_base_path", "/m"])) == ServerConfig(model_base_path="/m")


@pytest.mark.parametrize("settings, message", [
    ({}, "either --model_config_file or --model_base_path is required"),
    ({"model_base_path": "/m", "rest_tls_cert": "c.pem"}, "--rest_tls_cert and --rest_tls_key go together"),
    ({"model_base_path": "/m", "auth_metrics": True}, "--auth_metrics needs --auth_token_file"),
    ({"model_base_path": "/m", "grpc_event_loop": "trio"}, "--grpc_event_loop must be one of"),
])
def test_contradictory_settings_are_refused_by_the_config(settings, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**settings)


@pytest.mark.parametrize("flags, expected", [
    ([], None), (["--enable_batching"], True), (["--enable_batching=true"], True),
    (["--enable_batching=false"], False), (["--enable_batching=0"], False),
    (["--enable_batching", "TRUE"], True),
])
def test_boolean_flags_accept_tf_serving_forms(flags, expected):
    assert build_parser().parse_args(flags).enable_batching is expected


@pytest.mark.parametrize("argv", [
    [],                                              # neither a config file nor a base path
    ["--model_base_path", "/m", "--enable_batching=maybe"],
    ["--model_base_path", "/m", "--port", "70000"],
])
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "graft-serve" in capsys.readouterr().err


def test_bad_model_config_exits_1(tmp_path, caplog):
    config = tmp_path / "models.config"
    config.write_text("model_config_list { config { name: 'm' base_path: '/x' nonsense: 1 } }")
    assert main(["--model_config_file", str(config), "--port", "0",
                 "--rest_api_port", str(free_port()), "--host", "127.0.0.1"]) == 1
    assert "cannot start" in caplog.text


@pytest.mark.parametrize("flags, batching", [
    ([], False),
    (["--enable_batching"], True),
    (["--batching_parameters_file", "{file}"], True),   # the file alone turns batching on
    (["--enable_batching=true", "--batching_parameters_file", "{file}"], True),
    (["--enable_batching=false", "--batching_parameters_file", "{file}"], False),  # as in TF Serving
])
def test_batching_flags(tmp_path, flags, batching, caplog):
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 8 }")
    config = batching_config(parse_config(["--model_base_path", "/m", *(f.format(file=path) for f in flags)]))
    assert (config is not None) is batching
    if config is not None and "--batching_parameters_file" in flags:
        assert config.max_batch_size == 8
    assert ("is ignored" in caplog.text) is ("--enable_batching=false" in flags)


def test_monitoring_config_text():
    assert parse_monitoring_config("") == ()
    assert parse_monitoring_config("prometheus_config { enable: false path: '/m' }") == ()
    assert parse_monitoring_config("prometheus_config { enable: true }") == \
        ("/metrics", "/monitoring/prometheus/metrics")
    assert parse_monitoring_config(
        'prometheus_config { enable: true, path: "/ops/prom" }') == ("/metrics", "/ops/prom")
    assert parse_monitoring_config("prometheus_config { enable: true path: '/metrics' }") == \
        ("/metrics",)
    for bad, needle in [("prometheus_config { enable: yes_please }", "MonitoringConfig"),
                        ("prometheus { enable: true }", "prometheus"),
                        ("prometheus_config { enable: true path: 'ops' }", "absolute"),
                        ("prometheus_config { enable: true path: '/v1/models/x' }", "/v1")]:
        with pytest.raises(ValueError, match=needle):
            parse_monitoring_config(bad)


def test_monitoring_config_file_moves_or_removes_the_metrics_paths(tmp_path, two_input_savedmodel):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    model = {"model_name": "two", "model_base_path": str(tmp_path / "two")}
    config = tmp_path / "monitoring.config"
    config.write_text('prometheus_config {\n  enable: true,\n  path: "/ops/prometheus"\n}\n')
    with serving(**model, monitoring_config_file=str(config)) as (_, client):
        _predict(client, "two")
        text = client.http.get(client.rest + "/ops/prometheus", timeout=30).text
        families = {f.name for f in text_string_to_metric_families(text)}
        assert {"graft_requests", "graft_inference_seconds"} <= families
        assert client.http.get(client.rest + "/metrics", timeout=30).status_code == 200
        assert client.http.get(client.rest + "/monitoring/prometheus/metrics", timeout=30).status_code == 404
    config.write_text("prometheus_config { enable: false }")
    with serving(**model, monitoring_config_file=str(config)) as (_, client):
        _predict(client, "two")
        for path in ("/metrics", "/monitoring/prometheus/metrics"):
            assert client.http.get(client.rest + path, timeout=30).status_code == 404
    config.write_text("prometheus_config { enable: true path: 'relative' }")
    assert main(["--monitoring_config_file", str(config), "--model_name", "two",
                 "--model_base_path", model["model_base_path"], "--port", "0",
                 "--rest_api_port", str(free_port()), "--host", "127.0.0.1"]) == 1


def _predict(client: Client, model: str, timeout: float = 30):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
    request.inputs["tag"].CopyFrom(tf.make_tensor_proto(np.array([b"a", b"b"])))
    return client.predict.Predict(request, timeout=timeout)


def test_grpc_channel_arguments_parse_as_tf_serving_does():
    parse = build_parser().parse_args
    args = parse(["--model_base_path", "/m", "--grpc_channel_arguments",
                  "grpc.max_connection_age_ms=2000, grpc.optimization_target=throughput,"])
    assert args.grpc_channel_arguments == (("grpc.max_connection_age_ms", 2000),
                                           ("grpc.optimization_target", "throughput"))
    assert parse(["--model_base_path", "/m"]).grpc_channel_arguments == ()
    for bad in ["grpc.keepalive_time_ms", "=5", "grpc.a=1,grpc.b"]:
        with pytest.raises(SystemExit):
            parse(["--model_base_path", "/m", "--grpc_channel_arguments", bad])


def test_grpc_channel_arguments_reach_the_server_and_replace_its_own(tmp_path, two_input_savedmodel):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    with serving(model_name="two", model_base_path=str(tmp_path / "two"),
                 grpc_channel_arguments=[("grpc.max_receive_message_length", 64)]) as (server, client):
        server.manager.wait_until_available("two")
        with pytest.raises(grpc.RpcError) as info:
            _predict(client, "two")   # ~100 bytes: over the 64 given, far under --max_request_bytes
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_rest_port_zero_disables_rest(tmp_path, two_input_savedmodel):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    server = GraftServer(ServerConfig(host="127.0.0.1", port=0, rest_api_port=0, model_name="two",
                                      model_base_path=str(tmp_path / "two")))
    server.start()
    client = Client(server.grpc_port, None)
    try:
        assert server.rest_port is None
        server.manager.wait_until_available("two")
        y = tf.make_ndarray(_predict(client, "two").outputs["y"])
        np.testing.assert_allclose(y, models.two_input_expected(X), atol=1e-5)
    finally:
        client.close()
        assert server.drain_and_stop()


def test_rest_takes_a_large_body_in_many_chunks_whole(tmp_path, two_input_savedmodel):
    """A body far larger than one socket read (~2 MB of JSON) is decoded off the loop and answered whole."""
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    with serving(model_name="two", model_base_path=str(tmp_path / "two")) as (server, client):
        assert server.rest_event_loop in ("uvloop", "asyncio")
        x = np.random.default_rng(3).uniform(0, 10, (40_000, 3)).astype(np.float32)
        body = json.dumps({"signature_name": "checked", "instances": x.tolist()}).encode()
        assert len(body) > 2 * DECODE_ON_LOOP_BYTES
        r = client.http.post(f"{client.rest}/v1/models/two:predict", data=body, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], np.sqrt(x), rtol=1e-6)
        # V2 takes the same road for a body this large.
        body = json.dumps({"parameters": {"signature_name": "checked"}, "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}).encode()
        assert len(body) > 2 * DECODE_ON_LOOP_BYTES
        r = client.http.post(f"{client.rest}/v2/models/two/infer", data=body, timeout=60)
        assert r.status_code == 200, r.text
        (out,) = r.json()["outputs"]
        np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), np.sqrt(x), rtol=1e-6)


@pytest.mark.parametrize("frozen", [True, False])
def test_freeze_graph_decides_how_versions_run(tmp_path, two_input_savedmodel, frozen):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    with serving(model_name="two", model_base_path=str(tmp_path / "two"), freeze_graph=frozen) as (server, client):
        server.manager.wait_until_available("two")
        with server.manager.acquire("two") as servable:
            call = servable._pool.replicas[0].calls["serving_default"]
        assert isinstance(call, _FrozenCall) is frozen
        y = tf.make_ndarray(_predict(client, "two").outputs["y"])
        np.testing.assert_allclose(y, models.two_input_expected(X), atol=1e-5)


def test_model_config_file_is_polled(tmp_path, two_input_savedmodel):
    for name in ("a", "b"):
        models.install_version(two_input_savedmodel, tmp_path / name, 1)
    config = write_model_config(tmp_path / "models.config", {"a": tmp_path / "a"})
    with serving(model_config_file=str(config), model_config_file_poll_wait_seconds=0.2) as (_, client):
        with pytest.raises(grpc.RpcError):
            _predict(client, "b")
        time.sleep(0.05)  # a different mtime, whatever the file system's resolution
        write_model_config(config, {"a": tmp_path / "a", "b": tmp_path / "b"})
        deadline = time.monotonic() + 30
        while True:
            try:
                y = tf.make_ndarray(_predict(client, "b").outputs["y"])
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "model b never became available"
                time.sleep(0.1)
        np.testing.assert_allclose(y, models.two_input_expected(X), atol=1e-5)


def _queued_rows(client: Client) -> float:
    text = requests.get(f"{client.rest}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "graft_batch_queue_depth":
            return sum(sample.value for sample in family.samples)
    return 0.0


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path, two_input_savedmodel):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    # A 30 s batch timeout holds the first requests in the queue: they are in flight at SIGTERM.
    # (The drain runs queued batches at once, so the test never waits for it; 4 s once ran
    # out on a loaded machine before all six requests were queued.)
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 64 } batch_timeout_micros { value: 30000000 }\n"
                        "num_batch_threads { value: 1 }\n")
    server = Subprocess(["--port", "0", "--rest_api_port", str(free_port()), "--model_name", "two",
                         "--model_base_path", str(tmp_path / "two"),
                         "--batching_parameters_file", str(batching), "--drain_seconds", "30"],
                        tmp_path / "serve.log")
    client = server.client
    answers: dict[str, object] = {}

    def rest_call(key):
        r = requests.post(f"{client.rest}/v1/models/two:predict",
                          json={"inputs": {"x": X.tolist(), "tag": ["a", "b"]}}, timeout=60)
        answers[key] = (r.status_code, r.json())

    def grpc_call(key):
        answers[key] = _predict(client, "two", timeout=60)

    def guarded(fn, key):
        try:
            fn(key)
        except Exception as exc:  # recorded and asserted on below
            answers[key] = exc

    threads = [threading.Thread(target=guarded, args=(fn, f"{fn.__name__}{i}"))
               for i in range(3) for fn in (rest_call, grpc_call)]
    try:
        for t in threads:
            t.start()
        # SIGTERM only once all 6 requests (12 rows) are admitted and queued.
        deadline = time.monotonic() + 25
        while _queued_rows(client) < 12:
            assert time.monotonic() < deadline, f"requests not queued: {answers}"
            time.sleep(0.05)
        assert not answers, "requests finished before SIGTERM; the batch timeout did not hold them"
        server.proc.terminate()
        # Readiness and health turn at once; new work is refused, not queued.
        deadline = time.monotonic() + 5
        while requests.get(f"{client.rest}/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        late = requests.post(f"{client.rest}/v1/models/two:predict",
                             json={"inputs": {"x": X.tolist(), "tag": ["a", "b"]}}, timeout=10)
        assert late.status_code == 503 and late.headers["Retry-After"] == "1"
        assert "shutting down" in late.json()["error"]
        with pytest.raises(grpc.RpcError) as info:
            _predict(client, "two", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(60)
        code = server.proc.wait(60)
    finally:
        exit_code = server.stop()
    expected = models.two_input_expected(X)
    assert len(answers) == 6
    for key, answer in answers.items():
        assert not isinstance(answer, Exception), (key, answer, server.log())
        if key.startswith("rest"):
            status, body = answer
            assert status == 200, body
            np.testing.assert_allclose(body["outputs"]["y"], expected, atol=1e-5)
        else:
            np.testing.assert_allclose(tf.make_ndarray(answer.outputs["y"]), expected, atol=1e-5)
    assert code == 0 and exit_code == 0, server.log()
    assert "draining" in server.log()


def test_warmup_flags_skip_or_repeat_the_warmup_records(tmp_path, two_input_savedmodel, caplog):
    caplog.set_level(logging.INFO, logger="serving.manager")
    bad, good = tmp_path / "bad", tmp_path / "good"
    models.install_version(two_input_savedmodel, bad, 1)
    # A record the model refuses: with warmup this version could never load.
    models.write_warmup(bad / "1", [models.predict_log({"x": -X[:1]}, signature_name="checked")])
    with serving(model_name="bad", model_base_path=str(bad), enable_model_warmup=False) as (_, client):
        y = tf.make_ndarray(_predict(client, "bad").outputs["y"])
        np.testing.assert_allclose(y, models.two_input_expected(X), atol=1e-5)
    models.install_version(two_input_savedmodel, good, 1)
    models.write_warmup(good / "1", [models.predict_log({"x": X, "tag": np.array([b"a", b"b"])})] * 2)
    with serving(model_name="good", model_base_path=str(good), num_request_iterations_for_warmup=3):
        assert "model good version 1: replayed 6 warmup records" in caplog.text   # 2 records, 3 times
