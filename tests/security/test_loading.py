"""The server loads models as SavedModels only and never deserializes code from a request.

A static check of the serving package (no pickle-like module, no Keras, one model
loader: ``tf.saved_model.load``), the repository rule (a version needs
``saved_model.pb``; a ``.keras`` file or a pickle is never a version), and a live
check that a pickle sent as request bytes stays inert bytes.
"""

from __future__ import annotations

import ast
import base64
import os
import pickle
from pathlib import Path

import requests

import serving
from serving.repository import list_version_dirs
from tests.security.conftest import MODEL, running

SERVING_DIR = Path(serving.__file__).parent
# Modules that turn bytes into code or arbitrary objects.
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                  "yaml", "keras", "tf_keras", "h5py"}
# Every call named like a loader must be one of these (data only, no code).
# self._config.load: uvicorn's Config.load (TLS context, protocol class), no model or data.
# service.load_model and the manager's load are the V2 repository extension's "load this
# configured model": they schedule the manager's own lifecycle, which ends in tf.saved_model.load.
# Servable.load: the shared-trunk registry loading a whole version, a trunk or a head, each a
# SavedModel directory through tf.saved_model.load.
ALLOWED_LOADERS = {"tf.saved_model.load", "json.load", "json.loads", "orjson.loads", "self._config.load",
                   "service.load_model", "self._manager.load", "Servable.load"}
LOADER_NAMES = {"load", "loads", "load_model", "TFSMLayer", "load_weights", "from_config",
                "deserialize", "model_from_json"}


def _sources() -> list[Path]:
    # serving/protos holds generated message classes only.
    return [p for p in sorted(SERVING_DIR.rglob("*.py")) if "protos" not in p.relative_to(SERVING_DIR).parts]


def test_serving_imports_nothing_that_deserializes_code():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES or name.startswith("tensorflow.keras"):
                    found.append(f"{path.name}:{node.lineno} imports {name}")
    assert not found, found


def test_the_only_model_loader_is_tf_saved_model_load():
    loaders, dynamic = [], []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in LOADER_NAMES:
                loaders.append((path.name, ast.unparse(func)))
            elif isinstance(func, ast.Name) and func.id in ({"eval", "exec", "__import__"} | LOADER_NAMES):
                dynamic.append(f"{path.name}:{node.lineno} {func.id}")
    assert not dynamic, dynamic
    assert {call for _, call in loaders} <= ALLOWED_LOADERS, loaders
    assert [name for name, call in loaders if call == "tf.saved_model.load"] == ["servable.py"]


def test_a_version_without_saved_model_pb_is_never_loaded(tmp_path, two_input_savedmodel):
    base = tmp_path / "m"
    (base / "1").mkdir(parents=True)
    (base / "1" / "model.keras").write_bytes(b"PK\x03\x04 a Keras archive with a Lambda layer")
    (base / "1" / "saved_model.pkl").write_bytes(pickle.dumps({"x": 1}))
    (base / "2").mkdir()
    (base / "2" / "keras_metadata.pb").write_bytes(b"")
    os.symlink(two_input_savedmodel / "saved_model.pb", base / "2" / "saved_model.pbx")
    assert list_version_dirs(base) == {}


class _Marker:
    """Unpickling this would create a file: proof that nobody unpickled the request."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_in_a_request_stays_bytes(repo, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    encoded = base64.b64encode(payload).decode()
    body = {"instances": [{"x": [1.0, 2.0, 3.0], "tag": {"b64": encoded}}]}
    with running(repo) as srv:
        response = requests.post(f"http://127.0.0.1:{srv.rest_port}/v1/models/{MODEL}:predict",
                                 json=body, timeout=30)
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    # The model echoes the tag: the server handed the pickle to TensorFlow as opaque bytes.
    assert prediction["label_bytes"] == {"b64": encoded}
    assert prediction["tag_len"] == len(payload)
    assert not marker.exists()
