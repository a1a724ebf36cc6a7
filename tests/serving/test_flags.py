"""Every flag of TF Serving's tensorflow_model_server 2.x parses, in absl's forms; docs/flags.md lists each.

The flag list, with its source, is ``tests/serving/data/tf_serving_flags.json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import requests

from serving.runtime.compat import INERT_FLAGS, inert_message
from serving.runtime.main import build_parser, config_from_args, main
from serving.runtime.settings import ServerConfig
from tests import models
from tests.ports import free_port
from tests.serving.server import Subprocess

ROOT = Path(__file__).resolve().parents[2]
TF_SERVING_FLAGS = json.loads((Path(__file__).parent / "data" / "tf_serving_flags.json").read_text())
FLAGS = {flag["name"]: flag for flag in TF_SERVING_FLAGS["flags"]}
FIELDS = {f.name for f in dataclasses.fields(ServerConfig)} - {"inert_flags"}
BASE = ["--model_base_path", "/m"]

# A value of each type that every flag of that type takes; a few flags need their own.
SAMPLE = {"int32": "3", "int64": "3", "float": "0.5", "string": "x"}
OWN_SAMPLE = {"port": "8600", "rest_api_port": "8601", "grpc_channel_arguments": "grpc.max_connection_age_ms=1000",
              "saved_model_tags": "serve"}


def _parse(argv):
    return build_parser().parse_args([*BASE, *argv])


def test_the_flag_list_names_its_source_and_has_no_duplicates():
    source = TF_SERVING_FLAGS["source"]
    assert source["repository"] == "https://github.com/tensorflow/serving"
    assert source["file"] == "tensorflow_serving/model_servers/main.cc"
    names = [flag["name"] for flag in TF_SERVING_FLAGS["flags"]]
    assert len(names) == len(set(names)) >= 45
    assert {flag["type"] for flag in FLAGS.values()} <= {"bool", *SAMPLE}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_tf_serving_flag_is_implemented_or_accepted(name):
    kind = FLAGS[name]["type"]
    assert (name in FIELDS) + (name in INERT_FLAGS) + (name == "version") == 1, name
    if kind == "bool":
        forms = {(f"--{name}",): True, (f"--{name}=true",): True, (f"--{name}=false",): False,
                 (f"--{name}=1",): True, (f"--no{name}",): False}
    else:
        value = OWN_SAMPLE.get(name, SAMPLE[kind])
        forms = {(f"--{name}={value}",): value, (f"--{name}", value): value}
    for argv, expected in forms.items():
        args = _parse(list(argv))
        parsed = getattr(args, name)
        if name == "grpc_channel_arguments":
            assert parsed == (("grpc.max_connection_age_ms", 1000),)
        elif kind == "bool":
            assert parsed is expected, argv
        elif kind == "string":
            assert parsed == expected, argv
        else:   # Graft takes a few of TF Serving's integer flags as floats (poll intervals)
            assert float(parsed) == float(expected), argv
        if name == "version":
            continue
        config = config_from_args(args)
        if name in INERT_FLAGS:
            assert dict(config.inert_flags) == {name: parsed}, argv
        else:
            assert getattr(config, name) == parsed and config.inert_flags == ()


@pytest.mark.parametrize("argv, problem", [
    (["--model_base=x"], "unrecognized arguments: --model_base=x"),        # no abbreviations, as in TF Serving
    (["--rest_api_p", "9000"], "unrecognized arguments"),
    (["--noenable_batching=true"], "ignored explicit argument"),            # --noFLAG takes no value
    (["--noport"], "unrecognized arguments: --noport"),                     # only booleans have --no
    (["--num_load_threads=four"], "--num_load_threads: invalid int value"),  # accepted flags keep their types
    (["--enable_profiler=maybe"], "expected true or false"),
    (["--port=8500", "--rest_api_port=8500"], "--rest_api_port must differ from --port"),
])
def test_flags_tf_serving_would_refuse_are_refused(argv, problem, capsys):
    with pytest.raises(SystemExit) as info:
        main([*BASE, *argv])
    assert info.value.code == 2
    assert problem in capsys.readouterr().err


def test_the_last_form_of_a_boolean_wins():
    assert _parse(["--enable_batching", "--noenable_batching"]).enable_batching is False
    assert _parse(["--noenable_batching", "--enable_batching=true"]).enable_batching is True
    assert _parse(["--nofreeze_graph"]).freeze_graph is False


def test_version_prints_graft_and_tensorflow_and_exits_0(capsys):
    assert main(["--version"]) == 0   # no --model_base_path needed, as in TF Serving
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"Graft ModelServer: \d+\.\d+\.\d+.*", out[0])
    assert re.fullmatch(r"TensorFlow Library: 2\.\d+\.\d+.*", out[1])


def test_session_parallelism_fills_the_thread_counts_left_at_0():
    config = config_from_args(_parse(["--tensorflow_session_parallelism=3", "--tensorflow_inter_op_parallelism=1"]))
    assert (config.intra_op_threads, config.inter_op_threads) == (3, 1)
    assert (ServerConfig(model_base_path="/m").intra_op_threads, ServerConfig(model_base_path="/m").inter_op_threads) \
        == (0, 0)


@pytest.mark.parametrize("inert, problem", [
    ({"model_name": "x"}, "not a TF Serving flag Graft accepts without effect"),
    ({"num_load_threads": True}, "takes a int"),
    ({"xla_cpu_compilation_enabled": "yes"}, "takes a bool"),
])
def test_a_program_cannot_smuggle_settings_through_inert_flags(inert, problem):
    with pytest.raises(ValueError, match=problem):
        ServerConfig(model_base_path="/m", inert_flags=inert)


def test_inert_messages_say_why():
    assert inert_message("xla_cpu_compilation_enabled", True) == (
        "--xla_cpu_compilation_enabled=true has no effect in Graft: " + INERT_FLAGS["xla_cpu_compilation_enabled"].reason)
    for flag in INERT_FLAGS.values():
        assert len(flag.reason) > 20 and not flag.reason.endswith(".")


# ---- docs/flags.md ----

def _doc_rows() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "docs" / "flags.md").read_text().splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3:
            for flag in re.findall(r"`--(\w+)`", cells[0]):
                rows[flag] = cells[1]
    return rows


def test_docs_flags_lists_every_flag_with_what_graft_does():
    rows = _doc_rows()
    for name in FLAGS:
        assert name in rows, f"docs/flags.md has no row for --{name}"
        expected = "accepted" if name in INERT_FLAGS else "implemented"
        assert rows[name].startswith(expected), f"--{name}: docs/flags.md says {rows[name]!r}, the code: {expected}"
    parser_flags = {opt[2:] for action in build_parser()._actions for opt in action.option_strings  # noqa: SLF001
                    if opt.startswith("--") and opt != "--help" and not opt[2:].startswith("no")}
    assert parser_flags - set(rows) == set(), "flags missing from docs/flags.md"
    assert set(rows) - parser_flags - {"help"} == set(), "docs/flags.md lists flags graft-serve does not have"
    assert "docs/flags.md" in (ROOT / "README.md").read_text()


# ---- the command line, end to end ----

def test_a_tf_serving_command_line_serves_and_says_what_it_ignores(tmp_path, two_input_savedmodel):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    server = Subprocess(["--port", "0", f"--rest_api_port={free_port()}", "--model_name=two",
                         f"--model_base_path={tmp_path / 'two'}", "--enable_model_warmup=true", "--num_load_threads=4",
                         "--allow_version_labels_for_unavailable_models=true", "--rest_api_enable_cors_support=true",
                         "--noenable_batching", "--xla_cpu_compilation_enabled", "--use_alts_credentials=false"],
                        tmp_path / "serve.log")
    try:
        answer = requests.post(f"{server.client.rest}/v1/models/two:predict", timeout=30,
                               headers={"Origin": "https://app.example"},
                               json={"inputs": {"x": [[1.0, 2.0, 3.0]], "tag": ["a"]}})
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == "*"
        preflight = requests.options(f"{server.client.rest}/v1/models/two:predict", timeout=30, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
    finally:
        assert server.stop() == 0
    log = server.log()
    for name, value in [("num_load_threads", 4), ("allow_version_labels_for_unavailable_models", True),
                        ("xla_cpu_compilation_enabled", True), ("use_alts_credentials", False)]:
        assert log.count(inert_message(name, value)) == 1, log
    assert "WARNING graft-serve: --use_alts_credentials=false has no effect" in log   # security: a warning
    assert "enable_model_warmup" not in log and "rest_api_enable_cors_support" not in log  # implemented
