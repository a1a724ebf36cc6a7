"""Lineage (``assets.extra/graft.json``) in every metadata answer of a real graft-serve.

Model ``two`` has three versions: 1 without a lineage file, 2 with one, 3 with
an unreadable one. Versions without a usable file must be served exactly as
before; version 2's record must appear unchanged in TF Serving metadata (REST
``graft`` key, gRPC ``graft`` Struct), in V2 metadata (REST ``parameters.graft``,
gRPC ``properties["graft"]``), and as a training summary in ``GET /v1/models``.
"""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from serving.protos.inference import grpc_service_pb2 as pb
from serving.protos.inference import grpc_service_pb2_grpc as pb_grpc
from graft.contract import training_summary
from tests import models
from tests.models import write_model_config
from tests.serving.server import serving

LINEAGE = {
    "base": "vgg16",
    "weights": {"source": "file", "path": "/weights/hed.h5"},
    "scenario": {"scenario": 3, "name": "early-features", "cut_layer": "block4_pool"},
    "metrics": {"val_accuracy": 0.928, "val_loss": 0.31, "train_images": 100},
    "dataset": {"fingerprint": "sha256:abc", "class_counts": {"0": 10, "1": 10}},
    "class_names": ["neg", "pos"],
    "created_at": "2026-11-02T10:00:00+00:00",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, two_input_savedmodel):
    root = tmp_path_factory.mktemp("lineage_repo")
    models.install_version(two_input_savedmodel, root / "two", 1)
    for version, text in ((2, json.dumps(LINEAGE)), (3, "{not json")):
        src = root / f"src{version}"
        shutil.copytree(two_input_savedmodel, src)
        (src / "assets.extra").mkdir(exist_ok=True)
        (src / "assets.extra" / "graft.json").write_text(text)
        models.install_version(src, root / "two", version)
    config = write_model_config(root / "models.config", {"two": root / "two"},
                                {"two": "model_version_policy { all {} }"})
    with serving(model_config_file=str(config)) as (graft, client):
        # Ready means one version per model; these tests need all three.
        for version in (1, 2, 3):
            graft.manager.wait_until_available("two", version, timeout=60)
        yield client


def _get(server, path):
    r = server.http.get(server.rest + path, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_tf_serving_rest_metadata(server):
    with_lineage = _get(server, "/v1/models/two/versions/2/metadata")
    assert with_lineage["metadata"]["graft"] == LINEAGE
    for version in (1, 3):
        plain = _get(server, f"/v1/models/two/versions/{version}/metadata")
        assert sorted(plain) == ["metadata", "model_spec"] and sorted(plain["metadata"]) == ["signature_def"]
        assert plain["metadata"]["signature_def"] == with_lineage["metadata"]["signature_def"]


def test_model_list_shows_training_summaries(server):
    (model,) = _get(server, "/v1/models")["models"]
    by_version = {s["version"]: s for s in model["model_version_status"]}
    assert sorted(by_version) == ["1", "2", "3"]
    assert by_version["2"]["graft"] == {"base": "vgg16", "scenario": "early-features", "accuracy": 0.928,
                                        "created_at": "2026-11-02T10:00:00+00:00"}
    assert "graft" not in by_version["1"] and "graft" not in by_version["3"]
    assert by_version["1"]["state"] == "AVAILABLE"


def test_v2_rest_metadata(server):
    assert _get(server, "/v2/models/two/versions/2")["parameters"] == {"graft": LINEAGE}
    for version in (1, 3):
        meta = _get(server, f"/v2/models/two/versions/{version}")
        assert "parameters" not in meta and meta["versions"] == ["1", "2", "3"]


def test_v2_grpc_metadata(server):
    stub = pb_grpc.GRPCInferenceServiceStub(server.channel)
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="two", version="2"), timeout=30)
    assert json.loads(meta.properties["graft"]) == LINEAGE
    assert dict(stub.ModelMetadata(pb.ModelMetadataRequest(name="two", version="1"), timeout=30).properties) == {}


def _tf_metadata(server, version, fields):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = "two"
    request.model_spec.version.value = version
    return server.predict.GetModelMetadata(request, timeout=30)


def test_tf_serving_grpc_metadata(server):
    response = _tf_metadata(server, 2, ["signature_def", "graft"])
    assert sorted(response.metadata) == ["graft", "signature_def"]
    lineage = struct_pb2.Struct()
    assert response.metadata["graft"].Unpack(lineage)
    assert json_format.MessageToDict(lineage) == LINEAGE
    # Asked only for signature_def, or for a version without lineage: TF Serving's answer.
    assert sorted(_tf_metadata(server, 2, ["signature_def"]).metadata) == ["signature_def"]
    assert sorted(_tf_metadata(server, 1, ["signature_def", "graft"]).metadata) == ["signature_def"]
    with pytest.raises(grpc.RpcError) as info:
        _tf_metadata(server, 2, ["nope"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("lineage, expected", [
    (LINEAGE, {"base": "vgg16", "scenario": "early-features", "accuracy": 0.928,
               "created_at": "2026-11-02T10:00:00+00:00"}),
    ({"base": "resnet50", "scenario": 2, "metrics": {"accuracy": 0.5}},
     {"base": "resnet50", "scenario": 2, "accuracy": 0.5, "created_at": None}),
    ({"metrics": {"val_accuracy": True}}, {"base": None, "scenario": None, "accuracy": None, "created_at": None}),
    ({"metrics": "oops", "scenario": {"scenario": 4}},
     {"base": None, "scenario": 4, "accuracy": None, "created_at": None}),
])
def test_training_summary(lineage, expected):
    assert training_summary(lineage) == expected
