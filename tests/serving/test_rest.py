"""REST against a real graft-serve (in-process, uvicorn on 127.0.0.1) with real SavedModels.

The client is plain HTTP (``requests``); expected values come from the Keras
model and from numpy, never from the server itself.
"""

from __future__ import annotations

import base64
import gc
import gzip
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests import models
from tests.serving.server import serving

MAX_BYTES = 1_000_000
MAX_PIXELS = 64 * 64
X = [[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]]


@pytest.fixture(scope="module")
def server(cnn_and_two_repo):
    config = cnn_and_two_repo("rest_repo")
    with serving(model_config_file=str(config), max_request_bytes=MAX_BYTES, max_image_pixels=MAX_PIXELS,
                 enable_batching=True) as (_, client):
        yield client


def post(client, path, body=None, **kwargs):
    data = kwargs.pop("data", None)
    if data is None:
        data = json.dumps(body, allow_nan=True)
    return client.http.post(client.rest + path, data=data, timeout=30, **kwargs)


def get(client, path):
    return client.http.get(client.rest + path, timeout=30)


def _png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------- predict


def test_row_format_several_inputs_and_outputs(server):
    body = {"instances": [{"x": X[0], "tag": "ab"},
                          {"x": X[1], "tag": {"b64": base64.b64encode(b"\x00xyz").decode()}}]}
    r = post(server, "/v1/models/two:predict", body)
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert [sorted(row) for row in rows] == [["label_bytes", "tag_len", "y"]] * 2
    np.testing.assert_allclose([row["y"] for row in rows], models.two_input_expected(X), atol=1e-5)
    assert [row["tag_len"] for row in rows] == [2, 4]
    # Alias ends in _bytes: returned as {"b64"}.
    assert rows[1]["label_bytes"] == {"b64": base64.b64encode(b"\x00xyz").decode()}


def test_columnar_format(server):
    r = post(server, "/v1/models/two:predict", {"inputs": {"x": X, "tag": ["a", "bcd"]}})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    np.testing.assert_allclose(outputs["y"], models.two_input_expected(X), atol=1e-5)
    assert outputs["tag_len"] == [1, 3]


