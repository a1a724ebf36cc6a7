"""Bad REST input against a real graft-serve: every case is a 4xx ``{"error"}``, never a 5xx.

One in-process server (uvicorn on 127.0.0.1) serves the tiny CNN and the
two-input model. Each bad request must get a 4xx JSON error whose message names
the problem, and a good request must still be answered correctly right after it.
Cases already covered by tests/serving/test_rest.py (both/neither of instances and
inputs, unknown model/label/signature/input, over-limit bodies, ...) are not
repeated here. Model names that are path tricks must never reach the file system.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from tests import models
from tests.models import write_model_config
from tests.serving.server import serving

MAX_BYTES = 1_000_000
MAX_PIXELS = 64 * 64
X = [[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]]
GOOD = {"inputs": {"x": X, "tag": ["a", "bc"]}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_cnn_savedmodel, two_input_savedmodel):
    """A repository with cnn/1 and two/1 served, and SavedModels at paths no config names."""
    root = tmp_path_factory.mktemp("rest_input_repo")
    models.install_version(tiny_cnn_savedmodel, root / "cnn", 1)
    models.install_version(two_input_savedmodel, root / "two", 1)
    # A real model directory the config does not name: a path trick that reached the
    # file system would find a loadable SavedModel here.
    models.install_version(two_input_savedmodel, root / "secret", 1)
    shutil.copytree(two_input_savedmodel, root / "two" / "1" / "nested")
    return root


@pytest.fixture(scope="module")
def server(repo):
    """(GraftServer, Client) of one in-process graft-serve for the module."""
    config = write_model_config(repo / "models.config", {"cnn": repo / "cnn", "two": repo / "two"})
    # No background polling: the file-system audit then sees only what requests do.
    with serving(model_config_file=str(config), max_request_bytes=MAX_BYTES, max_image_pixels=MAX_PIXELS,
                 file_system_poll_wait_seconds=0) as (graft, client):
        yield graft, client


@pytest.fixture
def client(server):
    """The Client of the module's server."""
    return server[1]


def _post(client, path: str, data: bytes, headers=None) -> requests.Response:
    return client.http.post(client.rest + path, data=data, headers=headers or {}, timeout=30)


def assert_still_serving(client) -> None:
    """A good request gets the right answer: the server survived what came before."""
    r = _post(client, "/v1/models/two:predict", json.dumps(GOOD).encode())
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"]["y"], models.two_input_expected(X), atol=1e-5)


