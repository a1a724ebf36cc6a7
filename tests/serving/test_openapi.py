"""The OpenAPI document (``serving/openapi.json``) checked against a real graft-serve with schemathesis.

Every documented operation is fed requests generated from the document; no
answer may be a 5xx, and each status, content type and body must be the
documented one. The document's path parameters are narrowed to the names the
test server knows (plus unknown ones), so generated requests reach real models
instead of stopping at "model not found". Loads and unloads name only the model
"spare" (and an unknown one), so that the other operations keep their models.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, note, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests import models
from tests.models import write_model_config
from tests.serving.server import serving

EXAMPLES = 6  # per operation; about 35 operations
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
# Path parameter values: served names, versions and labels, and ones that do not exist.
PATH_VALUES = {
    "model_name": ["cnn", "two", "nope"],
    "version": ["1", "2", "9"],
    "model_version": ["1", "2", "stable", "9"],
    "label": ["stable", "nope"],
}
# The model name of the load and unload operations: one nothing else uses, and an unknown one.
REPOSITORY_MODELS = ["spare", "nope"]
LINEAGE = {"base": "mobilenet_v2", "scenario": {"scenario": 1, "name": "feature-extraction"},
           "metrics": {"val_accuracy": 0.75}, "created_at": "2026-11-01T00:00:00+00:00"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_cnn_savedmodel, two_input_savedmodel):
    root = tmp_path_factory.mktemp("openapi_repo")
    models.install_version(tiny_cnn_savedmodel, root / "cnn", 1)
    models.install_version(two_input_savedmodel, root / "two", 1)
    models.install_version(two_input_savedmodel, root / "spare", 1)
    src = root / "src"
    shutil.copytree(two_input_savedmodel, src)
    (src / "assets.extra").mkdir(exist_ok=True)
    (src / "assets.extra" / "graft.json").write_text(json.dumps(LINEAGE))
    models.install_version(src, root / "two", 2)
    config = write_model_config(
        root / "models.config", {"cnn": root / "cnn", "two": root / "two", "spare": root / "spare"},
        {"two": 'model_version_policy { all {} } version_labels { key: "stable" value: 2 }'})
    with serving(model_config_file=str(config), enable_batching=True, max_request_bytes=200_000) as (graft, client):
        # Ready means one version per model; the label "stable" needs version 2.
        for name, version in (("cnn", 1), ("two", 1), ("two", 2), ("spare", 1)):
            graft.manager.wait_until_available(name, version, timeout=60)
        yield client


@pytest.fixture(scope="module")
def document(server) -> dict:
    r = server.http.get(server.rest + "/openapi.json", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    return r.json()


def test_served_document_is_the_packaged_file(document):
    packaged = json.loads(resources.files("serving").joinpath("openapi.json").read_text())
    assert document == packaged
    assert document["openapi"].startswith("3.")


def test_document_is_valid_openapi(document):
    schemathesis.openapi.from_dict(document).validate()


def test_document_covers_every_route(server, document):
    # Every documented path answers something other than the catch-all "Malformed request".
    expected = {"/healthz", "/readyz", "/metrics", "/monitoring/prometheus/metrics", "/openapi.json",
                "/v1/models", "/v2", "/v2/", "/v2/health/live", "/v2/health/ready"}
    assert expected <= set(document["paths"])
    for verb in ("predict", "classify", "regress"):
        for prefix in ("/v1/models/{model_name}", "/v1/models/{model_name}/versions/{version}",
                       "/v1/models/{model_name}/labels/{label}"):
            assert f"{prefix}:{verb}" in document["paths"]
    for suffix in ("", "/ready", "/infer", "/stats", "/config"):
        assert "/v2/models/{model_name}" + suffix in document["paths"]
        assert "/v2/models/{model_name}/versions/{model_version}" + suffix in document["paths"]
    assert {"/v2/models/stats", "/v2/repository/index", "/v2/repository/models/{model_name}/load",
            "/v2/repository/models/{model_name}/unload"} <= set(document["paths"])


@pytest.fixture(scope="module")
def api_schema(document, server):
    narrowed = json.loads(json.dumps(document))
    for path, item in narrowed["paths"].items():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in PATH_VALUES:
                    values = (REPOSITORY_MODELS if path.startswith("/v2/repository/models/")
                              else PATH_VALUES[parameter["name"]])
                    parameter["schema"] = {"type": "string", "enum": values}
    schema = schemathesis.openapi.from_dict(narrowed)
    schema.config.update(base_url=server.rest)
    return schema


# Requests that succeed, so that 200 answers are checked too (random bodies rarely fit a model).
V1_SELECTORS = {"": {}, "/versions/{version}": {"version": "2"}, "/labels/{label}": {"label": "stable"}}
V1_BODIES = {
    "predict": [{"instances": [{"x": [1.0, 2.0, 3.0], "tag": "ab"}]},
                {"signature_name": "checked", "inputs": {"x": [[1.0, 4.0, 9.0]]}}],
    "classify": [{"signature_name": "classify", "examples": [{"x": [1.0, 2.0, 3.0]}, {"x": [0.0, 0.5, 1.0]}]}],
    "regress": [{"signature_name": "regress", "context": {"x": [1.0, 2.0, 3.0]}, "examples": [{}]}],
}
V2_BODY = {"id": "doc", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                                   {"name": "tag", "datatype": "BYTES", "shape": [1], "data": ["ab"]}],
           "outputs": [{"name": "y"}, {"name": "label_bytes", "parameters": {"binary_data": False}}]}


def _valid_cases(api_schema):
    for suffix, params in V1_SELECTORS.items():
        for verb, bodies in V1_BODIES.items():
            operation = api_schema["/v1/models/{model_name}" + suffix + ":" + verb]["POST"]
            for body in bodies:
                yield operation.Case(path_parameters={"model_name": "two", **params}, body=body,
                                     media_type="application/json")
    for suffix, params in (("", {}), ("/versions/{model_version}", {"model_version": "2"})):
        operation = api_schema["/v2/models/{model_name}" + suffix + "/infer"]["POST"]
        path = {"model_name": "two", **params}
        yield operation.Case(path_parameters=path, body=V2_BODY, media_type="application/json")
        # The binary tensor data extension, both ways.
        header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                         "parameters": {"binary_data_size": 12}}, V2_BODY["inputs"][1]],
                             "parameters": {"binary_data_output": True}}).encode()
        yield operation.Case(path_parameters=path, media_type="application/octet-stream",
                             body=header + np.array([1, 2, 3], "<f4").tobytes(),
                             headers={"Inference-Header-Content-Length": str(len(header))})
    # Triton's extensions: statistics, configuration, the repository index, unload then load.
    yield api_schema["/v2/models/stats"]["GET"].Case()
    for suffix, params in (("", {}), ("/versions/{model_version}", {"model_version": "stable"})):
        for what in ("stats", "config"):
            operation = api_schema["/v2/models/{model_name}" + suffix + "/" + what]["GET"]
            yield operation.Case(path_parameters={"model_name": "two", **params})
    yield api_schema["/v2/repository/index"]["POST"].Case(body={"ready": True}, media_type="application/json")
    for action, body in (("unload", {"parameters": {"unload_dependents": False}}), ("load", {})):
        operation = api_schema["/v2/repository/models/{model_name}/" + action]["POST"]
        yield operation.Case(path_parameters={"model_name": "spare"}, body=body, media_type="application/json")


def test_successful_requests_conform(api_schema, server):
    for case in _valid_cases(api_schema):
        response = case.call_and_validate(base_url=server.rest, session=server.http, checks=CHECKS)
        assert response.status_code == 200, (case.operation.label, response.text)


def test_api_conforms_to_document(api_schema, server):
    # One hypothesis run per operation (schemathesis' pytest plugin does not support pytest 9 yet).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 30
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            note(f"{operation.label}: {case.as_curl_command()}")
            case.call_and_validate(base_url=server.rest, session=server.http, checks=CHECKS)

        run()
