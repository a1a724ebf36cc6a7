"""graft-serve starts fast and quiet, and checks every port and file before any work.

The real graft-serve runs as a child process: ``--help`` and usage errors answer
within a second without importing TensorFlow; a bad file or a taken port is one
line naming the flag, still without TensorFlow (so before any model could load
and before gRPC listens); TensorFlow's own log lines stay out of the log unless
``TF_CPP_MIN_LOG_LEVEL`` asks for them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from serving.runtime import tflog
from serving.runtime.process import ServeProcess, serve_command
from tests import models
from tests.ports import free_port

FAST_S = 1.0
# graft-serve's own main(), reporting afterwards whether TensorFlow was imported.
_PROBE = """
import sys
from serving.runtime.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("tensorflow imported:", "tensorflow" in sys.modules)
sys.exit(code)
"""
_TF_NOISE = ("absl::InitializeLog", "cuInit", "cudart_stub.cc", "port.cc:")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != tflog.LEVEL_VARIABLE}
    return {**env, **extra}


def _graft_serve(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([*serve_command(), *argv], capture_output=True, text=True, env=_env(), timeout=60,
                            check=False)
    return result, time.perf_counter() - started


def _probe(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=_env(),
                          timeout=120, check=False)


@pytest.mark.parametrize("argv, code, says", [
    (["--help"], 0, "usage: graft-serve"),
    ([], 2, "either --model_config_file or --model_base_path is required"),
    (["--model_base=x"], 2, "unrecognized arguments: --model_base=x"),
])
def test_help_and_usage_errors_answer_within_a_second(argv, code, says):
    # The best of three: a loaded 2-core machine can stall any one run.
    runs = [_graft_serve(argv) for _ in range(3)]
    result = runs[0][0]
    assert result.returncode == code, result.stderr
    assert says in result.stdout + result.stderr
    seconds = sorted(s for _, s in runs)
    print(f"graft-serve {' '.join(argv)}: {', '.join(f'{s:.2f}' for s in seconds)} s")
    assert seconds[0] < FAST_S


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0), (["--version"], 0), ([], 2), (["--model_base=x"], 2),
    (["--model_base_path", "/m", "--port", "0", "--rest_api_port", "0", "--auth_token_file", "nofile"], 1),
])
def test_tensorflow_is_not_imported_for_help_version_usage_or_bad_files(argv, code):
    result = _probe(argv)
    assert result.returncode == code, result.stderr
    assert "tensorflow imported: False" in result.stdout


def _held_port() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0))
    return listener


@pytest.mark.parametrize("case", [
    "grpc_port_in_use", "rest_port_in_use", "rest_tls_cert_missing", "rest_tls_key_missing", "rest_tls_not_pem",
    "auth_token_file_missing", "ssl_config_file_missing", "batching_parameters_file_missing",
    "batching_parameters_file_bad", "monitoring_config_file_missing", "model_config_file_missing",
])
def test_ports_and_files_are_checked_first_with_one_line_naming_the_flag(case, tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("not what the flag wants {\n")
    missing = str(tmp_path / "missing")
    listener = _held_port()
    taken = listener.getsockname()[1]
    flags = {
        "grpc_port_in_use": (["--port", str(taken)], f"--port {taken}: 127.0.0.1:{taken} is already in use"),
        "rest_port_in_use": (["--rest_api_port", str(taken)],
                             f"--rest_api_port {taken}: 127.0.0.1:{taken} is already in use"),
        "rest_tls_cert_missing": (["--rest_tls_cert", missing, "--rest_tls_key", str(junk)],
                                  f"--rest_tls_cert {missing}: cannot read it"),
        "rest_tls_key_missing": (["--rest_tls_cert", str(junk), "--rest_tls_key", missing],
                                 f"--rest_tls_key {missing}: cannot read it"),
        "rest_tls_not_pem": (["--rest_tls_cert", str(junk), "--rest_tls_key", str(junk)],
                             "cannot load the certificate and key"),
        "auth_token_file_missing": (["--auth_token_file", "nofile"],
                                    "--auth_token_file nofile: cannot read it: No such file or directory"),
        "ssl_config_file_missing": (["--ssl_config_file", missing], f"--ssl_config_file {missing}"),
        "batching_parameters_file_missing": (["--batching_parameters_file", missing],
                                             f"--batching_parameters_file {missing}"),
        "batching_parameters_file_bad": (["--batching_parameters_file", str(junk)],
                                         f"--batching_parameters_file {junk}"),
        "monitoring_config_file_missing": (["--monitoring_config_file", missing], f"--monitoring_config_file {missing}"),
        "model_config_file_missing": (["--model_config_file", missing], f"--model_config_file {missing}"),
    }
    argv, says = flags[case]
    rest_port = [] if "--rest_api_port" in argv else ["--rest_api_port", str(free_port())]
    try:
        result = _probe(["--host", "127.0.0.1", "--port", "0", *rest_port, "--model_base_path", str(tmp_path / "m"),
                         *argv])
    finally:
        listener.close()
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "ERROR graft-serve: cannot start: " in lines[0] and says in lines[0], lines[0]
    # No TensorFlow: no model could have started loading, no server could be listening.
    assert "tensorflow imported: False" in result.stdout


# ---- TensorFlow's own log lines ----

@pytest.mark.parametrize("line, kept", [
    (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", False),
    (b"I0000 00:00:1796540117.315443   24300 port.cc:153] oneDNN custom operations are on.\n", False),
    (b"I0000 00:00:1796540117.315903   24300 cudart_stub.cc:31] Could not find cuda drivers\n", False),
    (b"W1206 10:00:00.000001    7 some.cc:12] a warning\n", False),
    (b"E1206 10:00:00.000001    7 some.cc:12] a real error\n", True),
    (b"F1206 10:00:00.000001    7 some.cc:12] fatal\n", True),
    (b"2026-12-06 10:00:00,000 INFO graft-serve: Running gRPC ModelServer at 0.0.0.0:8500 ...\n", True),
    (b"Traceback (most recent call last):\n", True),
])
def test_keep_line_drops_tensorflows_early_info_and_warnings(line, kept):
    assert tflog.keep_line(line, nvidia_driver=False) is kept
    assert tflog.keep_line(line, nvidia_driver=True) is kept


def test_the_cuinit_error_is_dropped_only_without_an_nvidia_driver():
    line = (b"E0000 00:00:1796540123.024678   24300 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
            b"CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    assert tflog.keep_line(line, nvidia_driver=False) is False
    assert tflog.keep_line(line, nvidia_driver=True) is True   # there it means something


def test_quiet_default_only_where_the_user_set_no_level():
    env: dict[str, str] = {}
    assert tflog.quiet_by_default(env) is True and env == {"TF_CPP_MIN_LOG_LEVEL": "2"}
    env = {"TF_CPP_MIN_LOG_LEVEL": "0"}
    assert tflog.quiet_by_default(env) is False and env == {"TF_CPP_MIN_LOG_LEVEL": "0"}


def test_filtered_stderr_passes_kept_lines_as_they_are_written(capfd):
    seen = ""
    with tflog.filtered_stderr(lambda line: b"drop" not in line):
        os.write(2, b"keep 1\ndrop 2\n")
        deadline = time.monotonic() + 10
        while "keep 1" not in seen:   # at once, not when the block ends
            assert time.monotonic() < deadline
            time.sleep(0.01)
            seen += capfd.readouterr().err
        print("keep 3", file=sys.stderr)
        os.write(2, b"drop 4\nno newline")
    seen += capfd.readouterr().err
    assert seen == "keep 1\nkeep 3\nno newline"
    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "after\n"


@pytest.mark.parametrize("level", [None, "0"])
def test_tensorflow_is_quiet_by_default_and_louder_with_tf_cpp_min_log_level(level, tmp_path, two_input_savedmodel):
    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    env = _env(**({tflog.LEVEL_VARIABLE: level} if level else {}))
    server = ServeProcess(["--host", "127.0.0.1", "--port", "0", "--rest_api_port", str(free_port()),
                           "--model_name", "two", "--model_base_path", str(tmp_path / "two")],
                          tmp_path / "serve.log", env=env)
    try:
        _, rest = server.bound_ports()
        server.wait_ready(f"http://127.0.0.1:{rest}")
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "Running gRPC ModelServer" in log and "AVAILABLE" in log
    noise = [word for word in _TF_NOISE if word in log]
    if level is None:
        assert noise == [], log
    else:
        assert noise, log   # TensorFlow as it logs on its own
