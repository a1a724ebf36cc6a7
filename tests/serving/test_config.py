"""Model config: TF Serving's models.config text proto into ModelConfig dataclasses."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.config import (
    ModelConfig,
    VersionPolicy,
    model_configs_from_proto,
    parse_model_config,
    read_model_config_file,
    single_model_config,
)

FULL_CONFIG = """
model_config_list {
  config {
    name: "resnet"
    base_path: "/models/resnet"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
  }
  config {
    name: "every"
    base_path: "/models/every"
    model_version_policy { all {} }
  }
  config {
    name: "pinned"
    base_path: "/models/pinned"
    model_version_policy { specific { versions: 4 versions: 2 } }
    version_labels { key: "stable" value: 2 }
    version_labels { key: "canary" value: 4 }
  }
  config {
    name: "plain"
    base_path: "relative/plain"
  }
}
"""


def test_parse_all_three_policies_and_labels():
    configs = parse_model_config(FULL_CONFIG)
    assert [c.name for c in configs] == ["resnet", "every", "pinned", "plain"]
    resnet, every, pinned, plain = configs
    assert resnet.base_path == "/models/resnet"
    assert resnet.policy == VersionPolicy(kind="latest", num_versions=2)
    assert every.policy.kind == "all"
    assert pinned.policy == VersionPolicy(kind="specific", versions=(2, 4))
    assert dict(pinned.labels) == {"stable": 2, "canary": 4}
    assert plain.policy == VersionPolicy() and plain.policy.num_versions == 1
    assert dict(plain.labels) == {}
    assert plain.base_path == "relative/plain"


def test_latest_without_num_versions_means_one():
    configs = parse_model_config(
        'model_config_list { config { name: "m" base_path: "/m" model_version_policy { latest {} } } }')
    assert configs[0].policy == VersionPolicy(kind="latest", num_versions=1)


def test_empty_list_is_no_models():
    assert parse_model_config("") == []
    assert parse_model_config("model_config_list {}") == []


@pytest.mark.parametrize("text, fragment", [
    ('model_config_list { config { name: "m" base_path: "/m" } ', "not a ModelServerConfig text proto"),
    ('model_config_list { config { nmae: "m" } }', "nmae"),
    ('model_config_list { config { base_path: "/m" } }', "name is empty"),
    ('model_config_list { config { name: "m" } }', "base_path is empty"),
    ('model_config_list { config { name: "m" base_path: "/a" } config { name: "m" base_path: "/b" } }',
     "more than once"),
    ('model_config_list { config { name: "m" base_path: "/m" model_platform: "pytorch" } }', "pytorch"),
    ('model_config_list { config { name: "m" base_path: "/m" model_version_policy { specific {} } } }',
     "at least one version"),
    ('model_config_list { config { name: "m" base_path: "/m" version_labels { key: "" value: 1 } } }',
     "empty version label"),
    ('model_config_list { config { name: "m" base_path: "/m" version_labels { key: "x" value: -1 } } }',
     "negative"),
    ('custom_model_config { }', "custom_model_config"),
])
def test_bad_text_raises_value_error_naming_problem(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_model_config(text)


def test_errors_name_the_model():
    text = ('model_config_list { config { name: "good" base_path: "/g" } '
            'config { name: "bad" base_path: "/b" model_platform: "onnx" } }')
    with pytest.raises(ValueError, match=r"#2 \('bad'\)"):
        parse_model_config(text)


def test_read_file(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(FULL_CONFIG)
    assert [c.name for c in read_model_config_file(path)] == ["resnet", "every", "pinned", "plain"]
    path.write_text("model_config_list { config { name: ")
    with pytest.raises(ValueError, match="models.config"):
        read_model_config_file(path)
    with pytest.raises(ValueError, match="cannot read"):
        read_model_config_file(tmp_path / "missing.config")


def test_from_proto_matches_text():
    message = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(FULL_CONFIG, message)
    assert model_configs_from_proto(message) == parse_model_config(FULL_CONFIG)


def test_single_model_config(tmp_path):
    config = single_model_config("cnn", tmp_path)
    assert config == ModelConfig(name="cnn", base_path=str(tmp_path))
    assert config.policy == VersionPolicy(kind="latest", num_versions=1)


def test_dataclasses_validate_and_stay_frozen():
    with pytest.raises(ValueError):
        VersionPolicy(kind="newest")
    with pytest.raises(ValueError):
        VersionPolicy(kind="latest", num_versions=0)
    with pytest.raises(ValueError):
        ModelConfig(name="", base_path="/x")
    labels = {"stable": 1}
    config = ModelConfig(name="m", base_path="/m", labels=labels)
    labels["stable"] = 9
    assert config.labels["stable"] == 1
    with pytest.raises(TypeError):
        config.labels["stable"] = 2  # type: ignore[index]