def test_cnn_row_and_columnar_match_keras(server, tiny_cnn_keras):
    images = np.random.default_rng(7).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = tiny_cnn_keras.predict(images, verbose=0)
    row = post(server, "/v1/models/cnn:predict", {"instances": images.tolist()})
    assert row.status_code == 200, row.text
    np.testing.assert_allclose(row.json()["predictions"], expected, atol=1e-5)
    col = post(server, "/v1/models/cnn/versions/1:predict",
               {"signature_name": "serving_default", "inputs": images.tolist()})
    np.testing.assert_allclose(col.json()["outputs"], expected, atol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 1e-4


def test_b64_images_for_an_image_signature(server, tiny_cnn_keras):
    pixels = np.random.default_rng(8).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    body = {"instances": [{"b64": _png(p)} for p in pixels]}
    r = post(server, "/v1/models/cnn:predict", body)
    assert r.status_code == 200, r.text
    expected = tiny_cnn_keras.predict(pixels.astype(np.float32), verbose=0)
    np.testing.assert_allclose(r.json()["predictions"], expected, atol=1e-5)


def test_output_filter_label_and_version_paths(server):
    body = {"instances": [{"x": X[0], "tag": "a"}], "output_filter": ["tag_len"]}
    for path in ("/v1/models/two/labels/stable:predict", "/v1/models/two/versions/1:predict"):
        r = post(server, path, body)
        assert r.status_code == 200, r.text
        assert r.json() == {"predictions": [1]}  # one output left: a bare list


def test_paths_are_case_insensitive_and_gzip_is_accepted(server):
    raw = gzip.compress(json.dumps({"inputs": {"x": X, "tag": ["a", "b"]}}).encode())
    r = post(server, "/V1/Models/two:PREDICT", data=raw, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"]["y"], models.two_input_expected(X), atol=1e-5)


def test_nan_and_infinity_in_and_out(server):
    raw = '{"inputs": {"x": [[NaN, 0, 0], [Infinity, 0, 0]], "tag": ["a", "b"]}}'
    r = post(server, "/v1/models/two:predict", data=raw)
    assert r.status_code == 200, r.text
    assert "NaN" in r.text and "Infinity" in r.text
    y = json.loads(r.text)["outputs"]["y"]
    assert math.isnan(y[0][0]) and math.isinf(y[1][0])


def test_classify_and_regress(server):
    rows = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
    y = models.two_input_expected(rows)
    body = {"signature_name": "classify", "examples": [{"x": r} for r in rows]}
    r = post(server, "/v1/models/two:classify", body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [[c[0] for c in row] for row in results] == [["neg", "pos"]] * 2
    e = np.exp(y - y.max(axis=1, keepdims=True))
    np.testing.assert_allclose([[c[1] for c in row] for row in results], e / e.sum(1, keepdims=True), atol=1e-5)
    r = post(server, "/v1/models/two/labels/stable:regress",
             {"signature_name": "regress", "context": {"x": [1.0, 1.0, 1.0]}, "examples": [{}, {}]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["results"],
                               models.two_input_expected(np.ones((2, 3))).sum(1), atol=1e-5)


# ----------------------------------------------------------------- status, metadata


def test_status_shape(server):
    expected = {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    for path in ("/v1/models/two", "/v1/models/two/versions/1", "/v1/models/two/labels/stable"):
        r = get(server, path)
        assert r.status_code == 200 and r.json() == expected, (path, r.text)


def test_metadata_shape(server):
    r = get(server, "/v1/models/two/metadata")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_spec"] == {"name": "two", "signature_name": "", "version": "1"}
    defs = body["metadata"]["signature_def"]["signature_def"]  # the doubled key is TF Serving's
    assert set(defs) == {"serving_default", "checked", "classify", "regress"}
    x = defs["serving_default"]["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT" and x["tensor_shape"]["dim"] == [{"size": "-1"}, {"size": "3"}]
    assert defs["classify"]["method_name"] == "tensorflow/serving/classify"


def test_model_list_health_and_metrics(server):
    listed = get(server, "/v1/models").json()["models"]
    assert {m["name"]: m["labels"] for m in listed} == {"cnn": {}, "two": {"stable": 1}}
    assert all(m["model_version_status"][0]["state"] == "AVAILABLE" for m in listed)
    assert get(server, "/healthz").status_code == 200
    assert get(server, "/readyz").json() == {"status": "ready"}
    post(server, "/v1/models/two:predict", {"inputs": {"x": X, "tag": ["a", "b"]}})
    metrics = get(server, "/metrics")
    assert metrics.status_code == 200
    assert 'graft_requests_total{code="OK",method="predict",model="two",protocol="rest"' in metrics.text
    assert get(server, "/monitoring/prometheus/metrics").status_code == 200


def _request_counts(client) -> dict[tuple, float]:
    """graft_requests_total by (model, version, signature, protocol, code), parsed from /metrics."""
    text = get(client, "/metrics").text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "graft_requests"]
    return {(s.labels["model"], s.labels["version"], s.labels["signature"], s.labels["protocol"],
             s.labels["code"]): s.value for s in family.samples if s.name == "graft_requests_total"}


def test_refusals_before_the_service_are_counted_and_both_metrics_paths_agree(server):
    before = _request_counts(server)
    assert post(server, "/v1/models/two:predict", data="{not json").status_code == 400
    assert post(server, "/v1/models/two:predict", data=b" " * (MAX_BYTES + 1)).status_code == 413
    assert post(server, "/v1/models/two/versions/abc:predict", GOOD_TWO).status_code == 400
    assert post(server, "/v1/models/two:predict", {"inputs": {"x": X}}).status_code == 400  # the service's
    after = _request_counts(server)
    moved = {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}
    # The body error (413) has its own code; the three 400s are INVALID_ARGUMENT, one of them the service's.
    too_large = [key for key in moved if key[4] not in ("INVALID_ARGUMENT",)]
    assert len(too_large) == 1 and moved[too_large[0]] == 1 and too_large[0][:4] == ("two", "", "", "rest")
    assert moved[("two", "", "", "rest", "INVALID_ARGUMENT")] == 2
    assert moved[("two", "1", "serving_default", "rest", "INVALID_ARGUMENT")] == 1
    # TF Serving's path serves the same registry.
    tf_path = get(server, "/monitoring/prometheus/metrics").text
    assert {f.name for f in text_string_to_metric_families(tf_path)} == \
        {f.name for f in text_string_to_metric_families(get(server, "/metrics").text)}


# -------------------------------------------------------------------------- errors

GOOD_TWO = {"instances": [{"x": X[0], "tag": "a"}]}


def _over_limit_png() -> str:
    return _png(np.zeros((65, 64, 3), dtype=np.uint8))


ERRORS = [
    ("POST", "/v1/models/ghost:predict", GOOD_TWO, 404, "Servable not found"),
    ("POST", "/v1/models/two/versions/9:predict", GOOD_TWO, 404, "Servable not found"),
    ("POST", "/v1/models/two/labels/canary:predict", GOOD_TWO, 400, "label"),
    ("POST", "/v1/models/two/versions/1/labels/stable:predict", GOOD_TWO, 400, "version and version label"),
    ("POST", "/v1/models/two/versions/abc:predict", GOOD_TWO, 400, "non-negative integer, got 'abc'"),
    ("GET", "/v1/models/two/versions/-1", None, 400, "non-negative integer"),
    ("POST", "/v1/models/two:predict", dict(GOOD_TWO, signature_name="nope"), 400, 'signature key "nope" not found'),
    ("POST", "/v1/models/two:predict", {"signature_name": 3, "instances": [1]}, 400, "'signature_name' key must be a string"),
    ("POST", "/v1/models/two:predict", {"instances": [{"x": X[0], "tag": "a", "z": 1}]}, 400, "unknown input 'z'"),
    ("POST", "/v1/models/two:predict", {"inputs": {"x": X}}, 400, "Missing named input: tag"),
    ("POST", "/v1/models/two:predict", {"instances": [], "inputs": {}}, 400, "expecting only one of 'inputs' or 'instances'"),
    ("POST", "/v1/models/two:predict", {"signature_name": "serving_default"}, 400, "Missing 'inputs' or 'instances'"),
    ("POST", "/v1/models/two:predict", "{not json", 400, "JSON Parse error"),
    ("POST", "/v1/models/two:predict", "", 400, "document is empty"),
    ("POST", "/v1/models/two:predict", "[1, 2]", 400, "not an object"),
    ("POST", "/v1/models/two:predict", {"inputs": {"x": [["a", "b", "c"]], "tag": ["a"]}}, 400, "input 'x' expects float32 but got string"),
    ("POST", "/v1/models/two:predict", {"inputs": {"x": [[1, 2]], "tag": ["a"]}}, 400, r"input 'x' expects shape \[-1, 3\] but got \[1, 2\]"),
    ("POST", "/v1/models/two:predict", {"inputs": {"x": [[1, 2, 3]], "tag": [1]}}, 400, "input 'tag'.*not of expected type: string"),
    ("POST", "/v1/models/two:predict", {"inputs": {"x": X, "tag": ["a", "b", "c"]}}, 400, "inconsistent batch sizes"),
    ("POST", "/v1/models/two:predict", {"instances": [{"x": [1, 2, 3], "tag": "a"}, {"x": [1, 2], "tag": "b"}]}, 400, "input 'x': every instance must have the same shape"),
    ("POST", "/v1/models/two:predict", dict(GOOD_TWO, output_filter=["nope"]), 400, "output tensor alias not found"),
    ("POST", "/v1/models/two:predict", {"signature_name": "checked", "instances": [[-1, 0, 0]]}, 400, "x must be >= 0"),
    # Bodies that are one numeric array (serving.codecs.dense_json), for signatures it cannot serve directly.
    ("POST", "/v1/models/two:predict", {"instances": [[1, 2, 3]]}, 400, "instances is a plain list, but expecting list of objects"),
    ("POST", "/v1/models/two:predict", {"inputs": [[1, 2, 3]]}, 400, "inputs is a plain value/list"),
    ("POST", "/v1/models/two:predict", {"signature_name": "checked", "instances": [[1, 2, 3], [4, 5]]}, 400, "every instance must have the same shape"),
    ("POST", "/v1/models/two:predict", {"signature_name": "checked", "instances": [[1, 2]]}, 400, r"input 'x' expects shape \[-1, 3\] but got \[1, 2\]"),
    ("POST", "/v1/models/cnn:predict", {"instances": [{"b64": "OVER_LIMIT"}]}, 400, "image of 64x65 = 4160 pixels exceeds the limit of 4096"),
    ("POST", "/v1/models/cnn:predict", {"instances": [{"b64": base64.b64encode(b"GIF89a junk").decode()}]}, 400, "input 'images' item 0"),
    ("POST", "/v1/models/two:classify", {"examples": [{"x": [1.0, 2.0, 3.0]}]}, 400, "Expected classification signature method_name"),
    ("POST", "/v1/models/two:classify", {"signature_name": "classify", "examples": []}, 400, "'examples' value is an empty array"),
    ("POST", "/v1/models/two:regress", {"signature_name": "regress", "instances": [1]}, 400, "'examples' is expected"),
    ("POST", "/v1/models/two:explain", GOOD_TWO, 404, "unknown method 'explain'"),
    ("GET", "/v1/models/two:predict", None, 405, "not allowed"),
    ("POST", "/v1/models/two", GOOD_TWO, 405, "not allowed"),
    ("POST", "/v1/models", GOOD_TWO, 405, "not allowed"),
    ("GET", "/v2/nothing/here", None, 404, "Malformed request"),
    ("GET", "/v1/models/ghost", None, 404, "ghost"),
    ("GET", "/v1/models/ghost/metadata", None, 404, "ghost"),
]


@pytest.mark.parametrize("method, path, body, status, message", ERRORS,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in ERRORS])
def test_error_paths(server, method, path, body, status, message):
    if method == "GET":
        r = get(server, path)
    elif isinstance(body, str):
        r = post(server, path, data=body)
    else:
        if body and body.get("instances") == [{"b64": "OVER_LIMIT"}]:
            body = {"instances": [{"b64": _over_limit_png()}]}
        r = post(server, path, body)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    error = r.json()["error"]
    assert re.search(message, error), error


def test_body_over_the_limit_is_413(server):
    r = post(server, "/v1/models/two:predict", data=b" " * (MAX_BYTES + 1))
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    # A small gzip body that inflates past the limit is refused too.
    bomb = gzip.compress(b" " * (MAX_BYTES * 3))
    assert len(bomb) < MAX_BYTES // 10
    r = post(server, "/v1/models/two:predict", data=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "Decompressed" in r.json()["error"]
    r = post(server, "/v1/models/two:predict", data=b"\x1f\x8bnot gzip", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["error"]
    # The server is still fine afterwards.
    assert post(server, "/v1/models/two:predict", GOOD_TWO).status_code == 200


def test_batched_predict_leaves_no_reference_cycles(server):
    # Whatever a request leaves in a reference cycle waits for the garbage collector, with
    # its inputs (docs/benchmarks.md, eighth pass). Client and server share this process.
    body = {"inputs": {"x": X, "tag": ["a", "b"]}}
    for _ in range(3):  # one-off objects of the first calls
        assert post(server, "/v1/models/two:predict", body).status_code == 200
    gc.collect()
    gc.disable()
    try:
        for i in range(20):
            assert post(server, "/v1/models/two:predict", {"inputs": {"x": [[i, 1.0, 2.0]], "tag": ["a"]}}
                        ).status_code == 200
        left_in_cycles = gc.collect()
    finally:
        gc.enable()
    assert left_in_cycles == 0
