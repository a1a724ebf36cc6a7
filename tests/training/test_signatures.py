"""training.signatures: the compatibility check of two versions, read from saved_model.pb without TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import keras
import pytest
import tensorflow as tf
from tensorboard.compat.proto import types_pb2

from graft import contract
from training import export, signatures

CLASSES = ["a", "b"]


def _model(size: int) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigs")
    return {name: export.export_version(_model(size), classes, root, name, image_size=size, lineage={})
            for name, size, classes in (("small", 16, CLASSES), ("same", 16, CLASSES),
                                        ("wide", 24, CLASSES), ("renamed", 16, ["x", "y"]))}


def test_dtype_names_are_tensorflows():
    for enum in types_pb2.DataType.values():
        if enum == types_pb2.DT_INVALID:
            continue
        assert signatures.dtype_name(enum) == tf.dtypes.as_dtype(enum).name, types_pb2.DataType.Name(enum)
    assert signatures.dtype_name(12345) == "dtype 12345"


def test_read_signatures_of_an_export(versions):
    found = signatures.read_signatures(versions["small"])
    assert set(found) == {"serving_default", "predict_images", "classify"}
    assert found["serving_default"]["method"] == contract.PREDICT_METHOD
    assert found["classify"]["method"] == contract.CLASSIFY_METHOD
    assert found["serving_default"]["inputs"] == {"images": ("float32", (None, 16, 16, 3))}
    assert found["serving_default"]["outputs"]["class_ids"] == ("int64", (None,))
    assert found["predict_images"]["inputs"] == {"image_bytes": ("string", (None,))}


def test_reading_signatures_never_imports_tensorflow(versions):
    code = ("import sys; from training import signatures; "
            f"assert signatures.read_signatures({versions['small']!r}); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_differences_name_what_existing_clients_would_lose(versions, tmp_path):
    assert signatures.signature_differences(versions["small"], versions["same"]) == []
    wide = signatures.signature_differences(versions["small"], versions["wide"])
    assert "signature 'serving_default': input 'images' shape [?,24,24,3] instead of [?,16,16,3]" in wide
    renamed = signatures.signature_differences(versions["small"], versions["renamed"])
    assert renamed == ["class list ['x', 'y'] instead of ['a', 'b']"]
    (tmp_path / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="saved_model.pb"):
        signatures.read_signatures(tmp_path)


def test_a_missing_signature_is_a_difference(versions, tmp_path):
    # The candidate keeps serving_default only: clients of the other two would break.
    saved = contract.read_saved_model(versions["small"])
    graph = saved.meta_graphs[0]
    for name in ("predict_images", "classify"):
        del graph.signature_def[name]
    (tmp_path / contract.SAVED_MODEL_FILE).write_bytes(saved.SerializeToString())
    contract.class_names_path(tmp_path).parent.mkdir()
    contract.class_names_path(tmp_path).write_text("a\nb\n")
    differences = signatures.signature_differences(versions["small"], tmp_path)
    assert sorted(differences) == ["signature 'classify' is missing", "signature 'predict_images' is missing"]
    # Extra signatures in the candidate are fine.
    assert signatures.signature_differences(tmp_path, versions["small"]) == []
