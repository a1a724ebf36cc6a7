"""graft.contract: the repository layout, labels.json, the lineage schema and the
signature reader, against real SavedModels and real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from graft import contract
from tests import models


def test_importing_the_contract_does_not_import_tensorflow():
    code = ("import sys; from graft import contract; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_paths_follow_tf_servings_layout(tmp_path):
    version = tmp_path / "m" / "3"
    assert contract.class_names_path(version) == version / "assets" / "labels.txt"
    assert contract.lineage_path(version) == version / "assets.extra" / "graft.json"
    assert contract.warmup_path(version) == version / "assets.extra" / "tf_serving_warmup_requests"
    assert contract.labels_path(tmp_path / "m") == tmp_path / "m" / "labels.json"
    assert contract.history_path(tmp_path / "m") == tmp_path / "m" / "labels.history.jsonl"
    assert contract.is_version_name("007") and not contract.is_version_name("v1")
    assert not contract.is_version_name("١")  # a non-ASCII digit is not a version
    assert contract.is_hidden(contract.TEMP_PREFIX + "x") and contract.is_hidden(contract.PUBLISH_LOCK_FILE)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[1]", "expected a JSON object"),
    ('{"": 1}', "non-empty strings"),
    ('{"stable": -1}', "must map to a version number"),
    ('{"stable": true}', "must map to a version number"),
    ('{"stable": "3"}', "must map to a version number"),
])
def test_bad_labels_are_refused_naming_the_source(text, message):
    with pytest.raises(ValueError, match=message) as info:
        contract.parse_labels(text, "m/labels.json")
    assert str(info.value).startswith("m/labels.json: ")


def test_labels_round_trip_and_absent_file(tmp_path):
    assert contract.read_labels(tmp_path) is None
    contract.labels_path(tmp_path).write_text('{"stable": 3, "canary": 4}')
    assert contract.read_labels(tmp_path) == {"stable": 3, "canary": 4}
    contract.labels_path(tmp_path).write_text('{"stable": 3.5}')
    with pytest.raises(ValueError, match="labels.json: label 'stable'"):
        contract.read_labels(tmp_path)


def test_lineage_schema_checks_known_keys_and_keeps_unknown_ones(tmp_path):
    record = contract.new_lineage(model_name="m", class_names=["a", "b"], image_size=[32, 32], future={"x": 1})
    assert record["schema_version"] == contract.LINEAGE_SCHEMA_VERSION and record["future"] == {"x": 1}
    version = tmp_path / "1"
    contract.lineage_path(version).parent.mkdir(parents=True)
    contract.lineage_path(version).write_text(json.dumps(record))
    assert contract.read_lineage(version) == record
    for bad, key in (({"image_size": [32]}, "image_size"), ({"class_names": "ab"}, "class_names"),
                     ({"schema_version": 0}, "schema_version"), ({"metrics": []}, "metrics")):
        contract.lineage_path(version).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"graft.json: '{key}' must be"):
            contract.read_lineage(version)
    contract.lineage_path(version).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        contract.read_lineage(version)
    # A legacy export (no schema_version) is read as version 0.
    contract.lineage_path(version).write_text('{"base": "vgg16"}')
    assert contract.lineage_schema_version(contract.read_lineage(version)) == contract.LEGACY_SCHEMA_VERSION
    assert contract.read_lineage(tmp_path / "2") is None


def test_the_decision_carries_autos_evidence():
    auto = {"chosen_by": "auto", "scenario": 3, "cut_layer": "block4_pool", "images_per_class": 10,
            "small_threshold": 100, "probe_accuracy": {"block4_pool": 0.95, "block5_pool": 0.9}}
    assert contract.new_lineage(decision=auto)["decision"] == auto
    assert contract.new_lineage(decision={"chosen_by": "user", "scenario": 1})
    for bad in ({**auto, "probe_accuracy": {}}, {**auto, "probe_accuracy": {"block4_pool": 95}},
                {**auto, "probe_accuracy": {"block4_pool": True}}, {**auto, "small_threshold": 0},
                {k: v for k, v in auto.items() if k != "images_per_class"}, {**auto, "chosen_by": "someone"},
                ["auto"]):
        with pytest.raises(ValueError, match="'decision' must be an object"):
            contract.new_lineage(decision=bad)


def test_training_summary():
    summary = contract.training_summary({"base": "vgg16", "scenario": {"name": "feature-extraction"},
                                         "metrics": {"accuracy": 0.7, "val_accuracy": 0.9}})
    assert summary == {"base": "vgg16", "scenario": "feature-extraction", "accuracy": 0.9, "created_at": None}
    assert contract.training_summary({"metrics": {"val_accuracy": True}})["accuracy"] is None


def test_class_names_come_from_labels_txt_then_lineage(tmp_path):
    version = tmp_path / "1"
    with pytest.raises(ValueError, match="no assets/labels.txt"):
        contract.read_class_names(version)
    contract.lineage_path(version).parent.mkdir(parents=True)
    contract.lineage_path(version).write_text('{"class_names": ["x", "y"]}')
    assert contract.read_class_names(version) == ["x", "y"]
    contract.class_names_path(version).parent.mkdir(parents=True)
    contract.class_names_path(version).write_text("cat\ndog\n")
    assert contract.read_class_names(version) == ["cat", "dog"]


def test_signatures_read_without_tensorflow_equal_tensorflows_own(tmp_path, two_input_savedmodel):
    path = models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    ours = contract.read_signature_defs(path)
    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    theirs = {k: v for k, v in saved.meta_graphs[0].signature_def.items() if not k.startswith("__")}
    assert sorted(ours) == sorted(theirs) and "serving_default" in ours
    for name, sig in ours.items():
        assert meta_graph_pb2.SignatureDef.FromString(sig.SerializeToString()) == theirs[name]


def test_set_method_names_rewrites_in_place_and_refuses_unknowns(tmp_path, two_input_savedmodel):
    path = models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    name = next(iter(contract.read_signature_defs(path)))
    contract.set_method_names(path, {name: contract.REGRESS_METHOD})
    assert contract.read_signature_defs(path)[name].method_name == contract.REGRESS_METHOD
    with pytest.raises(KeyError, match="no signature 'nope'"):
        contract.set_method_names(path, {"nope": contract.PREDICT_METHOD})
    with pytest.raises(ValueError, match="unknown method name"):
        contract.set_method_names(path, {name: "tensorflow/serving/other"})


def test_unreadable_saved_models_are_named(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        contract.read_signature_defs(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="is not a valid SavedModel"):
        contract.read_signature_defs(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ValueError, match="no meta graph tagged 'serve'"):
        contract.read_signature_defs(tmp_path)


@pytest.mark.parametrize("change", [
    {"fingerprint": "A" * 64},              # not lowercase hex
    {"fingerprint": "a" * 63},
    {"input_shape": [64, 64]},
    {"input_shape": [64, 64, 0]},
    {"base": ""},
    {"extra": 1},
    {"segments": []},
    # The last segment must be the trunk itself.
    {"segments": [{"cut_layer": "block3_pool", "fingerprint": "1" * 64}]},
    {"segments": [{"cut_layer": "block3_pool", "fingerprint": "0123456789abcdef" * 4}]},
    {"segments": [{"cut_layer": "block4_pool", "fingerprint": "0123456789abcdef" * 4, "extra": 1}]},
    {"segments": [{"cut_layer": "block3_pool", "fingerprint": "0123456789abcdef" * 4},
                  {"cut_layer": "block4_pool", "fingerprint": "0123456789abcdef" * 4}]},   # twice
    {"segments": [{"cut_layer": "block3_pool", "fingerprint": "x" * 64},
                  {"cut_layer": "block4_pool", "fingerprint": "0123456789abcdef" * 4}]},
])
def test_a_bad_trunk_declaration_is_refused(change):
    good = {"fingerprint": "0123456789abcdef" * 4, "base": "vgg16", "cut_layer": "block4_pool",
            "input_shape": [64, 64, 3]}
    assert contract.trunk_of(contract.new_lineage(trunk=good)) == good
    segmented = {**good, "segments": [{"cut_layer": "block3_pool", "fingerprint": "1" * 64},
                                      {"cut_layer": "block4_pool", "fingerprint": good["fingerprint"]}]}
    assert contract.trunk_of(contract.new_lineage(trunk=segmented)) == segmented
    with pytest.raises(ValueError, match="'trunk' must be a trunk declaration"):
        contract.new_lineage(trunk={**good, **change})


def test_a_version_without_a_trunk_declares_none():
    assert contract.trunk_of(None) is None and contract.trunk_of({"base": "vgg16"}) is None
    assert contract.short_fingerprint("0123456789abcdef" * 4) == "0123456789ab"