def assert_json_error(r: requests.Response, status: int, message: str) -> None:
    """``r`` is ``status`` with a JSON ``{"error"}`` matching the regex ``message``."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert isinstance(error, str) and re.search(message, error), error


# ---------------------------------------------------------------------- payloads


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _encoded(fmt: str, size=(32, 32), mode="RGB") -> bytes:
    pixels = np.random.default_rng(4).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode) if mode != "RGB" else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png() -> bytes:
    # 5000x5000 of one grey level: 25 MB of pixels in a few KB of PNG.
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    return buf.getvalue()


def _images(*items) -> bytes:
    return json.dumps({"instances": [{"b64": item} for item in items]}).encode()


def _nested_text(depth: int, leaf: str, key: str = "tag") -> bytes:
    # Built as text: json.dumps would hit Python's recursion limit first.
    other = '"x": [[1, 2, 3]]' if key == "tag" else '"tag": ["a"]'
    return ('{"inputs": {"%s": %s%s%s, %s}}' % (key, "[" * depth, leaf, "]" * depth, other)).encode()


JPEG = _encoded("JPEG")
PNG = _encoded("PNG")

# (id, path, body bytes, extra headers, status, regex the error must match)
CASES = [
    # Malformed JSON bodies.
    ("truncated json", "/v1/models/two:predict", json.dumps(GOOD).encode()[:25], {}, 400, "JSON Parse error"),
    ("not utf-8", "/v1/models/two:predict", b"\xff\xfe\x00{", {}, 400, "JSON Parse error"),
    ("whitespace only", "/v1/models/two:predict", b"  \n ", {}, 400, "JSON Parse error"),
    ("json null", "/v1/models/two:predict", b"null", {}, 400, "not an object"),
    ("json string", "/v1/models/two:predict", b'"instances"', {}, 400, "not an object"),
    ("bare nan token", "/v1/models/two:predict", b'{"inputs": {"x": [[nan, 1, 2]], "tag": ["a"]}}', {}, 400,
     "JSON Parse error"),
    ("100k nested lists", "/v1/models/two:predict", b"[" * 100_000 + b"]" * 100_000, {}, 400, "JSON Parse error"),
    ("100k nested in inputs", "/v1/models/two:predict", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     {}, 400, "JSON Parse error"),
    ("900 nested strings", "/v1/models/two:predict", _nested_text(900, '"a"'), {}, 400, "nested more than 32 deep"),
    ("900 nested b64", "/v1/models/two:predict", _nested_text(900, '{"b64": "YQ=="}'), {}, 400,
     "nested more than 32 deep"),
    ("900 nested numbers", "/v1/models/two:predict", _nested_text(900, "1", key="x"), {}, 400,
     "input 'x'.*nested more than 32 deep"),
    ("nested examples", "/v1/models/two:regress",
     b'{"signature_name": "regress", "examples": [{"x": [' + b"[" * 1015 + b"1" + b"]" * 1015 + b"]}]}", {}, 400,
     "Feature: x has element with unexpected JSON type"),
    ("deflate encoding", "/v1/models/two:predict", json.dumps(GOOD).encode(), {"Content-Encoding": "deflate"}, 400,
     "Unsupported Content-Encoding: deflate"),
    ("form body", "/v1/models/two:predict", b"instances=1&inputs=2",
     {"Content-Type": "application/x-www-form-urlencoded"}, 400, "JSON Parse error"),
    # Layout: instances and inputs.
    ("instances not a list", "/v1/models/two:predict", b'{"instances": {"x": [1, 2, 3], "tag": "a"}}', {}, 400,
     "Expecting 'instances' to be an list"),
    ("instances mix objects and lists", "/v1/models/two:predict",
     b'{"instances": [{"x": [1, 2, 3], "tag": "a"}, [1, 2, 3]]}', {}, 400, "Expecting object but got list at item 1"),
    ("plain instances for two inputs", "/v1/models/two:predict", b'{"instances": [[1, 2, 3]]}', {}, 400,
     "expecting list of objects as multiple input tensors required: tag, x"),
    ("plain inputs for two inputs", "/v1/models/two:predict", b'{"inputs": [[1, 2, 3]]}', {}, 400,
     "expecting an object as multiple input tensors required"),
    ("unknown columnar input", "/v1/models/two:predict",
     b'{"inputs": {"x": [[1, 2, 3]], "tag": ["a"], "zzz": [1]}}', {}, 400, "unknown input 'zzz'"),
    ("output_filter not a list", "/v1/models/two:predict",
     b'{"inputs": {"x": [[1, 2, 3]], "tag": ["a"]}, "output_filter": "y"}', {}, 400, "'output_filter' must be a list"),
    # Ragged lists and wrong element types.
    ("ragged columnar", "/v1/models/two:predict", b'{"inputs": {"x": [[1, 2, 3], [1, 2]], "tag": ["a", "b"]}}', {},
     400, "input 'x': lists have inconsistent sizes"),
    ("ragged deep", "/v1/models/cnn:predict", b'{"instances": [[[[0, 0, 0]]], [[[0, 0]]]]}', {}, 400,
     "input 'images': every instance must have the same shape"),
    ("ragged strings", "/v1/models/two:predict", b'{"inputs": {"x": [[1, 2, 3], [4, 5, 6]], "tag": ["a", ["b"]]}}',
     {}, 400, "input 'tag': lists have inconsistent sizes"),
    ("null for a number", "/v1/models/two:predict", b'{"inputs": {"x": [[1, 2, null]], "tag": ["a"]}}', {}, 400,
     "input 'x'.*not of expected type: float32"),
    ("object for a number", "/v1/models/two:predict", b'{"inputs": {"x": [[1, 2, {"v": 3}]], "tag": ["a"]}}', {},
     400, "input 'x'.*not of expected type: float32"),
    ("bools for numbers", "/v1/models/two:predict", b'{"inputs": {"x": [[true, false, true]], "tag": ["a"]}}', {},
     400, "input 'x': JSON values of type bool are not of expected type: float32"),
    ("string among numbers", "/v1/models/two:predict", b'{"inputs": {"x": [[1, 2, "3"]], "tag": ["a"]}}', {}, 400,
     "input 'x': JSON values of type string are not of expected type: float32"),
    ("null for a string", "/v1/models/two:predict", b'{"inputs": {"x": [[1, 2, 3]], "tag": [null]}}', {}, 400,
     "input 'tag'.*not of expected type: string"),
    ("b64 not a string", "/v1/models/two:predict", b'{"inputs": {"x": [[1, 2, 3]], "tag": [{"b64": 3}]}}', {}, 400,
     "input 'tag'.*not of expected type: string"),
    ("examples not objects", "/v1/models/two:regress", b'{"signature_name": "regress", "examples": [[1, 2, 3]]}',
     {}, 400, r"examples\[0\]: Example must be JSON object"),
    ("mixed feature kinds", "/v1/models/two:regress",
     b'{"signature_name": "regress", "examples": [{"x": [1, "a", 3]}]}', {}, 400,
     "Unexpected element type in feature: x"),
    # Too large for memory: bounded by the body limit, refused by shape, never allocated big.
    ("huge nested zeros", "/v1/models/cnn:predict",
     b'{"inputs": [' + b",".join([b"0"] * 490_000) + b"]}", {}, 400, r"input 'images' expects shape \[-1, 32, 32, 3\]"),
    # Versions, labels, signatures.
    ("fractional version", "/v1/models/two/versions/1.5:predict", json.dumps(GOOD).encode(), {}, 400,
     "non-negative integer, got '1.5'"),
    ("signed version", "/v1/models/two/versions/+1:predict", json.dumps(GOOD).encode(), {}, 400,
     r"non-negative integer, got '\+1'"),
    ("exponent version", "/v1/models/two/versions/1e3:predict", json.dumps(GOOD).encode(), {}, 400,
     "non-negative integer, got '1e3'"),
    ("non-ascii digits version", "/v1/models/two/versions/%D9%A1:predict", json.dumps(GOOD).encode(), {}, 400,
     "non-negative integer"),
    ("empty version", "/v1/models/two/versions/:predict", json.dumps(GOOD).encode(), {}, 400,
     "non-negative integer, got ''"),
    ("negative version predict", "/v1/models/two/versions/-2:predict", json.dumps(GOOD).encode(), {}, 400,
     "non-negative integer, got '-2'"),
    ("huge version", "/v1/models/two/versions/99999999999999999999999:predict", json.dumps(GOOD).encode(), {}, 404,
     r"Servable not found for request: Specific\(two, 99999999999999999999999\)"),
    ("dot-dot label", "/v1/models/two/labels/%2e%2e:predict", json.dumps(GOOD).encode(), {}, 400,
     r"Unrecognized servable version label: \.\."),
    ("unknown classify signature", "/v1/models/two:classify", b'{"signature_name": "nope", "examples": [{}]}', {},
     400, "No signature was found with the name: nope"),
    ("regress on a predict signature", "/v1/models/two/versions/1:regress",
     b'{"signature_name": "serving_default", "examples": [{"x": [1, 2, 3]}]}', {}, 400,
     "Expected regression signature method_name"),
    # Images.
    ("invalid base64 image", "/v1/models/cnn:predict", _images("@@@not base64@@@"), {}, 400, "Unable to base64 decode"),
    ("empty image bytes", "/v1/models/cnn:predict", _images(""), {}, 400, "input 'images' item 0: not a decodable image"),
    ("text is not an image", "/v1/models/cnn:predict", _images(_b64(b"hello, world")), {}, 400,
     "^input 'images' item 0: not a decodable image: unknown or unsupported image format$"),
    ("truncated jpeg", "/v1/models/cnn:predict", _images(_b64(JPEG[: len(JPEG) // 2])), {}, 400,
     "input 'images' item 0: corrupt or truncated image"),
    ("truncated png", "/v1/models/cnn:predict", _images(_b64(PNG[: len(PNG) // 2])), {}, 400,
     "input 'images' item 0: corrupt or truncated image"),
    ("png header only", "/v1/models/cnn:predict", _images(_b64(PNG[:40])), {}, 400, "input 'images' item 0"),
    ("second image bad", "/v1/models/cnn:predict", _images(_b64(PNG), _b64(JPEG[:100])), {}, 400,
     "input 'images' item 1"),
    ("decompression bomb", "/v1/models/cnn:predict", _images(_b64(_bomb_png())), {}, 400,
     "image of 5000x5000 = 25000000 pixels exceeds the limit of 4096"),
    # A string input the model might decode itself (tf.io.decode_image): the header is checked first.
    ("bomb in a string input", "/v1/models/two:predict",
     json.dumps({"inputs": {"x": X, "tag": [{"b64": _b64(_bomb_png())}, "b"]}}).encode(), {}, 400,
     "input 'tag' item 0: image of 5000x5000 = 25000000 pixels exceeds the limit of 4096"),
    ("plain strings as images", "/v1/models/cnn:predict", b'{"instances": ["not an image"]}', {}, 400,
     "input 'images' item 0: not a decodable image"),
    ("nested image strings", "/v1/models/cnn:predict", b'{"instances": [["a", "b"]]}', {}, 400,
     r"encoded images must be a list of \{\"b64\": ...\} values"),
]


@pytest.mark.parametrize("path, body, headers, status, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_a_4xx_json_error(client, path, body, headers, status, message):
    assert_json_error(_post(client, path, body, headers), status, message)
    assert_still_serving(client)


def _v2_body(x_shape, x_data) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": x_shape, "data": x_data},
                                  {"name": "tag", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}).encode()


@pytest.mark.parametrize("body, message", [
    pytest.param(_v2_body([10**12, 3], [1]), r"tensor 'x' has 1 elements but shape \[1000000000000, 3\] needs",
                 id="huge shape claim"),
    pytest.param(_v2_body([-1, 3], [1, 2, 3]), "tensor 'x': shape must be a list of non-negative integers",
                 id="negative dimension"),
    pytest.param(_v2_body([0, 2**62, 2**62], []), r"tensor 'x': shape \[0, \d+, \d+\] is too large",
                 id="huge zero-size shape claim"),
    pytest.param(_v2_body([1] * 40, [1]), "tensor 'x': rank 40 exceeds the limit of 32", id="rank too high"),
])
def test_v2_shape_claims_are_refused_before_allocation(client, body, message):
    # V2 JSON is the one REST form that states a shape: it is checked against the data
    # actually sent, so a claim costs nothing.
    assert_json_error(_post(client, "/v2/models/two/infer", body), 400, message)
    assert_still_serving(client)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/json; charset=latin-1"])
def test_any_content_type_is_read_as_json(client, content_type):
    # TF Serving's REST handler never looks at Content-Type (ProcessRequest takes the
    # method, path and body only); clients rely on that, so Graft reads any as JSON.
    headers = {"Content-Type": content_type} if content_type else {}
    session = requests.Session()   # without requests' own default headers
    try:
        request = requests.Request("POST", client.rest + "/v1/models/two:predict",
                                   data=json.dumps(GOOD).encode(), headers=headers).prepare()
        if content_type is None:
            request.headers.pop("Content-Type", None)
        r = session.send(request, timeout=30)
    finally:
        session.close()
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"]["y"], models.two_input_expected(X), atol=1e-5)


def test_image_at_the_pixel_limit_is_served(client):
    # The other side of the limit: 64x64 = MAX_PIXELS exactly is accepted and resized.
    r = _post(client, "/v1/models/cnn:predict", _images(_b64(_encoded("PNG", size=(64, 64)))))
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["predictions"]).shape == (1, 3)


# -------------------------------------------------------------------- path tricks

# Model names that resolve to real directories if joined to a path: "secret" and
# "two/1/nested" hold SavedModels; ".." and absolute paths climb out of the root.
# Literal "." and ".." segments are left out: HTTP clients resolve them before sending,
# so they reach other endpoints (e.g. /v2/models/.. is GET /v2); encoded, they are kept.
TRICK_NAMES = [
    "secret", "..:x", "%2e%2e", "%2E%2E", ".%2e", "%2e", "..%2fsecret", "%2e%2e%2fsecret", "two%2f1",
    "two%2f1%2fnested", "two%2f..%2fsecret", "two%00", "%00", "two%2500", "two%5c..%5csecret",
    "~", "%7e", "two%20", "%2Ftmp", "two%0a", "tw%C3%B8",
]


def _trick_urls(name: str) -> list[tuple[str, str]]:
    return [("POST", f"/v1/models/{name}:predict"), ("GET", f"/v1/models/{name}"),
            ("GET", f"/v1/models/{name}/metadata"), ("GET", f"/v1/models/{name}/versions/1"),
            ("POST", f"/v1/models/{name}/labels/x:predict"), ("GET", f"/v2/models/{name}"),
            ("POST", f"/v2/models/{name}/infer"), ("GET", f"/v2/models/{name}/ready")]


def test_path_trick_model_names_never_reach_the_file_system(server, repo, fs_audit):
    graft, client = server
    names_before = graft.manager.model_names()
    answers = []
    with fs_audit.watch(repo) as accessed:
        for name in TRICK_NAMES + [str(repo / "two").replace("/", "%2f"), str(repo / "secret")[1:]]:
            for method, path in _trick_urls(name):
                r = client.http.request(method, client.rest + path, data=json.dumps(GOOD).encode(), timeout=30)
                answers.append((method, path, r.status_code, r.text[:200]))
    assert accessed == [], f"requests touched the model repository: {accessed[:10]}"
    for method, path, status, text in answers:
        assert 400 <= status < 500, (method, path, status, text)
        if not path.endswith("/ready"):   # V2 readiness answers with an empty body by protocol
            assert "error" in json.loads(text), (method, path, text)
    assert graft.manager.model_names() == names_before == ["cnn", "two"]
    assert_still_serving(client)
    # The recorder is live: a repository poll is seen at once (so the empty list above means something).
    with fs_audit.watch(repo) as accessed:
        graft.manager.poll()
    assert any(event == "os.scandir" and path == str(repo / "two") for event, path in accessed), accessed
