"""Tests of protos/ and the generated serving.protos modules.

The committed modules must equal a fresh generation, the messages must keep
TF Serving's field names, types and numbers, and TF Serving-style text files
must parse.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import text_format

import google.protobuf
from serving.protos import generate
from serving.protos.graft import batching_pb2, ssl_config_pb2

FD = pb_descriptor.FieldDescriptor


def _generated_tree(root: Path) -> dict[str, bytes]:
    """Generated modules and sub-package __init__ files under root, by relative path."""
    files = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or not path.is_file():
            continue
        if path.name.endswith(generate.GENERATED_SUFFIXES) or (path.name == "__init__.py" and len(rel.parts) > 1):
            files[rel.as_posix()] = path.read_bytes()
    return files


def test_committed_modules_match_a_fresh_generation(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "nothing generated"
    fresh = _generated_tree(tmp_path)
    committed = _generated_tree(generate.OUT_DIR)
    assert sorted(fresh) == sorted(committed), "run `make protos`: the set of generated files changed"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run `make protos`: stale generated files {stale}"


def test_a_changed_proto_without_regenerated_stubs_is_caught(tmp_path):
    """The check above must fail when a .proto gains a field and nobody runs `make protos`."""
    root = tmp_path / "protos"
    shutil.copytree(generate.PROTO_ROOT, root)
    batching = root / "graft" / "batching.proto"
    text = batching.read_text()
    last = text.rstrip().rindex("}")
    batching.write_text(text[:last] + "  int64 graft_test_only_field = 999;\n}\n")
    out = tmp_path / "out"
    out.mkdir()
    generate.generate(out, root)
    fresh, committed = _generated_tree(out), _generated_tree(generate.OUT_DIR)
    assert sorted(fresh) == sorted(committed)
    assert sorted(name for name in fresh if fresh[name] != committed[name]) == ["graft/batching_pb2.py",
                                                                         "graft/batching_pb2.pyi"]


def test_every_proto_under_protos_is_generated():
    for rel in generate.proto_files():
        stem = rel.with_suffix("").as_posix()
        assert (generate.OUT_DIR / f"{stem}_pb2.py").is_file(), rel
        module = importlib.import_module("serving.protos." + stem.replace("/", ".") + "_pb2")
        assert module.DESCRIPTOR.name == rel.as_posix()


def test_generator_rewrites_imports_and_emits_services_only_where_declared(tmp_path, monkeypatch):
    root = tmp_path / "protos"
    (root / "gentest").mkdir(parents=True)
    (root / "gentest" / "base.proto").write_text(
        'syntax = "proto3";\npackage graft.gentest;\nmessage Ping { int64 n = 1; }\n'
    )
    (root / "gentest" / "svc.proto").write_text(
        'syntax = "proto3";\npackage graft.gentest;\nimport "gentest/base.proto";\n'
        "message Pong { Ping ping = 1; }\nservice Echo { rpc Call(Ping) returns (Pong); }\n"
    )
    out = tmp_path / "site" / "gentestpkg"
    out.mkdir(parents=True)
    (out / "__init__.py").write_text("")
    written = generate.generate(out, root, package="gentestpkg")
    names = sorted(p.relative_to(out).as_posix() for p in written)
    assert names == ["gentest/__init__.py", "gentest/base_pb2.py", "gentest/base_pb2.pyi",
                     "gentest/svc_pb2.py", "gentest/svc_pb2.pyi", "gentest/svc_pb2_grpc.py"]
    text = (out / "gentest" / "svc_pb2_grpc.py").read_text()
    assert "from gentestpkg.gentest import base_pb2" in text
    assert not re.search(r"^from gentest ", text, re.M)

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    svc_grpc = importlib.import_module("gentestpkg.gentest.svc_pb2_grpc")
    svc = importlib.import_module("gentestpkg.gentest.svc_pb2")
    assert hasattr(svc_grpc, "EchoStub") and hasattr(svc_grpc, "add_EchoServicer_to_server")
    assert type(svc.Pong()).__module__ == "gentestpkg.gentest.svc_pb2"
    assert svc.Pong(ping={"n": 3}).ping.n == 3
    for name in [m for m in sys.modules if m.startswith("gentestpkg")]:
        del sys.modules[name]


# TF Serving's BatchingParameters (session_bundle_config.proto) and SSLConfig (ssl_config.proto).
TF_SERVING_BATCHING = {
    "max_batch_size": (1, FD.TYPE_MESSAGE, "google.protobuf.Int64Value"),
    "batch_timeout_micros": (2, FD.TYPE_MESSAGE, "google.protobuf.Int64Value"),
    "max_enqueued_batches": (3, FD.TYPE_MESSAGE, "google.protobuf.Int64Value"),
    "num_batch_threads": (4, FD.TYPE_MESSAGE, "google.protobuf.Int64Value"),
    "thread_pool_name": (5, FD.TYPE_MESSAGE, "google.protobuf.StringValue"),
    "allowed_batch_sizes": (6, FD.TYPE_INT64, None),
    "pad_variable_length_inputs": (7, FD.TYPE_BOOL, None),
    "enable_large_batch_splitting": (8, FD.TYPE_MESSAGE, "google.protobuf.BoolValue"),
    "max_execution_batch_size": (9, FD.TYPE_MESSAGE, "google.protobuf.Int64Value"),
}
TF_SERVING_SSL = {
    "server_key": (1, FD.TYPE_STRING, None),
    "server_cert": (2, FD.TYPE_STRING, None),
    "custom_ca": (3, FD.TYPE_STRING, None),
    "client_verify": (4, FD.TYPE_BOOL, None),
}


@pytest.mark.parametrize("message, expected", [
    (batching_pb2.BatchingParameters, TF_SERVING_BATCHING),
    (ssl_config_pb2.SSLConfig, TF_SERVING_SSL),
])
def test_fields_match_tf_serving(message, expected):
    fields = {
        f.name: (f.number, f.type, f.message_type.full_name if f.message_type else None)
        for f in message.DESCRIPTOR.fields
    }
    assert fields == expected
    assert message.DESCRIPTOR.full_name.startswith("graft.config.")


def test_tf_serving_batching_text_file_parses(tmp_path):
    # A file as written for tensorflow_model_server --batching_parameters_file.
    text = """
        max_batch_size { value: 128 }
        batch_timeout_micros { value: 1000 }
        max_enqueued_batches { value: 1000000 }
        num_batch_threads { value: 8 }
        thread_pool_name { value: "model_server_batch_threads" }
        allowed_batch_sizes: 32
        allowed_batch_sizes: 64
        allowed_batch_sizes: 128
        enable_large_batch_splitting { value: true }
        max_execution_batch_size { value: 64 }
        pad_variable_length_inputs: true
    """
    msg = text_format.Parse(text, batching_pb2.BatchingParameters())
    assert msg.max_batch_size.value == 128 and msg.max_enqueued_batches.value == 1_000_000
    assert list(msg.allowed_batch_sizes) == [32, 64, 128]
    assert msg.enable_large_batch_splitting.value and msg.pad_variable_length_inputs
    assert msg.thread_pool_name.value == "model_server_batch_threads" and msg.batch_timeout_micros.value == 1000
    assert msg.max_execution_batch_size.value == 64 and msg.num_batch_threads.value == 8
    # Wire round trip keeps "unset" apart from "set to the default".
    again = batching_pb2.BatchingParameters.FromString(msg.SerializeToString())
    assert again == msg
    assert not batching_pb2.BatchingParameters().HasField("max_batch_size")


def test_tf_serving_ssl_text_file_parses():
    text = 'server_key: "KEY"\nserver_cert: "CERT"\ncustom_ca: "CA"\nclient_verify: true\n'
    msg = text_format.Parse(text, ssl_config_pb2.SSLConfig())
    assert (msg.server_key, msg.server_cert, msg.custom_ca, msg.client_verify) == ("KEY", "CERT", "CA", True)


def test_generated_code_accepts_the_installed_protobuf_runtime():
    header = (generate.OUT_DIR / "graft" / "batching_pb2.py").read_text()
    gencode = tuple(int(v) for v in re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", header).groups())
    runtime = tuple(int(v) for v in google.protobuf.__version__.split(".")[:3])
    # The protobuf runtime requires the same major version and a runtime no older than the gencode.
    assert gencode[0] == runtime[0] and gencode <= runtime, (gencode, runtime)
